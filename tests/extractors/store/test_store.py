"""The store: Parquet + manifest + FAISS round trip, incremental updates, bad files, locking."""

from __future__ import annotations

import shutil

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from extractors.embedding.sources import read_source
from extractors.index import ann as faiss_index
from extractors.store.layout import EMBEDDINGS, content_id, embedding_matrix
from extractors.store.store import Store, StoreError


def test_parquet_schema_and_readers(built_store) -> None:
    path = built_store.path / EMBEDDINGS
    con = duckdb.connect()
    cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM '{path}'").fetchall()]
    assert cols[:8] == ["id", "path", "sha256", "label", "split", "width", "height", "bytes"]
    assert "embedding" in cols
    n, dim = con.execute(f"SELECT count(*), max(len(embedding)) FROM '{path}'").fetchone()
    assert n == 100 and dim == 1280
    assert pl.read_parquet(path)["embedding"].dtype == pl.Array(pl.Float32, 1280)
    assert len(pd.read_parquet(path)) == 100
    table = pq.read_table(path)
    ids = table["id"].to_pylist()
    assert len(set(ids)) == len(ids)
    assert all(content_id(s) == i for s, i in zip(table["sha256"].to_pylist(), ids, strict=True))
    assert set(table["split"].to_pylist()) == {"train", "val", "test"}


def test_manifest(built_store) -> None:
    m = built_store.manifest()
    assert m["backbone"] == "efficientnet_lite0" and m["dim"] == 1280 and m["rows"] == 100
    assert m["classes"] == ["0", "1", "2", "3"]
    assert m["preprocessing"]["interpolation"] == "bicubic"
    assert sum(m["splits"].values()) == 100


def test_faiss_ids_equal_parquet_ids(built_store) -> None:
    index = built_store.index()
    ids = built_store.table(["id"])["id"].to_numpy()
    assert index.ntotal == len(ids)
    assert np.array_equal(faiss_index.index_ids(index), ids)


def test_search_returns_query_first(built_store) -> None:
    emb, meta = built_store.arrays(where_labelled=False)
    scores, ids = faiss_index.search(built_store.index(), emb[:5], k=3)
    assert np.array_equal(ids[:, 0], meta["id"].to_numpy()[:5])
    assert np.allclose(scores[:, 0], 1.0, atol=1e-4)


def _copy_store_source(digits_dir, tmp_path):
    src_dir = tmp_path / "src"
    shutil.copytree(digits_dir, src_dir)
    return src_dir


def test_incremental_updates(digits_dir, backbone, tmp_path) -> None:
    src_dir = _copy_store_source(digits_dir, tmp_path)
    store = Store(tmp_path / "store")
    first = store.update(read_source(src_dir), backbone, progress=False)
    assert first.embedded == 100 and first.rows == 100
    before = store.table()

    again = store.update(read_source(src_dir), backbone, progress=False)
    assert again.embedded == 0 and again.kept == 100
    assert store.table().equals(before)  # idempotent

    victim = sorted((src_dir / "0").iterdir())[0]
    victim.unlink()
    changed = sorted((src_dir / "1").iterdir())[0]
    Image.open(changed).rotate(90).save(changed)
    Image.new("RGB", (20, 20), "white").save(src_dir / "2" / "new.png")
    third = store.update(read_source(src_dir), backbone, progress=False)
    assert (third.embedded, third.removed, third.rows) == (2, 1, 100)  # changed = re-embedded
    paths = set(store.table(["path"])["path"].to_pylist())
    assert str(victim) not in paths and str(src_dir / "2" / "new.png") in paths
    old_split = dict(zip(before["path"].to_pylist(), before["split"].to_pylist(), strict=True))
    now = store.table(["path", "split"])
    for p, s in zip(now["path"].to_pylist(), now["split"].to_pylist(), strict=True):
        if p in old_split and p != str(changed):
            assert old_split[p] == s  # splits of kept rows never move
    assert np.array_equal(
        faiss_index.index_ids(store.index()), store.table(["id"])["id"].to_numpy()
    )


