"""The index kind chosen for a store's size, dimension and memory budget (index/kinds.py)."""

from __future__ import annotations

import pytest

from extractors.common import parse_bytes
from extractors.index.kinds import choose


def test_choice_follows_size_and_budget():
    assert choose(5_000, 1280).kind == "flat"
    hnsw = choose(100_000, 1280, "2GB")
    assert hnsw.kind == "hnsw" and "fits" in hnsw.reason
    pq = choose(1_000_000, 1280, "2GB")
    assert pq.kind == "ivf_pq" and 1280 % pq.m == 0 and pq.memory_bytes <= parse_bytes("2GB")
    assert "exceed" in pq.reason and pq.disk_bytes == 1_000_000 * 1280 * 4
    # Room for the vectors but not for the HNSW graph on top of them.
    ivf = choose(1_000_000, 1280, 1_000_000 * (1280 * 4 + 100))
    assert ivf.kind == "ivf_flat" and ivf.nlist == 2048
    assert choose(5_000, 1280, kind="ivf_pq").reason == "asked for ivf_pq"
    with pytest.raises(ValueError, match="unknown index kind"):
        choose(10, 8, kind="annoy")
