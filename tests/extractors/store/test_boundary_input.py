"""Input typed at the boundary: file and class names that are not UTF-8, manifests' column
types (NaN, floats, numbers as paths) in CSV and Parquet alike, the same file listed twice."""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from extractors.embedding.images import file_sha256
from extractors.embedding.sources import SourceError, read_source
from extractors.store.layout import os_path, stored_path
from extractors.store.store import Store


def _digits(digits_dir: Path, label: str, n: int) -> list[Path]:
    return sorted((digits_dir / label).iterdir())[:n]


def test_stored_paths_round_trip() -> None:
    plain = "/data/ĉaŭ 猫/a b.png"
    assert stored_path(plain) == plain and os_path(plain) == plain
    odd = os.fsdecode(b"/data/caf\xe9/img\xff%1.png")
    stored = stored_path(odd)
    assert stored == "file:///data/caf%E9/img%FF%251.png"
    assert stored.encode("utf-8") and os_path(stored) == odd


def test_names_that_are_not_utf8_are_embedded_and_stay_unchanged(
    digits_dir: Path, backbone, tmp_path: Path
) -> None:
    root = tmp_path / "src"
    odd_class = os.fsdecode(b"caf\xe9")  # a Latin-1 folder name from an old share
    for label, cls in (("0", "plain"), ("1", odd_class)):
        (root / cls).mkdir(parents=True)
        for i, f in enumerate(_digits(digits_dir, label, 5)):
            name = os.fsdecode(b"img\xff%d.png" % i) if i % 2 else f"img{i}.png"
            shutil.copy(f, root / cls / name)
    store = Store(tmp_path / "store")
    report = store.update(read_source(root), backbone, progress=False)
    assert (report.rows, report.failed, report.embedded) == (10, 0, 10)
    rows = store.table(["path", "sha256", "label"]).to_pylist()
    assert Counter(r["label"] for r in rows) == {"plain": 5, "caf\\xe9": 5}
    odd = [r for r in rows if r["path"].startswith("file://")]
    assert len(odd) == 2 + 5  # the \xff file names, and every file of the \xe9 class
    for r in rows:  # each stored path opens the very file that was embedded
        assert file_sha256(os_path(r["path"])) == r["sha256"]
        assert os.path.isfile(os_path(r["path"]))
    assert store.unchanged(read_source(root), backbone.name)
    again = store.update(read_source(root), backbone, progress=False)
    assert (again.embedded, again.kept, again.failed) == (0, 10, 0)
    # The store's own table, used as a manifest, lists the very same files and labels.
    manifest = tmp_path / "rows.parquet"
    pq.write_table(store.table(["path", "label"]), manifest)
    listed = {(r.path, r.label) for r in read_source(manifest).records}
    assert listed == {(r["path"], r["label"]) for r in rows}


