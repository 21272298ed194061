"""FAISS search: cosine top-k over L2-normalised embeddings, ids = the Parquet `id`s, with
filters applied inside FAISS. The index kinds and the choice among them are
extractors/index/kinds.py, the exact re-ranking of ivf_pq extractors/index/rerank.py.

Search parameters (`nprobe`, `efSearch`, `rerank` = candidates per result for ivf_pq) are set
by `extractors.index.recall` to reach a recall target; `AnnIndex` applies them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from extractors.common import atomic_path, normalize
from extractors.index.rerank import Reranker

EXACT_ROWS = 2_000  # a filter to at most this many rows: an exact scan of their vectors
HNSW_EXACT = 50_000  # HNSW: a filter to at most this many rows is scanned exactly (a graph
# walk that skips most nodes loses its way)
SELECTOR_KEPT = 100_000  # ids: the last filter's selector is kept up to this size (~5 MB)


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


def search(
    index: faiss.Index | AnnIndex, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) by cosine similarity; ids of -1 mean fewer than k vectors exist."""
    if isinstance(index, AnnIndex):
        return index.search(queries, k)
    k = max(1, min(k, index.ntotal))
    return index.search(normalize(queries), k)
