"""A store's rows for search over a real store: the shared rows file (memory-mapped, refused
when stale), filters against a brute-force reading of the Parquet, and paths that are not
UTF-8 found by path and by prefix."""

from __future__ import annotations

import os
import shutil

import pyarrow.compute as pc
import pytest

from extractors.search.filters import Filters
from extractors.search.query import Example, NotFound, Query, QueryError
from extractors.search.rows import Rows, read_rows
from extractors.search.searcher import searcher_for
from extractors.store.layout import EMBEDDINGS, ROWS
from extractors.store.store import Store


def test_the_rows_file_is_mapped_and_refused_once_the_parquet_changes(built_store, tmp_path):
    shared = read_rows(built_store.path, built_store.path / EMBEDDINGS)
    assert shared is not None and shared.num_rows == 100
    assert shared["label"].type.value_type == "string"  # dictionary-encoded
    plain = Rows(built_store.table(["id", "path", "label", "split", "width", "height",
                                    "bytes", "mtime_ns"]), "/")  # fmt: skip
    mapped = Rows(shared, "/")
    for i in plain.ids[::7]:
        assert mapped.get(int(i)) == plain.get(int(i))
        assert mapped.parquet_row(int(i)) == plain.parquet_row(int(i))
    copy = Store(shutil.copytree(built_store.path, tmp_path / "s"))
    parquet = copy.path / EMBEDDINGS
    os.utime(parquet, ns=(1, 1))  # as if rewritten after rows.arrow
    assert read_rows(copy.path, parquet) is None
    searcher = searcher_for(copy)  # falls back to the Parquet, answers the same
    row = plain.get(int(plain.ids[3]))
    got = searcher.run(Query([Example(id=row["id"])], k=3))
    assert got["hits"] and str(row["id"]) not in [h["id"] for h in got["hits"]]
    (copy.path / ROWS).write_bytes(b"not arrow")
    assert read_rows(copy.path, parquet) is None


def test_filters_select_exactly_the_rows_the_parquet_says(built_store) -> None:
    meta = built_store.table(["id", "path", "label", "split"])
    rows = searcher_for(built_store).rows
    root = built_store.manifest()["source"]["root"]

    def ids_where(mask) -> list[int]:
        return sorted(meta.filter(mask)["id"].to_pylist())

    cases = [
        (Filters(label="2"), pc.equal(meta["label"], "2")),
        (Filters(split="test"), pc.equal(meta["split"], "test")),
        (Filters(label="1", split="val"),
         pc.and_(pc.equal(meta["label"], "1"), pc.equal(meta["split"], "val"))),
        (Filters(path_prefix="3/"), pc.starts_with(meta["path"], f"{root}/3/")),
        (Filters(path_prefix=f"{root}/0/digit_00"),
         pc.starts_with(meta["path"], f"{root}/0/digit_00")),
    ]  # fmt: skip
    for f, mask in cases:
        assert sorted(rows.allowed(f).tolist()) == ids_where(mask), f
    some = meta["id"].to_pylist()[:9]
    assert sorted(rows.allowed(Filters(ids=(*some, 42))).tolist()) == sorted(some)
    assert rows.allowed(Filters()) is None
    with pytest.raises(QueryError, match="no label 'cat' in this store; it has 0, 1, 2, 3"):
        rows.allowed(Filters(label="cat"))
    with pytest.raises(NotFound):
        rows.allowed(Filters(ids=(42,)))


def test_paths_that_are_not_utf8_are_found_by_path_and_by_prefix(digits_dir, backbone, tmp_path):
    """Stored as file:// URIs (`layout.stored_path`), under a source root that is one too."""
    from extractors.embedding.sources import read_source
    from extractors.store.layout import os_path, stored_path

    parent = tmp_path / "data"
    root = parent / os.fsdecode(b"r\xe9")  # every row's path, and the root, are file:// URIs
    odd = os.fsdecode(b"caf\xe9.png")
    for label in ("0", "1"):
        (root / label).mkdir(parents=True)
        for f in sorted((digits_dir / label).iterdir())[:2]:
            shutil.copy(f, root / label / f.name)
    shutil.copy(next((digits_dir / "1").iterdir()), root / "1" / odd)
    store = Store(tmp_path / "store")
    store.update(read_source(root), backbone, progress=False)
    rows = searcher_for(store).rows
    assert rows.root.startswith("file://") and len(rows) == 5
    stored = stored_path(str(root / "1" / odd))
    assert stored.startswith("file://") and stored in rows.table["path"].to_pylist()
    rid = rows.by_path(stored)  # the stored value, as it is
    assert rows.get(rid)["path"] == stored and os_path(stored) == str(root / "1" / odd)
    assert rows.by_path(str(root / "1" / odd)) == rid  # the OS path
    assert rows.by_path(f"1/{odd}") == rid  # relative to the root
    with pytest.raises(NotFound):
        rows.by_path("1/cafe.png")
    ones = {rid, *(rows.by_path(str(root / "1" / f.name))
                   for f in sorted((digits_dir / "1").iterdir())[:2])}  # fmt: skip

    def under(prefix: str) -> set[int]:
        allowed = rows.allowed(Filters(path_prefix=prefix))
        return set(rows.ids.tolist()) if allowed is None else set(allowed.tolist())

    everything = set(rows.ids.tolist())
    for prefix in ("/", f"{parent}/", str(parent), f"{root}/", stored_path(f"{root}/"), "."):
        assert under(prefix) == everything, prefix
    for prefix in (f"{root}/1/", "1/", "./1", stored_path(f"{root}/1/"), f"1/{odd[:4]}"):
        assert under(prefix) >= {rid} and under(prefix) <= ones, prefix
    assert under("1/") == ones and under(f"1/{odd[:4]}") == {rid}
    assert len(under("0/")) == 2
