"""Auditing real images through their embeddings: labels flipped by moving files into another
class folder rank at the top of the label issues (cleanlab on out-of-sample probabilities), an
image unlike the rest is the top outlier, and a re-encoded copy is a near-duplicate."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from extractors.sources import read_source
from extractors.store import Store
from flows.cli import app
from flows.steps.audit import audit_store

FLIPS = {"0": "1", "1": "2", "2": "3", "3": "0"}  # one image of each class moved to the next


def test_flipped_labels_outliers_and_copies_are_found(digits_dir, backbone, tmp_path) -> None:
    root = tmp_path / "digits"
    shutil.copytree(digits_dir, root)
    flipped = {}
    for src, dst in FLIPS.items():
        f = sorted((root / src).iterdir())[3]
        moved = root / dst / f"flipped_{f.name}"
        f.rename(moved)
        flipped[str(moved.resolve())] = src
    odd = root / "2" / "astronaut.png"  # a photo among handwritten digits
    Image.fromarray(data.astronaut()).resize((64, 64)).save(odd)
    copy = root / "3" / "copy.jpg"
    first3 = sorted(p for p in (root / "3").iterdir() if p.suffix == ".png")[0]
    Image.open(first3).convert("RGB").save(copy, quality=90)  # a re-encoded copy
    store = Store(tmp_path / "store")
    store.update(read_source(root), backbone, progress=False)

    table, summary = audit_store(store.path)
    labels = [r for r in table.to_pylist() if r["issue"] == "label"]
    top = {r["path"] for r in labels[: len(flipped)]}
    hits = len(top & set(flipped))  # at k = the number of flips, precision = recall
    print(f"flipped {len(flipped)}: precision and recall at {len(flipped)}: {hits / len(flipped)}")
    assert hits >= 3  # 8x8 scans upscaled: some real digits are as ambiguous as a flip
    for r in labels:
        if r["path"] in flipped:
            assert r["suggested_label"] == flipped[r["path"]]  # the class it came from
    scores = [r["score"] for r in labels]
    assert scores == sorted(scores, reverse=True)
    outliers = [r for r in table.to_pylist() if r["issue"] == "outlier"]
    assert outliers[0]["path"] == str(odd.resolve()) and outliers[0]["related"]
    dups = [r for r in table.to_pylist() if r["issue"] == "near_duplicate"]
    assert any(
        {r["path"], r["related"]} == {str(copy.resolve()), str(first3.resolve())} for r in dups
    )
    assert summary["issues"]["label"] == len(labels) and 0 < summary["label_noise_rate"] < 0.3
    assert summary["head"].startswith("no training yet")

    out = tmp_path / "audit.parquet"
    res = CliRunner().invoke(app, ["audit", "--store", str(store.path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert pq.read_table(out).num_rows == table.num_rows and "label noise" in res.stdout


def test_run_audit_logs_the_findings_to_the_run(digits_dir, mlflow_tmp, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    ws = str(tmp_path / "ws")
    args = ["run", str(digits_dir), "--workspace", ws, "--head", "logreg", "--audit", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    import json

    result = json.loads(res.stdout)
    assert result["audit"]["line"].startswith("audit: ")
    assert result["audit"]["head"].startswith("best head of training")  # its chosen settings
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.data.metrics["audit_label_issues"] == result["audit"]["issues"]["label"]
    assert "audit_label_noise_rate" in run.data.metrics
    table = client.load_table(run.info.experiment_id, "audit.json", [result["run_id"]])
    assert set(table["issue"]) <= {"label", "outlier", "near_duplicate"} and len(table) > 0
