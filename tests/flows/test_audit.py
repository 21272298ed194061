"""Auditing real images through their embeddings: labels flipped by moving files into another
class folder rank at the top of the label issues (cleanlab on out-of-sample probabilities), an
image unlike the rest is the top outlier, and a re-encoded copy is a near-duplicate; the
findings in the CLI, the MLflow run and the search page's issues view (headless Chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from extractors.embedding.sources import read_source
from extractors.store.store import Store
from flows.cli import app
from tests.flows.web.live import serving

FLIPS = {"0": "1", "1": "2", "2": "3", "3": "0"}  # one image of each class moved to the next
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def audited(digits_dir, backbone, tmp_path_factory):
    """A store of the digits with 4 flipped labels, a photo among them and a re-encoded copy,
    audited by `headstart audit --out`."""
    tmp = tmp_path_factory.mktemp("audit")
    root = tmp / "digits"
    shutil.copytree(digits_dir, root)
    flipped = {}
    for src, dst in FLIPS.items():
        f = sorted((root / src).iterdir())[3]
        moved = root / dst / f"flipped_{f.name}"
        f.rename(moved)
        flipped[str(moved.resolve())] = src
    odd = root / "2" / "astronaut.png"  # a photo among handwritten digits
    Image.fromarray(data.astronaut()).resize((64, 64)).save(odd)
    first3 = sorted(p for p in (root / "3").iterdir() if p.suffix == ".png")[0]
    copy = root / "3" / "copy.jpg"
    Image.open(first3).convert("RGB").save(copy, quality=90)  # a re-encoded copy
    store = Store(tmp / "store")
    store.update(read_source(root), backbone, progress=False)
    out = tmp / "audit.parquet"
    res = CliRunner().invoke(
        app, ["audit", "--store", str(store.path), "--out", str(out), "--json"]
    )
    assert res.exit_code == 0, res.output
    return {
        "store": store,
        "out": out,
        "result": json.loads(res.stdout),
        "stderr": res.stderr,
        "flipped": flipped,
        "odd": str(odd.resolve()),
        "pair": {str(copy.resolve()), str(first3.resolve())},
    }


def test_flipped_labels_outliers_and_copies_are_found(audited) -> None:
    findings, summary = audited["result"]["findings"], audited["result"]["summary"]
    flipped = audited["flipped"]
    labels = [r for r in findings if r["issue"] == "label"]
    top = {r["path"] for r in labels[: len(flipped)]}
    hits = len(top & set(flipped))  # at k = the number of flips, precision = recall
    print(f"flipped {len(flipped)}: precision and recall at {len(flipped)}: {hits / len(flipped)}")
    assert hits >= 3  # 8x8 scans upscaled: some real digits are as ambiguous as a flip
    for r in labels:
        if r["path"] in flipped:
            assert r["suggested_label"] == flipped[r["path"]]  # the class it came from
    scores = [r["score"] for r in labels]
    assert scores == sorted(scores, reverse=True)
    outliers = [r for r in findings if r["issue"] == "outlier"]
    assert outliers[0]["path"] == audited["odd"] and outliers[0]["related"]
    dups = [r for r in findings if r["issue"] == "near_duplicate"]
    assert any({r["path"], r["related"]} == audited["pair"] for r in dups)
    assert summary["issues"]["label"] == len(labels) and 0 < summary["label_noise_rate"] < 0.3
    assert summary["head"].startswith("no training yet")
    assert pq.read_table(audited["out"]).num_rows == len(findings)
    kept = pq.read_table(audited["store"].path / "audit.parquet")  # for the search page
    assert kept.num_rows == len(findings)


def test_centring_the_raw_embeddings_leaves_the_label_audit_unchanged(audited) -> None:
    """Logistic regression on raw embeddings is fitted centred (its intercept is unpenalised:
    the same model; heads/audit.py): converged, its probabilities are the uncentred fit's, and
    the audit's issues those of the uncentred fit at the head's own tolerance."""
    import numpy as np
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from heads.audit import audit_head, label_issues, out_of_sample_proba
    from heads.classical import build_head

    X, meta = audited["store"].arrays()
    y = np.asarray(meta["label"].to_pylist(), dtype=object).astype(str)
    params = {"pre": "none", "C": 1.0}
    centred = audit_head("logreg", params, y)
    raw = build_head("logreg", **params)  # as trained: no centring
    assert type(centred.named_steps["pre"]) is not type(raw.named_steps["pre"])
    cv = StratifiedKFold(5, shuffle=True, random_state=0)  # the folds of the audit
    tight = {"clf__tol": 1e-10, "clf__max_iter": 20_000}
    X64 = X.astype(np.float64)  # float32's rounding stops L-BFGS short of the optimum
    a, b = (
        cross_val_predict(clone(e).set_params(**tight), X64, y, cv=cv, method="predict_proba")
        for e in (centred, raw)
    )
    assert np.abs(a - b).max() < 1e-3  # one optimum
    new, classes = out_of_sample_proba(X, y, "logreg", params)
    old = cross_val_predict(raw, X, y, cv=cv, method="predict_proba")
    assert set(label_issues(y, new, classes).rows) == set(label_issues(y, old, classes).rows)


def test_audit_shows_its_progress_except_under_json(audited) -> None:
    assert "audit:" not in audited["stderr"]  # --json: the JSON only
    store = str(audited["store"].path)
    res = CliRunner().invoke(app, ["audit", "--store", store, "--top", "1"])
    assert res.exit_code == 0, res.output
    for phase in ("audit: labels, 5 folds of logreg", "audit: neighbours", "near-duplicates"):
        assert phase in res.stderr
    # each fold counted, with the time spent and the time left ("elapsed<left")
    assert re.search(r"\b1/5 \[\d\d:\d\d<\d\d:\d\d", res.stderr), res.stderr
    assert re.search(r"\b5/5 \[\d\d:\d\d<00:00", res.stderr), res.stderr
    assert "label findings" in res.stdout


@pytest.fixture(scope="module")
def server(audited, tmp_path_factory):
    with serving(audited["store"].path, tmp_path_factory.mktemp("ws")) as base:
        yield base


def test_the_issues_api_lists_findings_with_their_related_images(audited, server) -> None:
    body = httpx.get(f"{server}/api/issues", params={"issue": "label"}).json()
    assert not body["stale"] and body["summary"]["issues"]["label"] == len(body["findings"])
    first = body["findings"][0]
    assert first["issue"] == "label" and first["suggested_label"]
    assert httpx.get(f"{server}{first['thumb']}").status_code == 200
    dups = httpx.get(f"{server}/api/issues", params={"issue": "near_duplicate"}).json()
    assert all(f["related"] and f["related"]["thumb"] for f in dups["findings"])
    bad = httpx.get(f"{server}/api/issues", params={"issue": "nope"})
    assert bad.status_code == 400 and "label, outlier, near_duplicate" in bad.json()["detail"]


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="no system Chromium (apt install chromium)",
)
def test_the_issues_view_in_headless_chromium(audited, server) -> None:
    """Open the issues view, pick wrong labels, see the flipped images; click one: the search
    page opens on its nearest neighbours."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI must install Chromium (.ci/run does: apt-get install chromium)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{server}/issues")
            page.wait_for_selector(".finding")
            assert "label issues" in page.inner_text("#summary")
            page.click("button[data-issue=label]")
            page.wait_for_function(
                "[...document.querySelectorAll('.finding .kind')].every("
                "k => k.textContent === 'label issue')"
            )
            names = [n.inner_text() for n in page.query_selector_all(".finding .name")]
            flipped = {Path(p).name for p in audited["flipped"]}
            assert len(set(names[:4]) & flipped) >= 3
            assert page.inner_text(".finding .suggested")  # the suggested label is shown
            page.click(".finding img")
            page.wait_for_selector(".hit")  # the search page, on that image's neighbours
            assert "/?id=" in page.url
        finally:
            browser.close()


