"""Exact re-ranking for ivf_pq: the normalised float32 rows in a memory-mapped file
(`vectors.f32`), the id each row holds (`vector_ids.npy`) and their lookup (`vector_lookup.npy`),
shared between processes through the page cache. The file names are the layout's
(extractors/store/layout.py)."""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path

import numpy as np

from extractors.common import atomic_path
from extractors.store.layout import RERANK_FILES, VECTOR_IDS, VECTOR_LOOKUP, VECTORS


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
