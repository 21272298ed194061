"""Queries over a store: by stored rows, vectors or images; more like these and less like those;
restricted by label, split, an id list or a path prefix inside FAISS; paged. One JSON shape for
the CLI and the service (`response`).

Protocol of a query with examples (Rocchio's): the query vector is the mean of the normalised
`like` vectors minus UNLIKE_WEIGHT times the mean of the normalised `unlike` vectors,
normalised; rows given as examples are left out of the results. A filter becomes the list of
allowed ids, searched inside the index (`AnnIndex.search`: an exact scan of few rows, widened
probes for more), never by over-fetching.

Row metadata lives in Arrow columns (`Rows`), not Python objects: about 120 bytes a row at the
paths of a real collection, against ~1 kB for a dict per row. A long-running reader opens a
commit's files together and checks they belong together (`commit_searcher`); image examples
are embedded all at once (`Searcher.run_many`), so the network runs on batches.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from extractors.common import HeadstartError, normalize
from extractors.settings import MAX_ROW_ID
from extractors.store.layout import FILE_URI, os_path, stored_path

ROW_COLUMNS = ["id", "path", "label", "split", "width", "height", "bytes", "mtime_ns"]
STAMP = b"headstart.parquet"  # schema metadata of rows.arrow: the Parquet's size and mtime
UNLIKE_WEIGHT = 0.5  # how far the unlike examples push the query away (Rocchio's gamma)
MAX_RESULTS = 1000  # offset + k at most
MAX_EXAMPLES = 64  # like + unlike examples of one query
MAX_IDS = 100_000  # ids of an id-list filter


class QueryError(HeadstartError, ValueError):
    """A query the store cannot answer as asked; the message says what it takes."""


class NotFound(QueryError):
    """A row, path or file the query names is not in the store."""


def row_id(value: Any, what: str = "a row id") -> int:
    """`value` (an int, or its decimal text) as a row id, or QueryError naming `what`: ids are
    0 to 2**63 - 1, so anything else (a negative number, 24 digits) is refused here, before
    numpy or FAISS sees it."""
    try:
        out = int(value) if isinstance(value, int | str) and not isinstance(value, bool) else None
    except ValueError:
        out = None
    if out is None or not 0 <= out <= MAX_ROW_ID:
        raise QueryError(f"{what} is a whole number from 0 to 2**63 - 1, not {value!r}")
    return out


@dataclass(frozen=True)
class Filters:
    """Which rows may be results: all of the given conditions hold."""

    label: str | None = None
    split: str | None = None
    ids: tuple[int, ...] | None = None
    path_prefix: str | None = None

    def record(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if v is not None}
        if "ids" in out:
            out["ids"] = len(out["ids"])
        return out


@dataclass
class Example:
    """One example of a query: a stored row (`id`), a vector, or an image to embed."""

    id: int | None = None
    vector: np.ndarray | None = None
    image: bytes | str | Path | None = None
    name: str = ""


@dataclass
class Query:
    """What to search for, how many results from which rank, among which rows."""

    like: list[Example]
    unlike: list[Example] = field(default_factory=list)
    k: int = 10
    offset: int = 0
    filters: Filters = Filters()

    def check(self) -> None:
        if not self.like:
            raise QueryError("a query needs at least one example to search like")
        if len(self.like) + len(self.unlike) > MAX_EXAMPLES:
            raise QueryError(f"at most {MAX_EXAMPLES} like and unlike examples in one query")
        if self.k < 1 or self.offset < 0 or self.k + self.offset > MAX_RESULTS:
            raise QueryError(
                f"k must be at least 1 and offset at least 0, with k + offset at most "
                f"{MAX_RESULTS} (asked k={self.k}, offset={self.offset})"
            )


def rows_table(meta: pa.Table) -> pa.Table:
    """The serving table of a store's metadata (ROW_COLUMNS of embeddings.parquet, in its
    order): `row` added (the Parquet position), sorted by id, label and split
    dictionary-encoded."""
    meta = meta.select(ROW_COLUMNS).append_column(
        "row", pa.array(np.arange(meta.num_rows, dtype=np.int64))
    )
    meta = meta.take(pc.sort_indices(meta["id"]))
    for column in ("label", "split"):
        at = meta.schema.get_field_index(column)
        meta = meta.set_column(at, column, pc.dictionary_encode(meta[column]))
    return meta.combine_chunks()


def write_rows(folder: Path, parquet: Path, meta: pa.Table) -> None:
    """rows.arrow for `parquet` (written just before), atomically, stamped with its stat."""
    import pyarrow.ipc as ipc

    from extractors.common import atomic_path
    from extractors.store.layout import ROWS

    st = os.stat(parquet)
    table = rows_table(meta)
    table = table.replace_schema_metadata({STAMP: f"{st.st_size}:{st.st_mtime_ns}".encode()})
    with atomic_path(Path(folder) / ROWS) as tmp, ipc.new_file(str(tmp), table.schema) as w:
        w.write_table(table)


def read_rows(folder: Path, parquet: Path) -> pa.Table | None:
    """rows.arrow memory-mapped (zero-copy: shared by every process that maps it) when it is
    the one made from `parquet` as it is now; else None."""
    import pyarrow.ipc as ipc

    from extractors.store.layout import ROWS

    path = Path(folder) / ROWS
    try:
        st = os.stat(parquet)
        table = ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (OSError, pa.ArrowInvalid):
        return None
    stamp = (table.schema.metadata or {}).get(STAMP)
    return table if stamp == f"{st.st_size}:{st.st_mtime_ns}".encode() else None


class Rows:
    """The store's rows as Arrow columns (no vectors, no hashes), sorted by id (`rows_table`),
    looked up by id or path; memory-mapped from rows.arrow where the store has it."""

    def __init__(self, table: pa.Table, root: str):
        self.table = table if "row" in table.column_names else rows_table(table)
        self.root = root
        self.ids = _numpy(self.table["id"])
        self._codes: dict[str, tuple[list[str], np.ndarray]] = {}
        for column in ("label", "split"):
            encoded = self.table[column].combine_chunks()
            indices = encoded.indices
            codes = _numpy(indices.fill_null(-1) if indices.null_count else indices)
            self._codes[column] = (encoded.dictionary.to_pylist(), codes)

    def __len__(self) -> int:
        return len(self.ids)

    def position(self, row_id: int) -> int | None:
        """Where the row is in this table (sorted by id), or None."""
        at = int(np.searchsorted(self.ids, row_id))
        return at if at < len(self.ids) and self.ids[at] == row_id else None

    def parquet_row(self, row_id: int) -> int | None:
        """Where the row is in embeddings.parquet, or None."""
        at = self.position(row_id)
        return None if at is None else int(self.table["row"][at].as_py())

    def __contains__(self, row_id: int) -> bool:
        return self.position(row_id) is not None

    def get(self, row_id: int) -> dict[str, Any]:
        at = self.position(row_id)
        if at is None:
            raise NotFound(f"no row with id {row_id} in this store")
        return self.table.slice(at, 1).drop_columns(["row"]).to_pylist()[0]

    def take(self, row_ids: Sequence[int]) -> list[dict[str, Any]]:
        positions = [self.position(i) for i in row_ids]
        return self.table.take(pa.array(positions, pa.int64())).drop_columns(["row"]).to_pylist()

    def values(self, column: str) -> list[str]:
        return sorted(self._codes[column][0])

    def by_path(self, path: str) -> int:
        """The id of the row of `path`: a stored `path` value as it is (a file:// one too), or
        a path, absolute or relative to the source root (`layout.stored_path`: not UTF-8)."""
        if path.startswith(FILE_URI):
            candidate = path
        else:
            p = Path(path).expanduser()
            p = p if p.is_absolute() else Path(os_path(self.root)) / p
            candidate = stored_path(str(p.resolve(strict=False)))
        at = pc.index(self.table["path"], candidate).as_py()
        if at < 0:
            raise NotFound(f"{path!r} is not an image of this store")
        return int(self.ids[at])

    def prefix(self, text: str) -> str:
        """What a path prefix matches, as an OS path: absolute, or relative to the source root,
        resolved; a folder (a trailing slash, `/`, `.`, `..`) ends with one separator, so `/`
        matches every absolute path and `cat//` is `cat/`. A stored file:// value is decoded."""
        text = os_path(text)
        p = Path(text).expanduser()
        p = p if p.is_absolute() else Path(os_path(self.root)) / p
        prefix = str(p.resolve(strict=False))
        if text.endswith(("/", os.sep)) or Path(text).name in ("", ".", ".."):
            prefix = prefix.rstrip(os.sep) + os.sep
        return prefix

    def under(self, text: str) -> np.ndarray:
        """Which rows' paths start with the prefix `text` (`prefix`), compared as OS paths: a
        plain stored path against the prefix, a file:// one against the prefix's bytes
        percent-encoded as `stored_path` encodes them (byte by byte, so prefixes agree)."""
        prefix = self.prefix(text)
        paths = self.table["path"]
        encoded = FILE_URI + urllib.parse.quote(os.fsencode(prefix), safe="/")
        mask = pc.starts_with(paths, encoded)
        try:
            prefix.encode("utf-8")
        except UnicodeEncodeError:
            pass  # not UTF-8: only a file:// path can start with it
        else:
            mask = pc.or_(mask, pc.starts_with(paths, prefix))
        return mask.to_numpy(zero_copy_only=False)

    def allowed(self, f: Filters) -> np.ndarray | None:
        """The ids that pass `f`, or None when it lets every row through."""
        mask: np.ndarray | None = None
        for column, value in (("label", f.label), ("split", f.split)):
            if value is None:
                continue
            names, codes = self._codes[column]
            if value not in names:
                known = ", ".join(sorted(names)[:20]) or "none"
                raise QueryError(f"no {column} {value!r} in this store; it has {known}")
            mask = _and(mask, codes == names.index(value))
        if f.path_prefix is not None:
            mask = _and(mask, self.under(f.path_prefix))
        allowed = None if mask is None else self.ids[mask]
        if f.ids is not None:
            if len(f.ids) > MAX_IDS:
                raise QueryError(f"an id list filter takes at most {MAX_IDS:,} ids")
            try:
                given = np.asarray(f.ids, np.int64)
            except (OverflowError, TypeError, ValueError):
                given = None
            if given is None or given.ndim != 1 or (given < 0).any():
                raise QueryError("the ids filter takes row ids, whole numbers from 0 to 2**63 - 1")
            wanted = np.unique(given)
            known = wanted[np.isin(wanted, self.ids)]
            if not len(known):
                raise NotFound(
                    f"none of the {len(wanted)} ids of the filter is a row of this store"
                )
            allowed = known if allowed is None else np.intersect1d(allowed, known)
        return allowed


def _numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A column as numpy, zero-copy where it is one chunk without nulls (a mapped file's)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column.to_numpy(zero_copy_only=False)


def _and(mask: np.ndarray | None, other: np.ndarray) -> np.ndarray:
    return other if mask is None else mask & other


def combine(like: np.ndarray, unlike: np.ndarray | None = None) -> np.ndarray:
    """One query vector from examples (see the module docstring)."""
    q = normalize(like).mean(axis=0)
    if unlike is not None and len(unlike):
        q = q - UNLIKE_WEIGHT * normalize(unlike).mean(axis=0)
    return normalize(q[None])[0]


def parse_vector(value: Any, dim: int) -> np.ndarray:
    """A query vector from JSON: a list of `dim` numbers, or base64 of `dim` float32s."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise QueryError("vector_b64 is not valid base64") from None
        if len(raw) != 4 * dim:
            raise QueryError(
                f"vector_b64 holds {len(raw)} bytes; this store's vectors are {dim} float32 "
                f"({4 * dim} bytes, little-endian)"
            )
        vector = np.frombuffer(raw, "<f4").astype(np.float32)
    else:
        if not isinstance(value, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in value
        ):
            raise QueryError("vector must be a list of numbers")
        if len(value) != dim:
            raise QueryError(f"vector has {len(value)} numbers; this store's vectors have {dim}")
        vector = np.asarray(value, np.float32)
    if not np.isfinite(vector).all() or not np.any(vector):
        raise QueryError("vector must be finite and not all zeros")
    return vector


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

    def __init__(self, path: str | Path | Any, rows: Rows, index: Any = None):
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


def hit(row: dict[str, Any], score: float) -> dict[str, Any]:
    """One result: the row (id as a string: JSON numbers lose int64 precision in browsers),
    its score, and its addresses on a `headstart ui` service."""
    i = row["id"]
    return {
        "id": str(i),
        "score": round(score, 5),
        "label": row["label"],
        "split": row["split"],
        "path": row["path"],
        "name": Path(row["path"]).name,
        "thumb": f"/api/thumb/{i}",
        "image": f"/api/image/{i}",
        "row": f"/api/row/{i}",
    }


def describe(ex: Example) -> dict[str, Any]:
    if ex.id is not None:
        return {"id": str(ex.id)}
    if ex.image is not None:  # embedded already (`run_many`) or not
        return {"image": ex.name or "upload"}
    return {"vector": len(np.asarray(ex.vector).reshape(-1))}


def response(q: Query, hits: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON of one query's answer, the same from `headstart search --json` and the API."""
    return {
        "query": {
            "like": [describe(e) for e in q.like],
            "unlike": [describe(e) for e in q.unlike],
            "k": q.k,
            "offset": q.offset,
            "filters": q.filters.record(),
        },
        "hits": hits,
    }
