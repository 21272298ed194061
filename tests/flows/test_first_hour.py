"""A new user's first hour (issue 29): a command that picks a store for the user says which and
picks one that can serve it, an error names the file it is about, and a split that leaks is
said plainly, measured at the grouping's own threshold."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from extractors.embedding.sources import read_source
from extractors.store.dedup import groups_table, leak_check, leaks, split_groups
from extractors.store.grouping import Grouping
from extractors.store.store import Store, StoreError
from extractors.workspace import resolve_store
from flows.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def copies_across_splits(backbone, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A photo and three edited copies of it (smaller, brighter, cropped, re-encoded) in train,
    val and test (as a small set's split put them), in a class of five; three other photos in
    a second class."""
    from skimage import data

    root = tmp_path_factory.mktemp("copies")
    rows = []
    cat = Image.fromarray(data.chelsea()).convert("RGB")
    w, h = cat.size
    cat.save(root / "cat.png")  # its copies score 0.89-0.97 against it and each other
    cat.resize((w // 2, h // 2)).save(root / "cat_small.jpg", quality=60)
    brighter = ImageEnhance.Brightness(cat.resize((w * 7 // 10, h * 7 // 10))).enhance(1.25)
    brighter.save(root / "cat_q80.jpg", quality=80)
    cat.crop((w // 20, h // 20, w - w // 20, h - h // 20)).save(root / "cat_q70.jpg", quality=70)
    rows += [("cat.png", "cat", "train"), ("cat_small.jpg", "cat", "val")]
    rows += [("cat_q80.jpg", "cat", "test"), ("cat_q70.jpg", "cat", "test")]
    for name, label, split in (
        ("coffee", "cat", "train"),
        ("astronaut", "other", "train"),
        ("rocket", "other", "val"),
        ("camera", "other", "test"),
    ):
        Image.fromarray(getattr(data, name)()).convert("RGB").save(root / f"{name}.png")
        rows.append((f"{name}.png", label, split))
    manifest = root / "manifest.csv"
    manifest.write_text("path,label,split\n" + "".join(f"{p},{lab},{s}\n" for p, lab, s in rows))
    store = Store(tmp_path_factory.mktemp("store") / "copies")
    store.update(read_source(manifest), backbone, progress=False)
    return store


def test_leaks_are_counted_at_the_grouping_threshold(copies_across_splits: Store) -> None:
    """The group of four copies is too large for its class of five, so the split's guard cuts
    it: counted on the cut groups, the leak vanished (the probe's `leaky_groups=0`); at the
    threshold itself it is there, and no move could keep it whole."""
    grouping = Grouping(threshold=0.8)
    cut = leaks(groups_table(*split_groups(copies_across_splits, grouping)))
    assert cut["leaky_groups"] == 0
    found = leak_check(copies_across_splits, grouping)
    assert found["leaky_groups"] == 1 and found["leaky_test_images"] == 2
    assert found["twinned_test_images"] == 2  # both test copies link to train or val directly
    assert found["too_large_groups"] == 1 and found["groups_to_move"] == 0
    assert found["split_sizes"] == {"train": 3, "val": 2, "test": 3}


def test_fix_splits_says_when_a_split_cannot_be_leak_free(copies_across_splits: Store) -> None:
    res = runner.invoke(
        app,
        ["dedup", "--fix-splits", "--store", str(copies_across_splits.path)],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 0, res.output
    assert "too large to keep in one split" in res.output
    assert "cannot be leak-free" in res.output and "nothing to move" not in res.output


def test_a_default_store_is_said_and_can_serve_the_command(
    built_store: Store, backbone, tmp_path: Path
) -> None:
    """An unlabelled folder embedded after a labelled one: commands that train pick the
    labelled store and say so; predicting with no store that has heads is one line saying
    what to run."""
    ws = tmp_path / "ws"
    labelled = ws / "stores" / "digits"
    shutil.copytree(built_store.path, labelled)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64), (40, 90, 200) if name == "a" else (200, 90, 40)).save(
            photos / f"{name}.png"
        )
    Store(ws / "stores" / "photos").update(read_source(photos), backbone, progress=False)

    assert resolve_store(None, ws).path.name == "photos"  # any: the latest
    assert resolve_store(None, ws, need="labels").path.name == "digits"
    with pytest.raises(StoreError, match="has trained heads: run `headstart train`"):
        resolve_store(None, ws, need="heads")

    res = runner.invoke(app, ["info", "--workspace", str(ws)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert f"store: {ws / 'stores' / 'photos'} (the latest of 2; --store picks)" in res.output


def test_a_query_image_that_is_not_there_is_named(built_store: Store, tmp_path: Path) -> None:
    missing = tmp_path / "no such <b>photo</b>.png"
    res = runner.invoke(app, ["search", str(missing), "--store", str(built_store.path)])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and str(missing) in line and "file not found" in line


def test_a_training_prints_its_runs_page_and_commands_that_fit_80_columns(
    built_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link an analyst opens (the experiment's runs, the view tests/flows/tracking/
    test_mlflow_ui.py checks in a browser) and the command that serves it, each on one line
    even in an 80-column terminal, so they copy and paste whole."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = tmp_path / "ws"
    store = ws / "stores" / "digits"
    shutil.copytree(built_store.path, store)
    args = ["train", "--store", str(store), "--workspace", str(ws), "--head", "logreg"]
    res = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    page = next(line for line in lines if line.startswith("runs page: "))
    assert re.fullmatch(
        r"runs page: http://127\.0\.0\.1:5000/#/experiments/\d+\?workflowType=machine_learning",
        page,
    )
    db = (ws / "mlflow.db").resolve()
    command = f"uv run mlflow ui --backend-store-uri sqlite:///{db} --port 5000"
    assert f"open it with: {command}" in lines


def test_only_headstarts_own_lines_unless_verbose(tmp_path: Path) -> None:
    """A command that creates the MLflow database prints our one line, not MLflow's; with
    --verbose, the libraries' lines are there too."""
    import os
    import subprocess
    import sys

    headstart = Path(sys.executable).with_name("headstart")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DO_NOT_TRACK"))}

    def stderr(*flags: str) -> str:
        ws = tmp_path / f"ws{len(flags)}"  # a fresh database each time
        args = [str(headstart), *flags, "promote", "1", "--workspace", str(ws)]
        res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and (ws / "mlflow.db").is_file(), res.stderr
        return res.stderr

    quiet = stderr()
    assert quiet.startswith("error: no registered image model") and quiet.count("\n") == 1
    assert "Creating initial MLflow database tables" in stderr("--verbose")
