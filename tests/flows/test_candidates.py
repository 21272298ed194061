"""A run over several backbones (issue 30): a store each on one split, whichever embedded first;
one parent MLflow run holding a nested run per backbone x head; the ladder's decisions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from extractors.store.store import Store
from flows.candidates import ladder
from flows.cli import app

runner = CliRunner()
CANDIDATES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _rung(backbone: str, val: float) -> dict:
    return {"backbone": backbone, "best_head": "logreg", "val_score": val}


def test_the_ladder_stops_at_the_first_rung_that_reaches_the_target() -> None:
    grid = [_rung("small", 0.80), _rung("medium", 0.93), _rung("large", 0.95)]
    stop = ladder(grid, target=0.9, finetune=False)
    assert not stop["escalate"] and stop["reached"] == 1 and stop["best"] == 2
    assert stop["reason"].startswith("rung 2 of 3, medium: logreg val 0.930 >= target 0.900")
    assert stop["rungs"][0] == "small: logreg val 0.800 < target 0.900"
    climb = ladder(grid, target=0.99, finetune=False)
    assert climb["escalate"] and climb["best"] == 2  # fine-tuning starts from the best
    assert "no frozen candidate reaches the target" in climb["reason"]
    assert "fine-tuning large" in climb["reason"]
    asked = ladder(grid, target=0.5, finetune=True)
    assert asked["escalate"] and asked["best"] == 2
    assert not ladder(grid, target=None, finetune=False)["escalate"]


@pytest.fixture(scope="module")
def compared(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    ws = tmp_path_factory.mktemp("candidates")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    args = ["run", str(digits_dir), "--workspace", str(ws), "--target", "0.5", "--json"]
    args += [f for b in CANDIDATES for f in ("--backbone", b)]
    args += ["--head", "logreg", "--head", "knn"]
    res = runner.invoke(app, args)
    mp.undo()
    assert res.exit_code == 0, res.output + repr(res.exception)
    return json.loads(res.stdout) | {"ws": ws}


def test_each_backbone_gets_a_store_all_on_one_split(compared: dict) -> None:
    stores = [Store(g["store"]) for g in compared["backbones"]]
    assert [s.manifest()["backbone"] for s in stores] == list(CANDIDATES)
    tables = [s.table(["path", "split"]).to_pydict() for s in stores]
    splits = [dict(zip(t["path"], t["split"], strict=True)) for t in tables]
    assert len(splits[0]) == 100 and splits[0] == splits[1] == splits[2]
    assert set(splits[0].values()) == {"train", "val", "test"}


def test_one_parent_run_holds_a_run_per_backbone_and_head(compared: dict) -> None:
    client = MlflowClient(f"sqlite:///{compared['ws'] / 'mlflow.db'}")
    parent = client.get_run(compared["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{compared['run_id']}'"
    )
    pairs = {(r.data.params.get("backbone"), r.info.run_name) for r in children}
    assert {(b, h) for b in CANDIDATES for h in ("logreg", "knn")} <= pairs
    assert parent.data.params["candidates"] == ", ".join(CANDIDATES)
    assert {f"val.{b}" for b in CANDIDATES} <= set(parent.data.metrics)
    # --target 0.5: the first rung reaches it, no fine-tuning, and the tags say so
    assert parent.data.tags["escalation_reason"].startswith("rung 1 of 3, efficientnet_lite0")
    assert parent.data.tags["ladder"].count(" | ") == 2
    vals = {g["backbone"]: g["val_score"] for g in compared["backbones"]}
    assert compared["finetune"] is None and vals[compared["best_backbone"]] == max(vals.values())
    assert parent.data.tags["best_backbone"] == compared["best_backbone"]


def test_compare_shows_the_grid_best_marked(compared: dict) -> None:
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{compared['ws'] / 'mlflow.db'}", "COLUMNS": "80"}
    res = runner.invoke(app, ["compare", "--workspace", str(compared["ws"])], env=env)
    assert res.exit_code == 0, res.output
    grid = res.stdout.split("the best model of each backbone")[1]
    assert all(b in grid for b in CANDIDATES)
    vals = {g["backbone"]: g["val_score"] for g in compared["backbones"]}
    starred = [b for b in CANDIDATES if f"{b} *" in grid]
    assert len(starred) == 1 and vals[starred[0]] == max(vals.values())
    assert max(len(line) for line in res.stdout.splitlines()) <= 80


def test_a_shortlist_trains_only_the_best_ranked(compared: dict, digits_dir: Path) -> None:
    ws = compared["ws"]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}"}
    args = ["run", str(digits_dir), "--workspace", str(ws), "--target", "0.5", "--json"]
    args += [f for b in CANDIDATES for f in ("--backbone", b)]
    args += ["--head", "logreg", "--head", "knn", "--shortlist", "2"]
    res = runner.invoke(app, args, env=env)
    assert res.exit_code == 0, res.output + repr(res.exception)
    result = json.loads(res.stdout)
    kept = [g["backbone"] for g in result["backbones"]]
    run = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(result["run_id"]).data
    logme = {b: run.metrics[f"logme.{b}"] for b in CANDIDATES}
    assert len(kept) == 2 and kept == [b for b in CANDIDATES if b in kept]  # in the order given
    assert min(logme[b] for b in kept) >= max(v for b, v in logme.items() if b not in kept)
    assert run.tags["shortlist"] == ", ".join(kept)


def test_a_rerun_reuses_every_backbones_heads_and_prints_the_grid(
    compared: dict, digits_dir: Path
) -> None:
    ws = compared["ws"]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}", "COLUMNS": "100"}
    args = ["run", str(digits_dir), "--workspace", str(ws), "--target", "0.5"]
    args += [f for b in CANDIDATES for f in ("--backbone", b)]
    res = runner.invoke(app, [*args, "--head", "logreg", "--head", "knn"], env=env)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "backbones on one split" in res.stdout and "nothing new" in res.stdout
    assert all(b in res.stdout for b in CANDIDATES)
