"""A run over several backbones (issue 30): a store each on one split, whichever embedded first;
one parent MLflow run holding a nested run per backbone x head; the ladder's decisions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from extractors.store.store import Store
from flows.candidates import ladder, rungs_of
from flows.cli import app

runner = CliRunner()
CANDIDATES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _rung(backbone: str, val: float, feature: str = "embedding") -> dict:
    return {"backbone": backbone, "feature": feature, "best_head": "logreg", "val_score": val}


def test_the_ladder_stops_at_the_first_rung_that_reaches_the_target() -> None:
    grid = [_rung("small", 0.80), _rung("medium", 0.93), _rung("large", 0.95)]
    stop = ladder(grid, target=0.9, finetune=False)
    assert not stop["escalate"] and stop["reached"] == 1 and stop["best"] == 2
    assert stop["reason"].startswith(
        "rung 2 of 3, medium embedding: logreg val 0.930 >= target 0.900"
    )
    assert stop["rungs"][0]["verdict"] == "small embedding: logreg val 0.800 < target 0.900"
    assert [r["reaches"] for r in stop["rungs"]] == [False, True, True]
    climb = ladder(grid, target=0.99, finetune=False)
    assert climb["escalate"] and climb["best"] == 2  # fine-tuning starts from the best
    assert "no frozen candidate reaches the target" in climb["reason"]
    assert "fine-tuning large" in climb["reason"]
    asked = ladder(grid, target=0.5, finetune=True)
    assert asked["escalate"] and asked["best"] == 2
    assert not ladder(grid, target=None, finetune=False)["escalate"]


def test_a_layer_column_is_a_rung_of_its_own_tried_before_the_next_backbone() -> None:
    grid = [
        _rung("small", 0.80),
        _rung("small", 0.92, "emb_blocks_5"),
        _rung("large", 0.95),
    ]
    stop = ladder(grid, target=0.9, finetune=False)
    assert not stop["escalate"] and stop["reached"] == 1  # the layer, before the next backbone
    assert stop["reason"].startswith("rung 2 of 3, small emb_blocks_5: logreg val 0.920")
    grid[1]["val_score"] = 0.97  # none reaches 0.99: the best frozen candidate is the layer
    climb = ladder(grid, target=0.99, finetune=False)
    assert climb["escalate"] and climb["reached"] is None and climb["best"] == 1
    assert (climb["best_backbone"], climb["best_feature"]) == ("small", "emb_blocks_5")
    assert climb["reason"].endswith("fine-tuning small, whose best frozen feature is emb_blocks_5")


def test_a_training_gives_a_rung_per_feature_column_embedding_first() -> None:
    by = {"embedding": 0.80, "emb_blocks_5": 0.90, "emb_blocks_4": 0.85}
    summary = {
        "best": "knn",
        "heads": [
            {
                "head": "knn",
                "val_score": 0.92,
                "params": {"feature": "emb_blocks_4"},
                "accuracy": 0.9,
                "val_by_feature": {"embedding": 0.7, "emb_blocks_5": 0.6, "emb_blocks_4": 0.92},
            },
            {
                "head": "logreg",
                "val_score": 0.90,
                "params": {"feature": "emb_blocks_5"},
                "accuracy": 0.8,
                "val_by_feature": by,
            },
        ],
    }
    rungs = rungs_of(summary, "small")
    assert [(r["feature"], r["best_head"], r["val_score"]) for r in rungs] == [
        ("embedding", "logreg", 0.80),
        ("emb_blocks_5", "logreg", 0.90),
        ("emb_blocks_4", "knn", 0.92),
    ]
    assert [r["accuracy"] for r in rungs] == [None, 0.8, 0.9]  # tested: the column it chose
    plain = {"best": "knn", "heads": [{"head": "knn", "val_score": 0.5, "params": {}}]}
    assert [(r["feature"], r["backbone"]) for r in rungs_of(plain)] == [("embedding", None)]


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
    compared: dict, digits_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ws = compared["ws"]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}", "COLUMNS": "100"}
    args = ["run", str(digits_dir), "--workspace", str(ws), "--target", "0.5"]
    args += [f for b in CANDIDATES for f in ("--backbone", b)]
    res = runner.invoke(app, [*args, "--head", "logreg", "--head", "knn"], env=env)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "the ladder: frozen candidates" in res.stdout and "nothing new" in res.stdout
    assert "each image decoded once" in caplog.text  # the stores updated in one pass
    assert all(b in res.stdout for b in CANDIDATES)


def test_with_layers_each_column_is_a_rung_on_the_parent_run(
    digits_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="headstart")  # the runner's lines
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "COLUMNS": "100"}
    args = ["run", str(digits_dir), "--workspace", str(tmp_path), "--target", "0.5", "--json"]
    args += ["--backbone", CANDIDATES[0], "--backbone", CANDIDATES[1], "--layers=-2"]
    res = runner.invoke(app, [*args, "--head", "logreg", "--head", "knn"], env=env)
    assert res.exit_code == 0, res.output + repr(res.exception)
    result = json.loads(res.stdout)
    rungs = result["decision"]["rungs"]
    layer = [f for f in Store(result["backbones"][0]["store"]).features() if f != "embedding"]
    assert len(layer) == 1 and layer[0] in {r["feature"] for r in rungs}
    assert [(r["backbone"], r["feature"] == "embedding") for r in rungs] == [
        (CANDIDATES[0], True),
        (CANDIDATES[0], False),
        (CANDIDATES[1], True),
        (CANDIDATES[1], False),
    ]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parent = client.get_run(result["run_id"]).data
    assert parent.tags["ladder"].split(" | ") == [r["verdict"] for r in rungs]
    assert f"{CANDIDATES[0]} {layer[0]}: " in parent.tags["ladder"]
    assert {f"val.{CANDIDATES[0]}.{layer[0]}", f"val.{CANDIDATES[1]}.embedding"} <= set(
        parent.metrics
    )
    assert parent.tags["escalation_reason"].startswith(f"rung 1 of 4, {CANDIDATES[0]} embedding")
    assert "ladder rung 2 of 4: " in caplog.text and "ladder decision: rung 1 of 4" in caplog.text

    # one backbone, the same store: the heads reused, and its columns still the ladder's rungs
    one = [*args[:7], "--backbone", CANDIDATES[0], "--layers=-2", "--head", "logreg"]
    res = runner.invoke(app, [*one, "--head", "knn"], env=env)
    assert res.exit_code == 0, res.output + repr(res.exception)
    single = json.loads(res.stdout)
    assert [r["feature"] for r in single["decision"]["rungs"]] == ["embedding", layer[0]]
    tags = client.get_run(single["run_id"]).data.tags
    assert tags["ladder"].startswith("embedding: ") and f" | {layer[0]}: " in tags["ladder"]
    assert tags["escalation_reason"].startswith("rung 1 of 2, embedding: ")
    res = runner.invoke(app, [a for a in one if a != "--json"] + ["--head", "knn"], env=env)
    assert res.exit_code == 0, res.output + repr(res.exception)
    grid = res.stdout.split("the ladder: frozen candidates")[1].split("the best frozen")[0]
    assert grid.count(CANDIDATES[0]) == 2 and layer[0] in grid