def test_bad_files_are_recorded_and_skipped(digits_dir, backbone, tmp_path) -> None:
    src_dir = _copy_store_source(digits_dir, tmp_path)
    (src_dir / "0" / "empty.png").write_bytes(b"")
    (src_dir / "0" / "text.jpg").write_text("not an image")
    shutil.copy(next((src_dir / "1").iterdir()), src_dir / "1" / "zz_copy.png")
    store = Store(tmp_path / "store")
    report = store.update(read_source(src_dir), backbone, progress=False)
    assert report.rows == 100 and report.failed == 2 and report.duplicates == 1
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in store.failures().to_pylist()}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert "not an image" in reasons["text.jpg"]
    assert reasons["zz_copy.png"].startswith("duplicate content of")
    assert store.manifest()["failures"] == 2 and store.manifest()["duplicates"] == 1


def test_other_backbone_is_refused(built_store) -> None:
    with pytest.raises(StoreError, match="was built with backbone efficientnet_lite0"):
        built_store.check_backbone("torchvision:resnet50")


def test_second_writer_is_refused(built_store) -> None:
    with built_store.lock(), pytest.raises(StoreError, match="another headstart process"):  # noqa: SIM117
        with Store(built_store.path).lock():
            pass


def test_broken_index_is_rebuilt(built_store, tmp_path) -> None:
    store = Store(tmp_path / "copy")
    shutil.copytree(built_store.path, store.path)
    faiss_index.write_index(
        faiss_index.flat_copy([(np.ones((1, 1280), np.float32), np.array([7]))], 1280),
        store.path / "index.faiss",
    )
    assert store.index_if_consistent() is None
    assert any("ids differ" in p for p in store.verify())
    with pytest.warns(UserWarning, match="rebuilt"):
        assert store.index().ntotal == 100  # rebuilt on first use, under the lock, and said
    assert store.index_if_consistent() is not None and store.verify() == []


def test_layers_are_extra_columns_from_one_pass(layered_store, built_store, backbone) -> None:
    table = layered_store.table()
    assert layered_store.features() == ["embedding", "emb_blocks_4", "emb_blocks_6"]
    assert table.schema.field("emb_blocks_4").type.list_size == 112
    assert table.schema.field("emb_blocks_6").type.list_size == 320
    assert layered_store.manifest()["layers"]["emb_blocks_6"] == {"module": "blocks.6", "dim": 320}
    # the penultimate embedding is the same as in a store without layers
    a = built_store.table(["path", "embedding"]).sort_by("path")
    b = table.select(["path", "embedding"]).sort_by("path")
    assert np.allclose(embedding_matrix(a), embedding_matrix(b), atol=1e-4)
    assert layered_store.verify() == []
    with pytest.raises(StoreError, match="holds layer columns"):
        layered_store.check_layers({})


def test_unknown_layer_is_a_clear_error(backbone) -> None:
    from extractors.embedding.backbones import BackboneError, create_backbone

    bb = create_backbone("efficientnet_lite0", device="cpu")
    with pytest.raises(BackboneError, match="stages"):
        bb.set_layers(["-9"])
    with pytest.raises(BackboneError, match="no layer 'nope'"):
        bb.set_layers(["nope"])


def test_unchanged_is_read_only_and_sees_every_change(digits_dir, backbone, tmp_path) -> None:
    """`unchanged` (the fast path of a re-run) holds only when an update would change nothing,
    writes nothing, and turns false for a new, touched, relabelled or deleted file."""
    import os

    src = tmp_path / "digits"
    shutil.copytree(digits_dir, src)
    store = Store(tmp_path / "store")
    store.update(read_source(src), backbone, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in store.path.iterdir()}
    assert store.unchanged(read_source(src), "efficientnet_lite0")
    assert {p.name: p.stat().st_mtime_ns for p in store.path.iterdir()} == before
    assert not store.unchanged(read_source(src), "timm:resnet50")
    assert not store.unchanged(read_source(src), "efficientnet_lite0", layers=["-2"])

    one = sorted((src / "1").iterdir())[0]
    os.utime(one, ns=(one.stat().st_atime_ns, one.stat().st_mtime_ns + 10**9))
    assert not store.unchanged(read_source(src), "efficientnet_lite0")  # touched: re-hash
    store.update(read_source(src), backbone, progress=False)
    assert store.unchanged(read_source(src), "efficientnet_lite0")
    shutil.move(one, src / "2" / one.name)  # relabelled
    assert not store.unchanged(read_source(src), "efficientnet_lite0")
    (src / "2" / one.name).unlink()  # deleted
    assert not store.unchanged(read_source(src), "efficientnet_lite0")
    Image.new("RGB", (9, 9)).save(src / "3" / "new.png")  # new (and one fewer)
    assert not store.unchanged(read_source(src), "efficientnet_lite0")
