"""FAISS index stage: cosine search over L2-normalised embeddings, ids = the Parquet `id`s.

Four kinds, chosen by `choose` from the number of vectors, their dimension and a memory budget:

    flat      IDMap2(FlatIP): exact. Small stores, where a scan costs little.
    hnsw      IDMap2(HNSW32,Flat): graph search, full vectors; fast, grows by adding; cannot
              delete, so a removal rebuilds it.
    ivf_flat  IVF<nlist>,Flat: inverted lists of full vectors, when the HNSW graph does not fit.
    ivf_pq    IVF<nlist>,PQ<m>: product-quantised codes of m bytes a vector, for stores whose
              vectors do not fit the budget. The top candidates are re-ranked exactly against
              the float32 vectors, read from a memory-mapped file on disk (`vectors.f32`,
              `vector_ids.npy`), so recall is not capped by the codes.

Search parameters (`nprobe`, `efSearch`, `rerank` = candidates per result for ivf_pq) are set
by `extractors.index.recall` to reach a recall target; `AnnIndex` applies them.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from extractors.common import atomic_path, human_bytes, normalize, parse_bytes
from extractors.settings import INDEX_KINDS as KINDS
from extractors.store.layout import RERANK_FILES, VECTOR_IDS, VECTOR_LOOKUP, VECTORS

FLAT_MAX = 20_000  # below this an exact scan takes a few ms a query: nothing to gain
HNSW_M = 32
EXACT_ROWS = 2_000  # a filter to at most this many rows: an exact scan of their vectors
HNSW_EXACT = 50_000  # HNSW: a filter to at most this many rows is scanned exactly (a graph
# walk that skips most nodes loses its way)
SELECTOR_KEPT = 100_000  # ids: the last filter's selector is kept up to this size (~5 MB)
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


def index_ids(index: faiss.Index | AnnIndex) -> np.ndarray:
    """The ids held by an index (IDMap: insertion order; IVF: list by list)."""
    index = faiss.downcast_index(index.index if isinstance(index, AnnIndex) else index)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    parts = [
        faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
        for i in range(lists.nlist)
        if lists.list_size(i)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


class Reranker:
    """Exact cosine scores for candidate ids, from the vectors file (memory-mapped)."""

    def __init__(self, folder: Path, dim: int):
        self.folder, self.dim = Path(folder), dim
        ids_path = self.folder / VECTOR_IDS
        # Memory-mapped too: shared between processes, like the vectors.
        self.ids = np.load(ids_path, mmap_mode="r") if ids_path.exists() else np.zeros(0, np.int64)
        self.vectors = self._map()
        self._sorted, self._order = self._lookup()

    def _lookup(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids sorted, the row of each): the lookup file, mapped, when it belongs to the ids
        file (a crash between the two leaves it stale); else computed here."""
        path = self.folder / VECTOR_LOOKUP
        n = len(self.ids)
        with contextlib.suppress(OSError, ValueError):
            lookup = np.load(path, mmap_mode="r")
            if lookup.shape == (2, n) and (n == 0 or self._agrees(lookup)):
                return lookup[0], lookup[1]
        order = np.argsort(self.ids, kind="stable")
        return self.ids[order], order

    def _agrees(self, lookup: np.ndarray) -> bool:
        probe = np.linspace(0, len(self.ids) - 1, 64).astype(np.int64)
        rows = lookup[1][probe]
        return bool(np.array_equal(self.ids[rows], lookup[0][probe]))

    @staticmethod
    def write_ids(folder: Path, ids: np.ndarray) -> None:
        """The ids file, then its lookup, each atomically."""
        ids = np.asarray(ids, np.int64)
        with atomic_path(folder / VECTOR_IDS) as tmp, open(tmp, "wb") as fh:
            np.save(fh, ids)
        order = np.argsort(ids, kind="stable")
        with atomic_path(folder / VECTOR_LOOKUP) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.stack([ids[order], order]))

    def _map(self) -> np.ndarray:
        if not len(self.ids):
            return np.zeros((0, self.dim), np.float32)
        vectors = np.memmap(
            self.folder / VECTORS, np.float32, mode="r", shape=(len(self.ids), self.dim)
        )
        # Re-ranking reads a few hundred random rows a query: no read-ahead around each.
        with contextlib.suppress(AttributeError, OSError, ValueError):
            vectors._mmap.madvise(mmap.MADV_RANDOM)
        return vectors

    def rows(self, ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self._sorted, ids)
        pos = np.minimum(pos, len(self._sorted) - 1)
        return self._order[pos]

    def rerank(
        self, queries: np.ndarray, cand: np.ndarray, k: int, chunk: int = 16
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among each query's candidates (-1 = none), a few queries at a time."""
        scores = np.full((len(queries), k), -np.inf, np.float32)
        out = np.full((len(queries), k), -1, np.int64)
        kk = min(k, cand.shape[1])
        for s in range(0, len(queries), chunk):
            c = cand[s : s + chunk]
            valid = c >= 0
            rows = self.rows(np.where(valid, c, self.ids[0] if len(self.ids) else 0))
            vecs = np.asarray(self.vectors[rows.ravel()]).reshape(*c.shape, self.dim)
            sc = np.matmul(vecs, queries[s : s + chunk, :, None])[..., 0]
            sc[~valid] = -np.inf
            top = np.argsort(-sc, axis=1, kind="stable")[:, :kk]
            best = np.take_along_axis(sc, top, 1)
            scores[s : s + chunk, :kk] = best
            out[s : s + chunk, :kk] = np.where(np.isfinite(best), np.take_along_axis(c, top, 1), -1)
        return scores, out

    @staticmethod
    def append(folder: Path, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Append rows: vectors first (past the committed length), then the ids file."""
        ids_path = folder / VECTOR_IDS
        old = np.load(ids_path) if ids_path.exists() else np.zeros(0, np.int64)
        path = folder / VECTORS
        with open(path, "r+b" if path.exists() else "wb") as fh:
            fh.truncate(len(old) * vectors.shape[1] * 4)  # drop rows of a crashed append
            fh.seek(0, os.SEEK_END)
            fh.write(np.ascontiguousarray(vectors, np.float32).data)
            fh.flush()
            os.fsync(fh.fileno())
        Reranker.write_ids(folder, np.concatenate([old, np.asarray(ids, np.int64)]))

    @staticmethod
    def reset(folder: Path) -> None:
        for name in RERANK_FILES:
            (folder / name).unlink(missing_ok=True)


@dataclass
class AnnIndex:
    """An index with its search parameters and, for ivf_pq, the exact re-ranker."""

    index: faiss.Index
    kind: str = "flat"
    params: dict[str, int] = field(default_factory=dict)
    reranker: Reranker | None = None
    _kept_selector: tuple[np.ndarray, Any] | None = field(default=None, repr=False)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def stored(self, row_id: int) -> np.ndarray | None:
        """A row's (normalised) vector as the index keeps it: the re-rank file of ivf_pq, the
        codes of flat and HNSW; None where it keeps none (ivf_flat) or not this row."""
        if self.reranker is not None and len(self.reranker.ids):
            at = self.reranker.rows(np.array([row_id], np.int64))[0]
            if self.reranker.ids[at] == row_id:
                return np.asarray(self.reranker.vectors[at], np.float32)[None]
            return None
        if self.kind in ("flat", "hnsw"):
            try:
                return self.index.reconstruct(int(row_id))[None]
            except RuntimeError:  # not one of its ids
                return None
        return None

    def set_params(self, params: dict[str, int]) -> None:
        self.params = dict(params)
        faiss_params = {k: v for k, v in params.items() if k in ("nprobe", "efSearch")}
        if faiss_params:
            spec = ",".join(f"{k}={v}" for k, v in faiss_params.items())
            faiss.ParameterSpace().set_index_parameters(self.index, spec)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) by cosine similarity; ids of -1 mean fewer than k results.

        `allowed` (ids) filters inside FAISS (an IDSelector), never by over-fetching, so a
        filtered query costs about what an unfiltered one does however few rows pass:

        - flat: the scan is exact anyway, and skips the other rows;
        - at most EXACT_ROWS rows (HNSW: HNSW_EXACT): an exact scan of their stored vectors;
        - IVF: the tuned nprobe divided by sqrt(share of rows allowed), since the allowed
          rows nearest a query lie that much further out (measured in bench/search.py: a
          random 1% of 1M rows, recall@10 0.997 at 1.15x the unfiltered query's time);
          HNSW: efSearch scaled the same way;
        - exhaustive (every IVF list) when that still finds fewer than k."""
        q = normalize(queries)
        k = max(1, min(k, max(self.index.ntotal, 1)))
        if allowed is None:
            return self._search(q, k, None)
        allowed = np.asarray(allowed, np.int64)
        if len(allowed) > 1 and not (allowed[1:] > allowed[:-1]).all():
            allowed = np.unique(allowed)  # a filter's ids usually come sorted and unique
        if not len(allowed):
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        if self.kind != "flat" and len(allowed) <= (
            HNSW_EXACT if self.kind == "hnsw" else EXACT_ROWS
        ):
            exact = self._exact(q, k, allowed)
            if exact is not None:
                return exact
        share = len(allowed) / max(self.index.ntotal, 1)
        scores, ids = self._search(q, k, allowed, widen=1 / math.sqrt(min(share, 1.0)))
        if self.kind not in ("ivf_flat", "ivf_pq") or (ids[:, : min(k, len(allowed))] >= 0).all():
            return scores, ids
        return self._search(q, k, allowed, widen=math.inf)

    def _search(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None, widen: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        params = None if allowed is None else self._selecting(allowed, widen)
        if self.reranker is not None and self.params.get("rerank"):
            cand = min(self.index.ntotal, k * int(self.params["rerank"]))
            _, ids = self.index.search(q, max(cand, k), params=params)
            return self.reranker.rerank(q, ids, k)
        return self.index.search(q, k, params=params)

    def _selecting(self, allowed: np.ndarray, widen: float) -> faiss.SearchParameters:
        """Search parameters of this kind that keep only `allowed`: the tuned nprobe or
        efSearch times `widen` (inf: every IVF list)."""
        sel = self._selector(allowed)  # the parameters keep it alive while FAISS uses it
        if self.kind in ("ivf_flat", "ivf_pq"):
            ivf = faiss.extract_index_ivf(self.index)
            tuned = int(self.params.get("nprobe", ivf.nprobe))
            nprobe = ivf.nlist if widen == math.inf else min(ivf.nlist, math.ceil(tuned * widen))
            return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        if self.kind == "hnsw":
            ef = max(int(self.params.get("efSearch", 16)), 64)
            ef = min(math.ceil(ef * widen), 1024)
            return faiss.SearchParametersHNSW(sel=sel, efSearch=ef)
        return faiss.SearchParameters(sel=sel)

    def _selector(self, allowed: np.ndarray) -> faiss.IDSelector:
        """FAISS's selector over `allowed` (sorted ids). The last one of at most
        SELECTOR_KEPT ids is kept for the next query with the same filter (a page of results
        after another, the same label again): building it is most of a filtered query's fixed
        cost, 0.8 ms for 10,000 ids. It is only read, so threads may share it."""
        kept = self._kept_selector
        if kept is not None and np.array_equal(kept[0], allowed):
            return kept[1]
        sel = faiss.IDSelectorBatch(allowed)
        if len(allowed) <= SELECTOR_KEPT:
            self._kept_selector = (allowed.copy(), sel)  # one assignment: atomic for readers
        return sel

    def _exact(
        self, q: np.ndarray, k: int, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Exact top-k over the allowed rows' stored vectors (the re-rank file for ivf_pq);
        None where the index keeps none (ivf_flat)."""
        if self.reranker is not None:
            rows = np.sort(self.reranker.rows(allowed))
            rows = rows[np.isin(self.reranker.ids[rows], allowed)]  # ids it does not hold: none
            vectors, allowed = np.asarray(self.reranker.vectors[rows]), self.reranker.ids[rows]
        elif self.kind in ("flat", "hnsw"):
            vectors = self.index.reconstruct_batch(allowed)
        else:
            return None
        flat = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
        flat.add_with_ids(np.ascontiguousarray(vectors, np.float32), allowed)
        return flat.search(q, k)


def flat_copy(batches: Iterable[tuple[np.ndarray, np.ndarray]], dim: int) -> faiss.Index:
    """An exact in-memory index over (vectors, ids) batches (range search, which HNSW lacks)."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    for vectors, ids in batches:
        if len(ids):
            index.add_with_ids(normalize(vectors), np.ascontiguousarray(ids, np.int64))
    return index


def write_index(index: faiss.Index, path: str | Path) -> None:
    """Atomic write: temp file in the same folder, fsync, rename."""
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_index(path: str | Path, mmap: bool = False) -> faiss.Index:
    """Read an index; `mmap=True` maps it read-only so processes share one copy in the page
    cache. IO_FLAG_MMAP_IFC maps every kind in place (flat codes and HNSW storage as well as
    IVF lists; IO_FLAG_MMAP alone maps only IVF lists and reads a flat or HNSW index into
    each process's own memory)."""
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return faiss.read_index(str(path), flags)


def search(index: faiss.Index | AnnIndex, queries: np.ndarray, k: int):
    """Top-k (scores, ids) by cosine similarity; ids of -1 mean fewer than k vectors exist."""
    if isinstance(index, AnnIndex):
        return index.search(queries, k)
    k = max(1, min(k, index.ntotal))
    return index.search(normalize(queries), k)
