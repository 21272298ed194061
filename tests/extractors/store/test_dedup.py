"""Near-duplicate groups on a real store: planted re-encoded and resized copies of real photos."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from extractors.settings import IndexSettings
from extractors.store.dedup import near_duplicate_groups, write_groups
from extractors.store.store import StoreError


def test_planted_near_duplicates_are_grouped_and_nothing_else(planted, tmp_path: Path) -> None:
    store, copies = planted
    groups = near_duplicate_groups(store)  # default threshold 0.95
    found = {}
    for g in set(groups["group"].to_pylist()):
        paths = [r["path"] for r in groups.to_pylist() if r["group"] == g]
        assert len(paths) == 2, paths  # exactly the photo and its copy
        found[max(paths, key=len)] = min(paths, key=len)
    assert found == copies
    rows = groups.to_pylist()
    assert all(0.95 <= r["similarity"] <= 1.0001 and r["size"] == 2 for r in rows)

    out = write_groups(groups, tmp_path / "dups.parquet")
    assert pq.read_table(out).num_rows == 6
    csv = write_groups(groups, tmp_path / "dups.csv")
    assert csv.read_text().splitlines()[0].startswith('"group","size","id","path"')


def test_threshold_is_checked(planted) -> None:
    store, _ = planted
    with pytest.raises(StoreError, match="cosine similarity"):
        near_duplicate_groups(store, threshold=1.5)
    assert near_duplicate_groups(store, threshold=1.0).num_rows == 0  # no exact duplicates


def test_same_groups_when_the_store_index_is_hnsw(planted) -> None:
    """HNSW has no range search: dedup then scans an exact copy, with the same result."""
    store, _ = planted
    before = near_duplicate_groups(store).to_pylist()
    store.reindex(IndexSettings(kind="hnsw"), rebuild=True)
    try:
        assert store.index().kind == "hnsw"
        assert near_duplicate_groups(store).to_pylist() == before
    finally:
        store.reindex(IndexSettings(kind="auto"), rebuild=True)
