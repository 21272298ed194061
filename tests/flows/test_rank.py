"""`headstart rank`: real networks embed a real labelled folder into the stores a run would use,
every feature column is scored on the same train images, best LogME first, logged to MLflow;
bad input is one line and exit code 2."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from extractors.store.store import Store
from flows.cli import app
from flows.steps.ranking import metric_key, shared_train_paths, train_rows
from heads.transferability import h_score, logme

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_rank_two_networks_and_a_layer_column(mlflow_tmp, digits_dir, tmp_path) -> None:
    ws = tmp_path / "ws"
    args = ["rank", str(digits_dir), "--backbone", "efficientnet_lite0"]
    args += ["--backbone", "efficientnet_lite1", "--layers=-1", "--workspace", str(ws)]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    ranking = json.loads(res.stdout)
    cands = ranking["candidates"]
    names = {(c["backbone"], c["feature"]) for c in cands}
    assert {b for b, _ in names} == {"efficientnet_lite0", "efficientnet_lite1"}
    assert len(names) == 4  # each network's embedding and its last stage's column
    assert [c["logme"] for c in cands] == sorted((c["logme"] for c in cands), reverse=True)
    assert all(c["score_s"] > 0 and c["embed_s"] > 0 for c in cands)

    # The figures are the estimates of the stores' train rows, the same images for each.
    stores = {c["backbone"]: Store(c["store"]) for c in cands}
    assert {st.path.parent for st in stores.values()} == {ws / "stores"}  # a run's own stores
    paths = shared_train_paths(list(stores.values()))
    assert ranking["train_images"] == len(paths) >= 20
    for c in cands:
        x, labels = train_rows(stores[c["backbone"]], c["feature"], paths)
        assert len(set(labels)) == 4 and len(x) == len(paths)
        assert c["logme"] == pytest.approx(logme(x, labels))
        assert c["h_score"] == pytest.approx(h_score(x, labels))

    # One MLflow run holds every score.
    run = MlflowClient(mlflow_tmp).get_run(ranking["run_id"])
    assert run.data.tags["headstart.kind"] == "rank"
    for c in cands:
        assert run.data.metrics[f"logme.{metric_key(c)}"] == pytest.approx(c["logme"])

    # Again, as a table: nothing to embed (the stores are kept), the same order.
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = [ln for ln in res.stdout.splitlines() if "efficientnet_lite" in ln]
    assert [(r.split()[1], r.split()[3]) for r in rows] == [
        (c["backbone"], c["feature"]) for c in cands
    ]
    assert [r.split()[5] for r in rows] == [f"{c['logme']:.4f}" for c in cands]


def test_rank_bad_input_is_one_line_and_exit_2(digits_dir, tmp_path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    for n in range(3):
        Image.new("RGB", (32, 32), (n * 80, 0, 0)).save(loose / f"{n}.png")
    cases = [
        (digits_dir, "nope", "unknown backbone 'nope'"),
        (digits_dir, "timm:not_a_model", "timm has no model"),
        (loose, "efficientnet_lite0", "has no labels"),
    ]
    for source, backbone, message in cases:
        args = ["rank", str(source), "--backbone", backbone, "--workspace", str(tmp_path)]
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and message in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
