"""A store's rows for search: the row metadata as Arrow columns (`Rows`), not Python objects,
looked up by id or path and filtered (`Rows.allowed`: the ids a query's `Filters` let through).

About 120 bytes a row at the paths of a real collection, against ~1 kB for a dict per row;
rows.arrow (`write_rows`, `read_rows`) keeps the table memory-mapped and shared by every
process that reads the store.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from extractors.embedding.objects import is_url
from extractors.search.filters import MAX_IDS, Filters
from extractors.search.query import NotFound, QueryError
from extractors.store.layout import FILE_URI, os_path, stored_path

ROW_COLUMNS = ["id", "path", "label", "split", "width", "height", "bytes", "mtime_ns"]
STAMP = b"headstart.parquet"  # schema metadata of rows.arrow: the Parquet's size and mtime


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

    def __init__(self, table: pa.Table, root: str) -> None:
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
        if path.startswith(FILE_URI) or is_url(path):
            candidate = path
        elif is_url(self.root):  # an object's key relative to the source's prefix
            candidate = f"{self.root.rstrip('/')}/{path.lstrip('/')}"
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
        matches every absolute path and `cat//` is `cat/`. A stored file:// value is decoded;
        a URL (s3://bucket/cats/) is compared as it is, and a relative one joins a URL root."""
        if is_url(text):
            return text
        if is_url(self.root):
            return f"{self.root.rstrip('/')}/{text.lstrip('/')}"
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
