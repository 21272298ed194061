"""Image sources and the stratified split."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from extractors.embedding.sources import SourceError, read_source, stratified_split


def _img(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)


def test_class_folders(tmp_path) -> None:
    for cls in ("cat", "dog"):
        for i in range(3):
            _img(tmp_path / cls / "sub" / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    src = read_source(tmp_path)
    assert src.kind == "folders" and len(src.records) == 6
    assert Counter(r.label for r in src.records) == {"cat": 3, "dog": 3}


def test_unlabelled_nested_folder(tmp_path) -> None:
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "deeper" / "b.webp")
    src = read_source(tmp_path)
    assert src.kind == "unlabelled" and not src.labelled and len(src.records) == 2


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest(tmp_path, fmt) -> None:
    _img(tmp_path / "imgs" / "x.png")
    _img(tmp_path / "imgs" / "y.png")
    table = pa.table(
        {"path": ["imgs/x.png", "imgs/y.png"], "label": ["a", "b"], "split": ["train", "test"]}
    )
    path = tmp_path / f"m.{fmt}"
    if fmt == "csv":
        path.write_text("path,label,split\nimgs/x.png,a,train\nimgs/y.png,b,test\n")
    else:
        pq.write_table(table, path)
    src = read_source(path)
    assert src.kind == "manifest"
    assert [(r.label, r.split) for r in src.records] == [("a", "train"), ("b", "test")]
    assert all(r.path.startswith(str(tmp_path)) for r in src.records)


def test_bad_sources_say_what_to_do(tmp_path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        read_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images found"):
        read_source(tmp_path / "empty")
    (tmp_path / "m.csv").write_text("file,label\nx.png,a\n")
    with pytest.raises(SourceError, match="no 'path' column"):
        read_source(tmp_path / "m.csv")
    (tmp_path / "s.csv").write_text("path,label,split\nx.png,a,holdout\n")
    with pytest.raises(SourceError, match="split 'holdout'"):
        read_source(tmp_path / "s.csv")


def test_stratified_split_is_seeded_and_stratified() -> None:
    keys = [f"k{i}" for i in range(100)]
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    s1 = stratified_split(keys, labels, seed=1)
    assert s1 == stratified_split(keys, labels, seed=1)
    assert s1 != stratified_split(keys, labels, seed=2)
    for cls, n in (("a", 50), ("b", 30), ("c", 20)):
        got = Counter(s for s, lab in zip(s1, labels, strict=True) if lab == cls)
        assert got["test"] == round(n * 0.2) and got["val"] == round(n * 0.2)
    tiny = stratified_split(["x", "y", "z"], ["a", "a", "a"])
    assert sorted(tiny) == ["test", "train", "val"]
