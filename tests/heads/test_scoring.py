"""Scoring a source into a predictions table: one row per image (errors and duplicates too),
embeddings reused from a store by content, the same answers as scoring each image alone,
CSV or Parquet, only new files against a previous table, and exactly once across a SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from extractors.embedding.sources import SourceError, read_source, read_sources
from heads.classifier import ImageClassifier
from heads.scoring.runner import score_into_folder, score_source
from heads.scoring.table import PROBA, ScoringError, output_format, work_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(built_store, backbone):
    """A real logistic-regression head on the store's embeddings, bound to its backbone."""
    X, meta = built_store.arrays()
    head = LogisticRegression(max_iter=500).fit(X, meta["label"].to_pylist())
    m = built_store.manifest()
    return ImageClassifier(m["backbone"], m["weights"], list(head.classes_), "test-head", head)


def _folder(digits_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """The digits nested two levels deep, plus a new image, a corrupt one and a duplicate."""
    root = tmp_path / "incoming"
    shutil.copytree(digits_dir, root / "batch" / "a")
    some = sorted((root / "batch" / "a" / "1").iterdir())[0]
    new = root / "new.png"
    Image.open(some).transpose(Image.Transpose.ROTATE_90).save(new)
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(some.read_bytes()[:50])
    dup = root / "dup.png"
    shutil.copy(some, dup)
    return root, {"new": new, "corrupt": corrupt, "dup": dup, "original": some}


def test_a_folder_is_scored_one_row_per_image_reusing_the_store(
    built_store, backbone, model, digits_dir, tmp_path
) -> None:
    root, files = _folder(digits_dir, tmp_path)
    bound = model.bind(backbone)
    out = tmp_path / "preds.parquet"
    report = score_source(
        read_source(root, "unlabelled"),
        backbone,
        bound,
        out,
        donor=built_store.path,
        progress=False,
    )
    table = pq.read_table(out)
    rows = {r["path"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == 103  # 100 digits, new, corrupt, duplicate
    assert (report.reused, report.embedded, report.errors, report.duplicates) == (100, 1, 1, 1)
    assert not work_folder(out).exists()

    bad = rows[str(files["corrupt"].resolve())]
    assert bad["prediction"] is None and "corrupt" in bad["error"]
    dup, orig = rows[str(files["dup"].resolve())], rows[str(files["original"].resolve())]
    assert dup["prediction"] == orig["prediction"] and dup["error"] is None
    assert dup[f"{PROBA}1"] == orig[f"{PROBA}1"] and dup["sha256"] == orig["sha256"]

    scored = [r for r in rows.values() if r["error"] is None]
    proba = np.array([[r[f"{PROBA}{c}"] for c in model.classes] for r in scored])
    assert np.allclose(proba.sum(axis=1), 1) and all(r["model"] == "test-head" for r in scored)
    assert all(r["probability"] == max(p) for r, p in zip(scored, proba, strict=True))
    # The same answers as embedding each image alone (reused rows and new ones alike).
    for r in [*scored[::10], rows[str(files["new"].resolve())]]:
        alone = bound.proba_images(backbone.prepare(r["path"]))[0]
        mine = np.array([r[f"{PROBA}{c}"] for c in model.classes])
        assert np.abs(alone - mine).max() < 1e-3
        assert model.classes[int(alone.argmax())] == r["prediction"]
    assert np.mean([r["prediction"] == Path(r["path"]).parent.name for r in scored[:100]]) > 0.9


def test_a_corrupt_earlier_part_is_named_not_reported_as_a_write_error(
    backbone, model, digits_dir, tmp_path
) -> None:
    """An earlier part of a predictions folder that cannot be read is one ScoringError
    naming that part (before: pyarrow's traceback, or "cannot write ... Nothing was written")."""
    folder = tmp_path / "predictions"
    folder.mkdir()
    part = folder / "part-000000.parquet"
    part.write_bytes(b"PAR1 not a parquet file")
    src = tmp_path / "src"
    shutil.copytree(digits_dir / "0", src / "0")
    with pytest.raises(ScoringError) as raised:
        score_into_folder(read_source(src), backbone, model.bind(backbone), folder, progress=False)
    assert str(part) in str(raised.value) and "cannot write" not in str(raised.value)
    assert part.read_bytes() == b"PAR1 not a parquet file"


def test_csv_output_files_and_only_new_files_against_a_previous_table(
    built_store, backbone, model, digits_dir, tmp_path
) -> None:
    bound = model.bind(backbone)
    files = sorted((digits_dir / "2").iterdir())[:3]
    out = tmp_path / "few.csv"
    report = score_source(
        read_sources(files), backbone, bound, out, donor=built_store.path, progress=False
    )
    table = pacsv.read_csv(out)
    assert table.num_rows == 3 and report.reused == 3
    assert set(table["path"].to_pylist()) == {str(f.resolve()) for f in files}
    previous = table.select(["path", "sha256", "bytes", "mtime_ns"])
    again = score_source(
        read_sources(files),
        backbone,
        bound,
        tmp_path / "again.parquet",
        previous=previous,
        progress=False,
    )
    assert (again.rows, again.unchanged) == (0, 3)  # nothing new
    with pytest.raises(ScoringError, match=r"give a \.parquet or \.csv file name"):
        output_format(tmp_path / "x.json")
    with pytest.raises(SourceError, match="does not exist"):
        read_sources([tmp_path / "no-such-folder"])
    gone = tmp_path / "gone.png"  # one of several files: its own error row, not the run's
    report = score_source(
        read_sources([*files, gone]),
        backbone,
        bound,
        tmp_path / "g.parquet",
        donor=built_store.path,
        progress=False,
    )
    assert (report.rows, report.errors) == (4, 1)
    assert "not found" in report.errors_by_path[str(gone)]


# A subprocess that scores with the real backbone and a head on random features.
MODEL = """
import sys
from extractors.embedding.backbones import create_backbone
from extractors.embedding.engines import LocalEngine
from heads.scoring.runner import score_into_folder, score_source
from extractors.settings import EmbedSettings
from extractors.embedding.sources import read_source
from heads.classifier import ImageClassifier
import numpy as np
from sklearn.linear_model import LogisticRegression
bb = create_backbone(device="cpu")
rng = np.random.default_rng(0)
head = LogisticRegression().fit(rng.normal(size=(20, bb.dim)), ["a", "b"] * 10)
model = ImageClassifier(bb.name, bb.weights, ["a", "b"], "random-head", head).bind(bb)
engine = LocalEngine(EmbedSettings(batch_size=4, decode_threads=1), False, checkpoint_rows=8)
"""
SCORE = (
    MODEL
    + """
r = score_source(read_source(sys.argv[1]), bb, model, sys.argv[2], engine, progress=False)
print("resumed", r.resumed, "rows", r.rows)
"""
)


def test_a_killed_scoring_run_continues_and_scores_each_image_once(digits_dir, tmp_path) -> None:
    out = tmp_path / "preds.parquet"
    staging = work_folder(out) / "staging"
    cmd = [sys.executable, "-c", SCORE, str(digits_dir), str(out)]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if len(list(staging.glob("part-*.parquet"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = int(done.stdout.split()[1])
    assert resumed >= 16, done.stdout
    paths = pq.read_table(out, columns=["path"])["path"].to_pylist()
    assert len(paths) == len(set(paths)) == 100
    assert not work_folder(out).exists()
