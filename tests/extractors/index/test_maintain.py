"""Index building, recall tuning on held-out queries, incremental updates, re-rank files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from extractors.common import parse_bytes
from extractors.index.ann import index_ids
from extractors.index.maintain import consistent, open_index, refresh
from extractors.index.recall import exact_topk, recall_at_k, tune
from extractors.index.rerank import Reranker
from extractors.settings import IndexSettings, SettingsError
from extractors.store.layout import VECTOR_IDS, VECTORS

DIM = 64
CENTRES = np.random.default_rng(42).standard_normal((40, DIM)).astype(np.float32)


def clustered(n: int, seed: int, centres: np.ndarray = CENTRES) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, len(centres), n)
    return centres[lab] + 0.7 * rng.standard_normal((n, DIM)).astype(np.float32)


def stream(x: np.ndarray, ids: np.ndarray, rows: int = 700):
    def batches():
        for i in range(0, len(x), rows):
            yield x[i : i + rows], ids[i : i + rows]

    return batches


def test_parse_bytes():
    assert parse_bytes("512MB") == 512 * 2**20
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert parse_bytes("4096") == 4096
    with pytest.raises(ValueError, match="512MB"):
        parse_bytes("lots")


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat", "ivf_pq"])
def test_each_kind_is_tuned_on_held_out_queries_and_meets_recall(kind: str, tmp_path: Path):
    x = clustered(4000, 0)
    ids = np.arange(len(x), dtype=np.int64) * 5 + 11
    entry = refresh(tmp_path, stream(x, ids), ids, DIM, settings=IndexSettings(kind=kind))
    ann = open_index(tmp_path, entry)
    assert entry["choice"]["kind"] == kind == ann.kind
    assert consistent(ann, ids)  # held-out rows were added after tuning
    tuning = entry["tuning"]
    if kind == "flat":
        assert tuning["recall"] == 1.0 and tuning["params"] == {}
    else:
        assert tuning["queries"] == 400 and tuning["reached"], tuning
        assert tuning["recall"] >= 0.95 and tuning["curve"]
    # Fresh queries from the same distribution: the tuned setting holds.
    queries = clustered(200, 99)
    truth = exact_topk(queries, stream(x, ids)(), 10)
    _, found = ann.search(queries, 10)
    assert recall_at_k(found, truth, 10) >= 0.93
    # Reopened memory-mapped, as the search service does: same answers.
    mapped = open_index(tmp_path, entry, mmap=True)
    assert np.array_equal(mapped.search(queries[:20], 10)[1], found[:20])


def test_incremental_add_and_remove_keep_ids_equal(tmp_path: Path):
    x = clustered(3000, 0)
    ids = np.arange(3000, dtype=np.int64)
    entry = refresh(tmp_path, stream(x, ids), ids, DIM, settings=IndexSettings(kind="ivf_flat"))
    x2 = np.concatenate([x[200:], clustered(500, 1)])
    ids2 = np.concatenate([ids[200:], 10_000 + np.arange(500)])
    entry2 = refresh(tmp_path, stream(x2, ids2), ids2, DIM, previous=entry)
    action = entry2["history"][-1]["action"]
    assert (
        action.startswith("updated in place (+500 -200)") and "recall@10 on 500 new rows" in action
    )
    assert consistent(open_index(tmp_path, entry2), ids2)
    assert len(entry2["history"]) == 2


def test_hnsw_rebuilds_on_removal_and_says_why(tmp_path: Path):
    x = clustered(2000, 0)
    ids = np.arange(2000, dtype=np.int64)
    entry = refresh(tmp_path, stream(x, ids), ids, DIM, settings=IndexSettings(kind="hnsw"))
    entry2 = refresh(tmp_path, stream(x[10:], ids[10:]), ids[10:], DIM, previous=entry)
    assert "HNSW cannot delete" in entry2["history"][-1]["action"]
    assert consistent(open_index(tmp_path, entry2), ids[10:])


def test_recall_drop_on_new_data_retunes(tmp_path: Path):
    """New rows from clusters the IVF lists were not trained on: too few probes now miss
    their neighbours, so the update re-tunes (or rebuilds) and the target holds again."""
    x = clustered(3000, 0)
    ids = np.arange(3000, dtype=np.int64)
    entry = refresh(tmp_path, stream(x, ids), ids, DIM, settings=IndexSettings(kind="ivf_flat"))
    shifted = np.random.default_rng(7).standard_normal((40, DIM)).astype(np.float32) * 1.5
    new = clustered(1500, 3, centres=shifted)
    x2, ids2 = np.concatenate([x, new]), np.concatenate([ids, 50_000 + np.arange(1500)])
    entry2 = refresh(tmp_path, stream(x2, ids2), ids2, DIM, previous=entry)
    action = entry2["history"][-1]["action"]
    assert "re-tuned" in action or action.startswith("built"), action
    ann = open_index(tmp_path, entry2)
    queries = clustered(200, 11, centres=shifted)
    truth = exact_topk(queries, stream(x2, ids2)(), 10)
    assert recall_at_k(ann.search(queries, 10)[1], truth, 10) >= 0.9


def test_unreachable_target_is_recorded_not_hidden(tmp_path: Path):
    x = clustered(2000, 0)
    ids = np.arange(2000, dtype=np.int64)
    entry = refresh(tmp_path, stream(x, ids), ids, DIM, settings=IndexSettings(kind="ivf_pq"))
    ann, queries = open_index(tmp_path, entry), clustered(100, 3)
    tuning = tune(ann, queries, exact_topk(queries, stream(x, ids)(), 10), 1.01, 10, 64)
    assert tuning.reached is False  # no setting can reach a recall above 1
    assert tuning.recall == max(p["recall"] for p in tuning.curve)
    with pytest.raises(SettingsError, match="recall"):
        IndexSettings(recall=1.01)  # and no user can ask for one


def test_exact_topk_streamed_equals_a_full_sort():
    """The streamed truth (each batch's top-k by FAISS, merged) is the top-k of one full
    score matrix, in order, however the rows are batched."""
    x, queries = clustered(2300, 0), clustered(30, 1)
    ids = np.arange(len(x), dtype=np.int64) * 3 + 1
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    full = ids[np.argsort(-(qn @ xn.T), axis=1, kind="stable")[:, :10]]
    for rows in (7, 700, 5000):
        assert np.array_equal(exact_topk(queries, stream(x, ids, rows)(), 10), full)


def test_an_ivf_pq_build_reads_the_store_once(tmp_path: Path):
    """The pass that draws the training sample and held-out rows also writes the re-rank
    file; the index is filled from that file, not by reading the store again."""
    x = clustered(3000, 0)
    ids = np.arange(len(x), dtype=np.int64)[::-1].copy()  # not sorted: order is kept
    reads = []

    def batches():
        reads.append(1)
        yield from stream(x, ids)()

    entry = refresh(tmp_path, batches, ids, DIM, settings=IndexSettings(kind="ivf_pq"))
    assert len(reads) == 1
    ann = open_index(tmp_path, entry)
    assert consistent(ann, ids)
    stored = np.load(tmp_path / VECTOR_IDS)
    assert np.array_equal(stored, ids)  # every row once, held-out ones included
    assert np.allclose(ann.reranker.vectors, x / np.linalg.norm(x, axis=1, keepdims=True))


def test_rerank_file_survives_a_crashed_append(tmp_path: Path):
    x = clustered(2000, 0)
    ids = np.arange(2000, dtype=np.int64)
    entry = refresh(tmp_path, stream(x, ids), ids, DIM, settings=IndexSettings(kind="ivf_pq"))
    # A crash after writing vectors but before the ids file: junk rows past the end.
    with open(tmp_path / VECTORS, "ab") as fh:
        fh.write(np.ones((5, DIM), np.float32).tobytes())
    x2 = np.concatenate([x, clustered(100, 5)])
    ids2 = np.concatenate([ids, 9000 + np.arange(100)])
    entry2 = refresh(tmp_path, stream(x2, ids2), ids2, DIM, previous=entry)
    rr = Reranker(tmp_path, DIM)
    assert (tmp_path / VECTORS).stat().st_size == len(np.load(tmp_path / VECTOR_IDS)) * DIM * 4
    rows = rr.rows(ids2[-100:])
    assert np.allclose(rr.vectors[rows], x2[-100:] / np.linalg.norm(x2[-100:], axis=1)[:, None])
    ann = open_index(tmp_path, entry2)
    scores, found = ann.search(x2[-3:], 1)
    assert np.array_equal(found[:, 0], ids2[-3:]) and np.allclose(scores[:, 0], 1, atol=1e-5)


def test_store_reindex_records_choice_and_keeps_search_working(built_store):
    m_before = built_store.manifest()["index"]
    assert m_before["choice"]["kind"] == "flat" and "exact scan" in m_before["choice"]["reason"]
    entry = built_store.reindex(IndexSettings(kind="hnsw"), rebuild=True)
    try:
        assert built_store.manifest()["index"]["type"] == entry["type"] == "IDMap2,HNSW32,Flat"
        assert built_store.verify() == []
        ann = built_store.index(mmap=True)
        x, meta = built_store.arrays(where_labelled=False)
        _, found = ann.search(x[:10], 1)
        assert np.array_equal(found[:, 0], meta["id"].to_numpy()[:10])
        assert set(index_ids(ann)) == set(meta["id"].to_numpy())
    finally:
        built_store.reindex(IndexSettings(kind="auto"), rebuild=True)
    assert built_store.manifest()["index"]["choice"]["kind"] == "flat"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat", "ivf_pq"])
@pytest.mark.parametrize("path", ["exact scan", "widened probes"])
def test_filtered_search_finds_the_allowed_rows_however_few(
    tmp_path: Path, kind: str, path: str, monkeypatch: pytest.MonkeyPatch
):
    """1% of the rows allowed, through the exact scan of their vectors and (a threshold of 0)
    through the index's own search with nprobe / efSearch widened by 1/sqrt(1%)."""
    from extractors.index import ann as ann_module

    if path == "widened probes":
        monkeypatch.setattr(ann_module, "EXACT_ROWS", 0)
        monkeypatch.setattr(ann_module, "HNSW_EXACT", 0)
    x = clustered(3000, 0)
    ids = np.arange(3000, dtype=np.int64) * 7 + 3
    entry = refresh(tmp_path, stream(x, ids), ids, DIM, settings=IndexSettings(kind=kind))
    ann = open_index(tmp_path, entry, mmap=True)
    allowed = ids[np.random.default_rng(1).choice(3000, 30, replace=False)]  # 1% of rows
    queries = clustered(5, 9)
    _, found = ann.search(queries, 10, allowed=allowed)
    assert np.isin(found, allowed).all()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    pos = np.searchsorted(ids, allowed)
    truth = allowed[np.argsort(-(qn @ xn[pos].T), axis=1)[:, :10]]
    # The filter is applied before the top-k. Widened probes are approximate (bench/search.py
    # measures them at 1M rows: 0.999); a graph walk that skips 99% of its nodes is the
    # weakest, why HNSW scans up to HNSW_EXACT allowed rows exactly.
    floor = 0.9 if path == "widened probes" else 0.95
    assert recall_at_k(found, truth, 10) >= floor
    few = ann.search(queries, 10, allowed=allowed[:3])[1]
    assert (few[:, :3] >= 0).all() and (few[:, 3:] == -1).all()  # all 3, then nothing
    assert (ann.search(queries, 10, allowed=allowed[:0])[1] == -1).all()


def test_a_store_grown_tenfold_keeps_recall_on_its_old_queries(tmp_path: Path):
    """The build's held-out rows stay the store's recall queries: after each update they are
    asked again (their own row left out), and the target holds on the old region while the
    store grows 10x with a new cluster, whatever the update had to do for it."""
    from extractors.index.maintain import old_recall

    x = clustered(2000, 0)
    ids = np.arange(2000, dtype=np.int64)
    entry = refresh(tmp_path, stream(x, ids), ids, DIM, settings=IndexSettings(kind="ivf_flat"))
    held = entry["held_out"]
    assert len(held) >= 20 and set(held) <= set(ids.tolist())
    far = np.random.default_rng(5).standard_normal((40, DIM)).astype(np.float32) * 1.5
    actions = []
    for step in range(3):  # 2,000 -> 20,000 rows, the new ones all from a new cluster set
        new = clustered(6000, 10 + step, centres=far)
        x = np.concatenate([x, new])
        ids = np.concatenate([ids, 100_000 * (step + 1) + np.arange(6000)])
        entry = refresh(tmp_path, stream(x, ids), ids, DIM, previous=entry)
        action = entry["history"][-1]["action"]
        assert "older rows" in action or action.startswith("built"), action
        if action.startswith("built"):  # retrained on the grown store: queries drawn anew
            held = entry["held_out"]
        else:
            assert entry["held_out"] == held  # the same queries, drawn once
            assert entry["tuning"]["old_rows_recall"] >= 0.95
        actions.append(action)
    assert any("older rows" in a for a in actions), actions  # measured, not only rebuilt
    ann = open_index(tmp_path, entry)
    assert old_recall(ann, stream(x, ids), np.array(entry["held_out"])) >= 0.95
    # Rows deleted: the queries that left are replaced from the older rows, never new ones.
    keep = ~np.isin(ids, held[:10])
    entry = refresh(tmp_path, stream(x[keep], ids[keep]), ids[keep], DIM, previous=entry)
    assert len(entry["held_out"]) == len(held) and not set(held[:10]) & set(entry["held_out"])


def test_old_query_recall_leaves_the_query_row_out() -> None:
    from extractors.index.maintain import _without

    found = np.array([[5, 1, 2], [9, 3, 7]])
    assert _without(found, np.array([5, 3]), 2).tolist() == [[1, 2], [9, 7]]


def test_the_last_filter_selector_is_reused_only_for_the_same_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Paging through one filter reuses FAISS's selector; another filter (or the same ids
    unsorted) gets the right rows, never the kept selector's."""
    from extractors.index import ann as ann_module

    monkeypatch.setattr(ann_module, "EXACT_ROWS", 0)  # through the IVF selector
    x = clustered(3000, 0)
    ids = np.arange(3000, dtype=np.int64) * 7 + 3
    entry = refresh(tmp_path, stream(x, ids), ids, DIM, settings=IndexSettings(kind="ivf_flat"))
    ann = open_index(tmp_path, entry, mmap=True)
    rng = np.random.default_rng(2)
    a = np.sort(rng.choice(ids, 60, replace=False))
    b = np.sort(rng.choice(np.setdiff1d(ids, a), 60, replace=False))
    q = clustered(4, 5)
    first = ann.search(q, 10, allowed=a)[1]
    kept = ann._kept_selector[1]
    assert np.array_equal(ann.search(q, 10, allowed=a.copy())[1], first)
    assert ann._kept_selector[1] is kept  # same ids, same selector
    other = ann.search(q, 10, allowed=b)[1]
    assert np.isin(other, b).all() and not np.isin(other, a).any()
    assert np.array_equal(ann.search(q, 10, allowed=a[::-1].copy())[1], first)
