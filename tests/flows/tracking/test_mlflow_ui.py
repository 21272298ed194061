"""The analyst's path through the real MLflow UI, in headless Chromium: an experiment of a
training with heads and a fine-tuned network opens on its runs with the store as their
dataset; its nested runs compare side by side with one parameter vocabulary; and the same
store read back through MLflow's API: dataset inputs, durations, tables, the errors view."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from extractors.embedding.sources import read_source
from extractors.store.store import Store
from flows.cli import app
from flows.steps import finetuning, training
from flows.tracking.tracker import Tracker
from heads.settings import FineTuneSettings

ROOT = Path(__file__).resolve().parents[3]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def trained(digits_dir, backbone, tmp_path_factory):
    """One parent run: two heads and a fine-tuned network, on a real SQLite MLflow store."""
    root = tmp_path_factory.mktemp("analyst")
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    ws = root / "ws"
    store = Store(ws / "stores" / "digits")
    store.update(read_source(digits_dir), backbone, progress=False)
    with Tracker(ws).parent_run("analyst", "pipeline-1", {"store": str(store.path)}) as parent:
        summary = training.train_and_track(store.path, parent, ws, heads=["logreg", "knn"])
        cfg = FineTuneSettings(strategy="head", epochs=1, image_size=32, batch_size=16)
        tuned = finetuning.finetune_and_track(store.path, parent, ws, cfg, progress=False)
    yield {"uri": uri, "ws": ws, "parent": parent, "summary": summary, "tuned": tuned,
           "store": store}  # fmt: skip
    mp.undo()


def test_runs_share_one_vocabulary_dataset_and_their_fit_times(trained) -> None:
    client = MlflowClient()
    exp = client.get_experiment_by_name("analyst")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    kids = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{trained['parent']}'"
    )
    assert sorted(r.info.run_name for r in kids) == ["finetune:head", "knn", "logreg"]
    fingerprint = trained["store"].manifest()["fingerprint"]
    for r in [*kids, client.get_run(trained["parent"])]:
        (inp,) = r.inputs.dataset_inputs
        assert (
            inp.dataset.digest == fingerprint and inp.dataset.name == "digits (efficientnet_lite0)"
        )
        profile = json.loads(inp.dataset.profile)
        assert profile["rows"] == 100 and profile["test_rows"] > 0
    for r in kids:
        p = r.data.params
        assert p["backbone"] == "efficientnet_lite0" and p["feature"] == "embedding"
        assert p["model"] == r.info.run_name
        assert not [k for k in p if k.startswith("head.") or k == "base_backbone"]
        fit = r.data.metrics["fit_seconds"]
        assert abs((r.info.end_time - r.info.start_time) / 1000 - fit) < 0.01
        files = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"test_predictions.json", "mistakes.png"} <= files
        table = client.load_table(exp.experiment_id, "test_predictions.json", [r.info.run_id])
        assert len(table) == trained["store"].manifest()["splits"]["test"]
        assert set(table.columns) >= {"path", "label", "prediction", "probability", "loss"}


def test_compare_errors_lists_the_images_the_models_disagree_on(trained) -> None:
    res = CliRunner().invoke(
        app, ["compare", "--errors", "--workspace", str(trained["ws"]), "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out["models"]) == {"finetune:head", "knn", "logreg"}
    for row in out["images"]:
        assert len(set(row["predictions"].values())) > 1 and Path(row["path"]).exists()


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="no system Chromium (apt install chromium)",
)
def test_the_real_mlflow_ui_opens_on_runs_and_compares_the_models(trained, tmp_path) -> None:
    assert CHROMIUM, "CI must install Chromium (.ci/run does: apt-get install chromium)"
    spec = importlib.util.spec_from_file_location("mlflow_ui", ROOT / "docs" / "mlflow_ui.py")
    ui = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ui)
    seen = ui.check(trained["uri"], "analyst", tmp_path, CHROMIUM)
    assert seen["opens_on"] == "runs"
    assert seen["dataset"].startswith("digits (efficientnet_lite0)")
    assert seen["runs"][0] == "pipeline-1"
    assert sorted(seen["runs"][1:]) == ["finetune:head", "knn", "logreg"]
    assert seen["title"] == "Comparing 3 Runs from 1 Experiment"
    assert seen["params"]["backbone"] == ["efficientnet_lite0"] * 3  # never "unknown"
    assert sorted(seen["params"]["model"]) == ["finetune:head", "knn", "logreg"]
    assert (tmp_path / "runs.png").stat().st_size > 10_000
    assert (tmp_path / "compare.png").stat().st_size > 10_000
