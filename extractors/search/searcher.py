"""Searching a store: its index and rows answering `Query`s (`Searcher`), stored vectors read
on demand (`StoredVectors`), and the two ways to open them: `searcher_for` (a store as it is)
and `commit_searcher` (the files of one commit, checked to belong together, for a long-running
reader). Image examples are embedded all at once (`Searcher.run_many`), so the network runs on
batches (`embed_batches`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from extractors.search.query import (
    Example,
    NotFound,
    Query,
    QueryError,
    combine,
    hit,
    response,
    row_id,
)
from extractors.search.rows import ROW_COLUMNS, Rows, read_rows

Embed = Callable[[Sequence[bytes | str | Path]], np.ndarray]  # images -> (n, dim) vectors


@dataclass
class Searcher:
    """A store's index and rows, answering `Query`s. `vector_of` reads a row's stored vector,
    `embed` turns images (bytes or paths) into vectors, all of them in one call (so it can run
    the network on batches, not one image at a time)."""

    index: Any  # extractors.index.ann.AnnIndex
    rows: Rows
    vector_of: Callable[[int], np.ndarray]
    embed: Embed
    dim: int

    def vectors(self, examples: list[Example]) -> np.ndarray:
        out = []
        for ex in examples:
            if ex.id is not None:
                if row_id(ex.id) not in self.rows:
                    raise NotFound(f"no row with id {ex.id} in this store")
                out.append(self.vector_of(ex.id).reshape(-1))
            elif ex.vector is not None:
                out.append(np.asarray(ex.vector, np.float32).reshape(-1))
            elif ex.image is not None:
                out.append(np.asarray(self.embed([ex.image]), np.float32).reshape(-1))
            else:
                raise QueryError("an example is a row id, a vector or an image")
        return np.stack(out) if out else np.zeros((0, self.dim), np.float32)

    def run_many(self, queries: Sequence[Query]) -> list[dict[str, Any]]:
        """Each query's answer (`run`), in order; the images of all of them embedded in one
        `embed` call first."""
        for q in queries:
            q.check()
        images = [ex for q in queries for ex in (*q.like, *q.unlike) if _is_image(ex)]
        if images:
            vectors = np.asarray(self.embed([ex.image for ex in images]), np.float32)
            done = {id(ex): v for ex, v in zip(images, vectors, strict=True)}

            def embedded(examples: list[Example]) -> list[Example]:
                return [Example(vector=done[id(e)], image=e.image, name=e.name)
                        if id(e) in done else e for e in examples]  # fmt: skip

            queries = [
                Query(embedded(q.like), embedded(q.unlike), q.k, q.offset, q.filters)
                for q in queries
            ]
        return [self.run(q) for q in queries]

    def run(self, q: Query) -> dict[str, Any]:
        """The query's hits, best first, from rank `offset`, in the shape of `response`."""
        q.check()
        allowed = self.rows.allowed(q.filters)
        vector = combine(self.vectors(q.like), self.vectors(q.unlike))
        exclude = {int(ex.id) for ex in [*q.like, *q.unlike] if ex.id is not None}
        want = q.offset + q.k + len(exclude)
        scores, ids = self.index.search(vector[None], want, allowed=allowed)
        pairs = [
            (int(i), float(s))
            for s, i in zip(scores[0], ids[0], strict=True)
            if i >= 0 and math.isfinite(s) and int(i) not in exclude and int(i) in self.rows
        ][q.offset : q.offset + q.k]
        rows = self.rows.take([i for i, _ in pairs])
        hits = [hit(r, s) for r, (_, s) in zip(rows, pairs, strict=True)]
        return response(q, hits)


