"""The index kinds and the choice among them, by the number of vectors, their dimension and a
memory budget (cosine search over L2-normalised embeddings, ids = the Parquet `id`s):

    flat      IDMap2(FlatIP): exact. Small stores, where a scan costs little.
    hnsw      IDMap2(HNSW32,Flat): graph search, full vectors; fast, grows by adding; cannot
              delete, so a removal rebuilds it.
    ivf_flat  IVF<nlist>,Flat: inverted lists of full vectors, when the HNSW graph does not fit.
    ivf_pq    IVF<nlist>,PQ<m>: product-quantised codes of m bytes a vector, for stores whose
              vectors do not fit the budget. The top candidates are re-ranked exactly against
              the float32 vectors, read from a memory-mapped file on disk (`vectors.f32`,
              `vector_ids.npy`: extractors/index/rerank.py), so recall is not capped by the codes.

`choose` picks one, `new_index` makes it empty, `kind_of` reads it back off a built index;
searching is extractors/index/ann.py, building and keeping it in line extractors/index/maintain.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import faiss

from extractors.common import human_bytes, parse_bytes
from extractors.settings import INDEX_KINDS as KINDS

FLAT_MAX = 20_000  # below this an exact scan takes a few ms a query: nothing to gain
HNSW_M = 32
HNSW_MAX = 2_000_000  # above this an HNSW build takes hours on a few cores
DEFAULT_MAX_MEMORY = 4 * 2**30


@dataclass(frozen=True)
class IndexChoice:
    """Which index to build, its build parameters and why; written to the manifest."""

    kind: str
    dim: int
    n: int
    nlist: int = 0
    m: int = 0
    memory_bytes: int = 0  # estimated resident size of the index
    budget_bytes: int = DEFAULT_MAX_MEMORY
    reason: str = ""
    disk_bytes: int = 0  # vectors kept on disk for exact re-ranking (ivf_pq)

    @property
    def factory(self) -> str:
        return {
            "flat": "IDMap2,Flat",
            "hnsw": f"IDMap2,HNSW{HNSW_M},Flat",
            "ivf_flat": f"IVF{self.nlist},Flat",
            # np: no polysemous training (slow); fewer bits a code for stores too small to
            # train 256 centroids per sub-vector
            "ivf_pq": f"IVF{self.nlist},PQ{self.m}x{pq_bits(self.n)}np",
        }[self.kind]

    def same_build(self, other: dict[str, Any] | None) -> bool:
        """Whether an index built for `other` (a manifest entry) has this structure."""
        return bool(other) and all(
            other.get(k) == getattr(self, k) for k in ("kind", "dim", "nlist", "m")
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"factory": self.factory}


def _nlist(n: int) -> int:
    """About 2·sqrt(n) lists with at least 39 training points each, as a power of two (so
    that it changes, forcing a retrain, only when the store doubles or halves)."""
    lists = round(math.log2(max(2 * math.sqrt(max(n, 1)), 1)))
    cap = math.floor(math.log2(max(n / 39, 1)))
    return 2 ** int(min(lists, cap, 16))


def pq_bits(n: int) -> int:
    """Bits a PQ sub-code: 8 (256 centroids) when there are enough vectors to train them."""
    return int(min(8, max(4, math.floor(math.log2(max(n, 1) / 39)))))


def _pq_m(dim: int, n: int, budget: int, fixed: int) -> int:
    """The largest code size (bytes a vector, dividing dim) whose codes fit the budget.

    Sub-vectors of at least 8 dimensions: finer splits train slowly and gain little. Exactly 8
    (m = dim/8, the largest option) is also the fastest to encode: FAISS finds the nearest
    sub-centroid of an 8-d sub-vector with a SIMD kernel and of a 10-d one without (1,280-d:
    PQ160 encodes 5x faster than PQ128, and searches as fast at a slightly higher recall)."""
    sizes = {m for m in (128, 96, 64, 48, 40, 32, 24, 20, 16, 8, 4) if dim % m == 0}
    if dim % 8 == 0:
        sizes.add(dim // 8)
    options = sorted(sizes, reverse=True)
    options = [m for m in options if dim // m >= 8] or options[-1:]
    for m in options:
        if n * (m + 8) + fixed <= budget:
            return m
    return options[-1] if options else 1


def estimate_bytes(kind: str, n: int, dim: int, nlist: int = 0, m: int = 0) -> int:
    """Resident bytes of an index of this kind (vectors, graph or codes, ids, centroids)."""
    if kind == "flat":
        return n * (4 * dim + 24)
    if kind == "hnsw":
        return n * (4 * dim + int(2 * HNSW_M * 4 * 1.05) + 24)
    if kind == "ivf_flat":
        return n * (4 * dim + 8) + nlist * dim * 4
    return n * (m + 8) + nlist * dim * 4 + 256 * dim * 4


def choose(
    n: int, dim: int, max_memory: int | str | None = None, kind: str = "auto"
) -> IndexChoice:
    """The index for `n` vectors of `dim` within `max_memory` bytes (default 4 GiB), and why."""
    budget = parse_bytes(max_memory) or DEFAULT_MAX_MEMORY
    if kind not in ("auto", *KINDS):
        raise ValueError(f"unknown index kind {kind!r}; choose auto or one of {', '.join(KINDS)}")
    nlist = _nlist(n)
    size = {k: estimate_bytes(k, n, dim, nlist) for k in ("flat", "hnsw", "ivf_flat")}
    fixed = nlist * dim * 4 + 256 * dim * 4
    m = _pq_m(dim, n, budget, fixed)
    size["ivf_pq"] = estimate_bytes("ivf_pq", n, dim, nlist, m)
    if kind != "auto":
        reason = f"asked for {kind}"
    elif n <= FLAT_MAX and size["flat"] <= budget:
        kind, reason = "flat", f"{n:,} vectors: an exact scan is fast at this size"
    elif size["hnsw"] <= budget and n <= HNSW_MAX:
        kind = "hnsw"
        reason = (
            f"{n:,} vectors: the HNSW graph ({human_bytes(size['hnsw'])}) fits the "
            f"{human_bytes(budget)} budget"
        )
    elif size["ivf_flat"] <= budget:
        kind = "ivf_flat"
        reason = (
            f"{n:,} vectors ({human_bytes(size['ivf_flat'])}) fit the {human_bytes(budget)} "
            + ("budget, not with an HNSW graph" if n <= HNSW_MAX else "budget; too many for HNSW")
        )
    else:
        kind = "ivf_pq"
        reason = (
            f"{n:,} full vectors ({human_bytes(size['flat'])}) exceed the "
            f"{human_bytes(budget)} budget: {m}-byte PQ codes, exact re-ranking from disk"
        )
    return IndexChoice(
        kind=kind,
        dim=dim,
        n=n,
        nlist=nlist if kind.startswith("ivf") else 0,
        m=m if kind == "ivf_pq" else 0,
        memory_bytes=size[kind],
        budget_bytes=budget,
        reason=reason,
        disk_bytes=n * dim * 4 if kind == "ivf_pq" else 0,
    )


def new_index(choice: IndexChoice) -> faiss.Index:
    """An empty index of the chosen kind (inner product on normalised vectors = cosine)."""
    index = faiss.index_factory(choice.dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    if choice.kind.startswith("ivf"):
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = 10  # k-means iterations: past 10 the lists barely move
        ivf.cp.max_points_per_centroid = 64
        if choice.kind == "ivf_pq":
            faiss.downcast_index(ivf).pq.cp.niter = 10
    return index


def train_sample_size(choice: IndexChoice) -> int:
    """Vectors needed to train the index (0: nothing to train)."""
    if not choice.kind.startswith("ivf"):
        return 0
    need = 40 * choice.nlist
    if choice.kind == "ivf_pq":
        need = max(need, 256 * 40)
    return need


def kind_of(index: faiss.Index) -> str:
    """The kind of a built index, read off the index itself."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
        return "hnsw" if isinstance(inner, faiss.IndexHNSW) else "flat"
    ivf = faiss.extract_index_ivf(index)
    return "ivf_pq" if isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ) else "ivf_flat"