def test_run_audit_logs_the_findings_to_the_run(digits_dir, mlflow_tmp, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    from extractors.common import plural
    from flows.steps.training import split_leaks

    ws = str(tmp_path / "ws")
    args = ["run", str(digits_dir), "--workspace", ws, "--head", "logreg", "--audit", "--json"]
    res = CliRunner().invoke(app, [*args, "--split-groups", "none"])  # the split of old stores
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["audit"]["line"].startswith("audit: ")
    assert result["audit"]["head"].startswith("best head of training")  # its chosen settings
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.data.metrics["audit_label_issues"] == result["audit"]["issues"]["label"]
    assert "audit_label_noise_rate" in run.data.metrics
    table = client.load_table(run.info.experiment_id, "audit.json", [result["run_id"]])
    assert set(table["issue"]) <= {"label", "outlier", "near_duplicate"} and len(table) > 0
    # Split row by row, near-duplicates straddle splits: counted, logged and said.
    leak = result["leaks"]
    assert run.data.metrics["leaky_groups"] == leak["leaky_groups"] > 0
    assert leak["line"].startswith(
        f"warning: {plural(leak['leaky_groups'], 'near-duplicate group')} "
    )
    # Counted at the threshold itself (the digits chain: some groups are too large to keep in
    # one split, and the line says so), `dedup --fix-splits` proposes the moves for the rest
    # and names this training; --apply makes them.
    assert leak["leaky_groups"] > 0 and leak["groups_to_move"] > 0
    if leak["too_large_groups"]:
        assert "too large to keep in one split" in leak["line"]
    store = result["store"]
    fix = ["dedup", "--store", store, "--workspace", ws, "--fix-splits", "--json"]
    res = CliRunner().invoke(app, fix)
    assert res.exit_code == 0, res.output
    proposed = json.loads(res.stdout)
    assert proposed["leaky_groups"] == leak["groups_to_move"] and not proposed["applied"]
    assert [r["run_id"] for r in proposed["runs_on_leaking_split"]] == [result["run_id"]]
    assert all(m["to"] != "test" for m in proposed["moves"])
    assert 0 < proposed["out_of_test"] <= leak["leaky_test_images"]
    res = CliRunner().invoke(app, [*fix, "--apply"])
    assert res.exit_code == 0 and json.loads(res.stdout)["applied"], res.output
    after = split_leaks(Store(store))
    assert after["groups_to_move"] == 0 and after["leaky_groups"] == after["too_large_groups"]
    res = CliRunner().invoke(app, fix)  # nothing left to move, no run on this split yet
    again = json.loads(res.stdout)
    assert again["moves"] == [] and res.exit_code == 0
    assert again["too_large_to_keep"] == after["leaky_groups"]


def test_leaks_count_groups_that_straddle_splits() -> None:
    import pyarrow as pa

    from extractors.store.dedup import GROUP_SCHEMA, leaks

    rows = [
        {"group": 0, "split": "train"}, {"group": 0, "split": "test"},  # straddles
        {"group": 1, "split": "val"}, {"group": 1, "split": "val"},  # one split: fine
        {"group": 2, "split": "train"}, {"group": 2, "split": "val"}, {"group": 2, "split": "test"},
    ]  # fmt: skip
    full = [r | {"size": 2, "id": i, "path": str(i), "label": "a", "similarity": 1.0}
            for i, r in enumerate(rows)]  # fmt: skip
    found = leaks(pa.Table.from_pylist(full, schema=GROUP_SCHEMA))
    assert found == {"leaky_groups": 2, "leaky_images": 5, "leaky_test_images": 2}