class StoredVectors:
    """A row's stored vector: from the index where it keeps one (memory-mapped), else read
    from the one Parquet row group that holds it."""

    def __init__(self, path: str | Path | Any, rows: Rows, index: Any = None) -> None:
        import pyarrow.parquet as pq

        self.file = path if isinstance(path, pq.ParquetFile) else pq.ParquetFile(path)
        self.rows, self.index = rows, index
        sizes = [self.file.metadata.row_group(i).num_rows for i in range(self.file.num_row_groups)]
        self.starts = np.cumsum([0, *sizes])[:-1]

    def read(self, row_id: int, columns: list[str]) -> pa.Table:
        at = self.rows.parquet_row(row_id)
        if at is None:
            raise NotFound(f"no row with id {row_id} in this store")
        group = int(np.searchsorted(self.starts, at, side="right") - 1)
        table = self.file.read_row_group(group, columns=columns)
        return table.filter(pc.equal(table["id"], row_id))

    def __call__(self, row_id: int) -> np.ndarray:
        from extractors.store.layout import embedding_matrix

        kept = self.index.stored(row_id) if self.index is not None else None
        if kept is not None:
            return kept
        return embedding_matrix(self.read(row_id, ["id", "embedding"]))


def _is_image(ex: Example) -> bool:
    return ex.id is None and ex.vector is None and ex.image is not None


def searcher_for(store: Any, embed: Embed | None = None) -> Searcher:
    """A `Searcher` over a store (extractors.store.store.Store): its index memory-mapped, its rows
    in Arrow, vectors read on demand. Without `embed`, image examples are refused."""
    from extractors.store.layout import EMBEDDINGS

    manifest = store.manifest()
    parquet = store.path / EMBEDDINGS
    shared = read_rows(store.path, parquet)  # else (an older store) built in this process
    table = shared if shared is not None else store.table(ROW_COLUMNS)
    rows = Rows(table, manifest["source"]["root"])

    index = store.index(mmap=True)
    return Searcher(
        index,
        rows,
        StoredVectors(store.path / EMBEDDINGS, rows, index),
        embed or _no_images,
        manifest["dim"],
    )


def embed_batches(backbone: Any, images: Sequence[Any], batch_size: int) -> np.ndarray:
    """`images` (paths or decoded PIL images) as (n, dim) float32 vectors: prepared and run
    through `backbone` (embedding.backbones.Backbone) `batch_size` at a time, one forward a
    batch, as extraction runs them."""
    import torch

    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.cat([backbone.prepare(im) for im in images[start : start + batch_size]])
        out.append(backbone.embed(batch).numpy())
    return np.concatenate(out) if out else np.zeros((0, backbone.dim), np.float32)


def _no_images(_: Sequence[bytes | str | Path]) -> np.ndarray:
    raise QueryError("this query cannot embed images; give row ids or vectors")


def stamp(path: str | Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime_ns) of a file, None when it is missing: it changes with every
    atomic replacement (a new inode), so comparing two is a cheap "was it rewritten?"."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def commit_searcher(
    store: Any, embed: Embed | None = None
) -> tuple[dict[str, Any], Searcher] | None:
    """(manifest, `Searcher`) over files of one commit: the manifest, the Parquet, its rows and
    the index, each opened once (a later commit renames new files into place and leaves these
    as they are). Writes nothing and takes no lock: None while a writer is between its files
    (the manifest or the Parquet replaced while they were opened, or the index not holding
    exactly the rows); try again later. A missing or corrupt index is also None here;
    `searcher_for` rebuilds it."""
    import pyarrow.parquet as pq

    from extractors.index.maintain import consistent, open_index
    from extractors.store.layout import EMBEDDINGS, MANIFEST

    manifest_path, parquet = store.path / MANIFEST, store.path / EMBEDDINGS
    try:
        before = (stamp(manifest_path), stamp(parquet))
        manifest = json.loads(manifest_path.read_text())
        file = pq.ParquetFile(parquet)
        table = read_rows(store.path, parquet)  # rows.arrow of this very Parquet, or None
        if table is None:
            table = file.read(columns=ROW_COLUMNS)
        index = open_index(store.path, manifest.get("index"), mmap=True)
        if (stamp(manifest_path), stamp(parquet)) != before:
            return None
        rows = Rows(table, manifest["source"]["root"])
        if len(rows) != manifest["rows"] or not consistent(index, rows.ids):
            return None
    except (OSError, ValueError, KeyError, RuntimeError, pa.ArrowException):
        return None
    vectors = StoredVectors(file, rows, index)
    return manifest, Searcher(index, rows, vectors, embed or _no_images, manifest["dim"])