def test_the_same_manifest_as_csv_or_parquet_gives_the_same_store(
    digits_dir: Path, backbone, tmp_path: Path
) -> None:
    files = _digits(digits_dir, "0", 18) + _digits(digits_dir, "1", 18)
    n = len(files)
    labels = [0.0] * 18 + [1.0] * 18
    labels[5] = math.nan  # a missing label: unlabelled, not a class "nan"
    groups = [float(i // 2) if i % 6 == 0 else math.nan for i in range(n)]  # mostly missing
    parquet = tmp_path / "m.parquet"
    pq.write_table(
        pa.table({"path": [str(f) for f in files], "label": labels, "group": groups}), parquet
    )
    # The same table as pandas writes it to CSV (floats as 1.0, NaN as an empty cell).
    csv = tmp_path / "m.csv"
    lines = ["path,label,group"] + [
        f"{f},{'' if math.isnan(lab) else lab},{'' if math.isnan(g) else g}"
        for f, lab, g in zip(files, labels, groups, strict=True)
    ]
    csv.write_text("\n".join(lines) + "\n")
    a, b = read_source(parquet), read_source(csv)
    assert a.records == b.records
    by_path = {r.path: r for r in a.records}
    first = by_path[str(files[0].resolve())]
    assert (first.label, first.group) == ("0", "0")  # whole floats as a person writes them
    assert by_path[str(files[5].resolve())].label is None
    assert sum(r.group is None for r in a.records) == n - 6  # NaN is no group, not one group
    stores = [Store(tmp_path / "pq"), Store(tmp_path / "csv")]
    for store, src in zip(stores, (a, b), strict=True):
        store.update(src, backbone, progress=False)
    one, two = (s.table(["path", "label", "split"]).to_pylist() for s in stores)
    assert sorted(one, key=str) == sorted(two, key=str)
    assert stores[0].manifest()["classes"] == ["0", "1"]
    splits = stores[0].manifest()["splits"]
    assert splits["train"] > splits["test"] >= 4 and splits["val"] >= 4, splits


def test_manifest_columns_of_the_wrong_type_are_refused(tmp_path: Path) -> None:
    for column, kind in (
        (pa.array([1, 2], pa.int64()), "int64"),
        (pa.array([["a.png"], ["b.png"]]), "list<.*: string>"),
    ):
        path = tmp_path / "m.parquet"
        pq.write_table(pa.table({"path": column, "label": ["a", "b"]}), path)
        with pytest.raises(SourceError, match=f"column 'path' holds {kind}, not text"):
            read_source(path)
    pq.write_table(pa.table({"path": ["a.png"], "label": pa.array([[1]])}), path)
    with pytest.raises(SourceError, match=r"column 'label' holds list<.*: int64>"):
        read_source(path)


def test_csv_cells_are_the_text_a_person_wrote(tmp_path: Path) -> None:
    from PIL import Image

    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / f"{name}.png")
    csv = tmp_path / "m.csv"
    # A BOM (Excel), a blank row, a row of empty cells, labels that look like other types.
    csv.write_bytes(
        "\ufeffpath,label,split\na.png,007,\n\n,,\nb.png,NA,Train\n"
        "c.png, true ,\nd.png,,\n".encode()
    )
    src = read_source(csv)
    got = {Path(r.path).name: (r.label, r.split) for r in src.records}
    assert got == {
        "a.png": ("007", None),
        "b.png": ("NA", "train"),
        "c.png": ("true", None),
        "d.png": (None, None),
    }
    csv.write_text("PATH , Label\na.png,cat\n")  # a spreadsheet's header
    assert [r.label for r in read_source(csv).records] == ["cat"]
    csv.write_text("path,label,Label\na.png,cat,dog\n")
    with pytest.raises(SourceError, match="more than one 'label' column"):
        read_source(csv)
    pq.write_table(
        pa.table({"path": ["a.png", "b.png"], "label": [True, False]}), tmp_path / "m.parquet"
    )
    assert [r.label for r in read_source(tmp_path / "m.parquet").records] == ["True", "False"]


def test_one_file_with_two_labels_is_an_error(tmp_path: Path) -> None:
    from PIL import Image

    for name in ("a", "b"):
        Image.new("RGB", (8, 8), "red" if name == "a" else "blue").save(tmp_path / f"{name}.png")
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\na.png,cat\nb.png,dog\na.png,cat\n")
    assert len(read_source(csv).records) == 2  # the same row twice is one image
    csv.write_text("path,label\na.png,cat\nb.png,dog\n./a.png,dog\n")
    with pytest.raises(
        SourceError, match=r"1 file\(s\) with conflicting labels.*a\.png -> cat, dog"
    ):
        read_source(csv)
    folders = tmp_path / "classes"
    (folders / "cat").mkdir(parents=True)
    shutil.copy(tmp_path / "a.png", folders / "cat" / "a.png")
    (folders / "cat" / "same.png").symlink_to(folders / "cat" / "a.png")  # one file, one label
    assert len(read_source(folders).records) == 1
    (folders / "kitten").symlink_to(folders / "cat", target_is_directory=True)
    with pytest.raises(SourceError, match=r"cat/a\.png -> cat, kitten"):
        read_source(folders)


def test_duplicates_are_counted_apart_and_a_rerun_is_unchanged(
    digits_dir: Path, backbone, tmp_path: Path
) -> None:
    root = tmp_path / "src"
    for label in ("0", "1"):
        (root / label).mkdir(parents=True)
        for f in _digits(digits_dir, label, 4):
            shutil.copy(f, root / label / f.name)
    first = sorted((root / "0").iterdir())[0]
    shutil.copy(first, root / "0" / "zz_copy.png")  # same bytes, another name
    store = Store(tmp_path / "store")
    report = store.update(read_source(root), backbone, progress=False)
    assert (report.rows, report.failed, report.duplicates) == (8, 0, 1)
    assert store.manifest()["failures"] == 0 and store.manifest()["duplicates"] == 1
    (reason,) = store.failures()["reason"].to_pylist()
    assert reason == f"duplicate content of {first.resolve()}"
    copy = str((root / "0" / "zz_copy.png").resolve())
    opened: list[str] = []  # the duplicate is compared by its stat, never read again
    watching = [True]

    def hook(event: str, args: tuple) -> None:
        if watching[0] and event == "open" and str(args[0]) == copy:
            opened.append(event)

    sys.addaudithook(hook)  # hooks cannot be removed: `watching` turns it off
    try:
        assert store.unchanged(read_source(root), backbone.name)
    finally:
        watching[0] = False
    assert not opened
    again = store.update(read_source(root), backbone, progress=False)
    assert (again.embedded, again.failed, again.duplicates) == (0, 0, 1)
    other = _digits(digits_dir, "2", 1)[0]
    (root / "0" / "zz_copy.png").write_bytes(other.read_bytes())  # now an image of its own
    assert not store.unchanged(read_source(root), backbone.name)


def test_embed_twice_through_the_cli_odd_names_and_duplicates(
    digits_dir: Path, tmp_path: Path, mlflow_tmp: str
) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    root = tmp_path / "src"
    for label in ("0", "1"):
        folder = root / os.fsdecode(b"c\xff" + label.encode())
        folder.mkdir(parents=True)
        for i, f in enumerate(_digits(digits_dir, label, 4)):
            shutil.copy(f, folder / os.fsdecode(b"i\xfe%d.png" % i))
    shutil.copy(f, folder / "copy.png")  # a duplicate of the last one
    args = ["embed", str(root), "--workspace", str(tmp_path / "ws")]
    outputs = []
    for _ in range(2):
        res = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
        assert res.exit_code == 0, res.output + repr(res.exception)
        outputs.append(res.output)
    assert "8 images (8 embedded now, 0 unchanged, 0 removed, 0 failed, 1 duplicate)" in outputs[0]
    assert "8 images (0 embedded now, 8 unchanged, 0 removed, 0 failed, 1 duplicate)" in outputs[1]
    assert "(unchanged)" in outputs[1]
