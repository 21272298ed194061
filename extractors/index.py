"""FAISS index stage: cosine search over L2-normalised embeddings, ids = the Parquet `id`s."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from extractors.atomic import atomic_path


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (float32, contiguous); zero rows stay zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def build_index(embeddings: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """Exact inner-product index on normalised vectors (= cosine similarity), keyed by `ids`."""
    index = empty_index(embeddings.shape[1])
    add(index, embeddings, ids)
    return index


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids held by an IndexIDMap index, in insertion order."""
    return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)


def write_index(index: faiss.Index, path: str | Path) -> None:
    """Atomic write: temp file in the same folder, fsync, rename."""
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_index(path: str | Path, mmap: bool = False) -> faiss.Index:
    """Read an index; `mmap=True` maps it read-only so processes can share it."""
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return faiss.read_index(str(path), flags)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) by cosine similarity; ids of -1 mean fewer than k vectors exist."""
    k = max(1, min(k, index.ntotal))
    return index.search(normalize(queries), k)


def empty_index(dim: int) -> faiss.Index:
    """An empty exact cosine index to fill batch by batch with `add`."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def add(index: faiss.Index, embeddings: np.ndarray, ids: np.ndarray) -> None:
    """Add normalised vectors under their Parquet ids."""
    if len(ids):
        index.add_with_ids(normalize(embeddings), np.ascontiguousarray(ids, dtype=np.int64))
