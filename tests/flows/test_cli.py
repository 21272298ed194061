"""Every CLI command, run in-process against the session's Prefect server and a tmp MLflow."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from extractors.settings import EmbedSettings, EngineSettings, IndexSettings
from extractors.store.store import Store
from flows.cli import app
from flows.settings import STAGES, PipelineSettings
from heads.settings import FineTuneSettings

pytestmark = pytest.mark.slow
runner = CliRunner()


def _ok(args: list[str]) -> str:
    """Run a command, assert success, return its stdout (logs and progress go to stderr)."""
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.stdout


def test_help_explains_every_command() -> None:
    out = _ok(["--help"])
    commands = ("demo", "embed", "train", "run", "finetune", "compare", "search", "predict")
    for cmd in (*commands, "dedup", "info", "serve", "index", "ui", "map"):
        assert cmd in out
        command = typer.main.get_command(app).commands[cmd]
        assert command.help and all(p.help for p in command.params if p.name != "help"), cmd


def _flags(command: str) -> set[str]:
    params = typer.main.get_command(app).commands[command].params
    return {f for p in params for f in (*p.opts, *p.secondary_opts)}


def test_run_and_serve_take_every_setting_and_embed_every_embedding_one() -> None:
    def flags(cls, skip=()) -> set[str]:
        return {
            (f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",))[0].split("/")[0]
            for f in dataclasses.fields(cls)
            if "help" in f.metadata and f.name not in skip
        }

    # split_from: a run over several backbones sets it itself (embed takes it)
    skip = {"seed", "split_from"}
    every = set().union(*(flags(cls, skip=skip) for cls in (*STAGES, PipelineSettings)))
    assert {"--ft-batch-size", "--decode-threads", "--engine-workers", "--head"} <= every
    assert every <= _flags("run") and every <= _flags("serve")
    embedding = set().union(*(flags(c) for c in (EmbedSettings, IndexSettings, EngineSettings)))
    assert embedding <= _flags("embed")
    assert flags(FineTuneSettings) <= _flags("finetune")
    assert "--workers" in _flags("embed")  # the old name of --decode-threads still works


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path) -> None:
    for args, message in [
        (["embed", str(tmp_path), "--batch-size", "0"], "--batch-size (embed.batch_size) must"),
        (["run", str(tmp_path), "--strategy", "most"], "must be one of head, partial, full"),
        (["index", "--recall", "1.5"], "--recall (index.recall) must be in (0, 1]"),
        (["embed", str(tmp_path), "--address", "tcp://x:1"], "add --engine dask"),
        (["run", str(tmp_path), "--head", "tree"], "--head (heads) takes logreg"),
        (["embed", str(tmp_path), "--batch-size", "-1"], "must be at least 1, not -1"),
        (["embed", str(tmp_path), "--workers", "-1"], "must be at least 0, not -1"),
        (["predict", "x.jpg", "--top", "0"], "greater than or equal to 1"),
        (["map", "--points", "0"], "greater than or equal to 2"),
        (["serve", str(tmp_path), "--cron", "61 * * * *"], "not a valid cron schedule"),
    ]:
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output and "Traceback" not in res.output, res.output


def test_demo_then_search_predict_info(prefect_server, mlflow_tmp, tmp_path) -> None:
    ws = str(tmp_path / "ws")
    out = _ok(["demo", "--workspace", ws, "--per-class", "5", "--epochs", "1", "--target", "1.01"])
    for model in ("logreg", "linear_svm", "rbf_svm", "knn", "finetune:full"):
        assert model in out
    assert "mlflow ui --backend-store-uri" in out and "escalate to fine-tuning" in out
    assert "fine-tuned finetune:full at 64 px" in out and "the best head" in out

    rows = json.loads(_ok(["compare", "--workspace", ws, "--json"]))
    assert {r["model"] for r in rows} == {"logreg", "linear_svm", "rbf_svm", "knn", "finetune:full"}
    assert len({r["parent_run_id"] for r in rows}) == 1
    assert all(r["accuracy"] is not None and r["log_loss"] is not None for r in rows)
    table = _ok(["compare", "--workspace", ws, "--last", "1"])
    assert "finetune:full" in table and "test acc" in table
    tuned = next(r["finetuned_backbone"] for r in rows if r["kind"] == "finetune")
    query = sorted((tmp_path / "ws" / "sample" / "digits" / "3").iterdir())[0]

    hits = json.loads(_ok(["search", str(query), "-k", "3", "--workspace", ws, "--json"]))["hits"]
    assert hits[0]["path"] == str(query.resolve()) and hits[0]["score"] > 0.999
    assert len(hits) == 3
    assert "nearest to" in _ok(["search", str(query), "--workspace", ws])

    preds = json.loads(_ok(["predict", str(query), "--workspace", ws, "--json"]))
    assert preds[0]["label"] in {str(d) for d in range(10)}
    assert abs(sum(t["score"] for t in preds[0]["top"]) - 1) < 0.5  # top-3 of a distribution
    args = ["predict", str(query), "--model", tuned, "--workspace", ws, "--json", "--top", "10"]
    preds = json.loads(_ok(args))
    assert preds[0]["model"] == tuned and preds[0]["label"] in {str(d) for d in range(10)}
    assert abs(sum(t["score"] for t in preds[0]["top"]) - 1) < 1e-3  # all 10 classes

    info = json.loads(_ok(["info", "--workspace", ws, "--json"]))
    assert info["rows"] == 50 and info["index_consistent"] and info["heads"]["best"]
    assert "backbone" in _ok(["info", "--workspace", ws])


def test_embed_train_run_on_a_folder(prefect_server, mlflow_tmp, digits_dir, tmp_path) -> None:
    ws = str(tmp_path / "ws")
    report = json.loads(_ok(["embed", str(digits_dir), "--workspace", ws, "--json"]))
    assert report["embedded"] == 100
    again = json.loads(_ok(["embed", str(digits_dir), "--workspace", ws, "--json"]))
    assert again["embedded"] == 0 and again["rows"] == 100
    trained = json.loads(_ok(["train", "--workspace", ws, "--head", "logreg", "--json"]))
    assert [h["head"] for h in trained["heads"]] == ["logreg"]
    small = ["--epochs", "1", "--image-size", "32", "--no-flip"]
    args = ["run", str(digits_dir), "--workspace", ws, "--finetune", "--json", *small]
    result = json.loads(_ok([*args, "--strategy", "partial", "--blocks", "1"]))
    assert result["decision"]["escalate"] and "requested" in result["decision"]["reason"]
    tuned = result["finetune"]["backbone"]
    params = result["finetune"]["params"]
    assert params | {"strategy": "partial", "image_size": 32, "blocks": 1} == params

    # The fine-tuned network is a backbone: embed with it, train heads on its store.
    store = str(tmp_path / "adapted")
    args = ["embed", str(digits_dir), "--backbone", tuned, "--store", store, "--workspace", ws]
    report = json.loads(_ok([*args, "--json"]))
    assert report["rows"] == 100 and report["backbone"] == tuned
    heads = json.loads(_ok(["train", "--store", store, "--workspace", ws, "--json"]))
    assert heads["heads"][0]["accuracy"] > 0.5
    query = sorted((digits_dir / "1").iterdir())[0]
    args = ["search", str(query), "--store", store, "--workspace", ws, "-k", "3", "--json"]
    hits = json.loads(_ok(args))["hits"]  # searched with the adapted embeddings
    assert hits[0]["path"] == str(query.resolve()) and hits[0]["score"] > 0.999

    # `finetune` on a store by itself, and settings it refuses.
    alone = json.loads(_ok(["finetune", "--workspace", ws, "--strategy", "head", "--json", *small]))
    assert alone["finetune"]["head"] == "finetune:head"
    res = runner.invoke(app, ["finetune", "--workspace", ws, "--strategy", "all"])
    assert res.exit_code == 2 and "must be one of head, partial, full, not 'all'" in res.output
    res = runner.invoke(app, ["compare", "--workspace", ws, "--experiment", "nope"])
    assert res.exit_code == 2 and "no MLflow experiment 'nope'" in res.output


def test_bad_input_gets_a_message_not_a_traceback(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["embed", str(tmp_path / "empty"), "--workspace", str(tmp_path)])
    assert res.exit_code == 2 and "no images found" in res.output
    one = tmp_path / "one" / "cat"
    one.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(one / f"{i}.png")
    res = runner.invoke(app, ["run", str(tmp_path / "one"), "--workspace", str(tmp_path)])
    assert res.exit_code == 2 and "single class" in res.output
    res = runner.invoke(app, ["run", str(tmp_path / "one"), "--backbone", "vgg"])
    assert res.exit_code == 2 and "unknown backbone" in res.output
    res = runner.invoke(app, ["search", str(one / "0.png"), "--workspace", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no store found" in res.output
    assert "Traceback" not in res.output


def test_serve_registers_a_scheduled_deployment(prefect_server, digits_dir, tmp_path) -> None:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "serve",
            str(digits_dir),
            "--cron",
            "*/5 * * * *",
            "--name",
            "test-serve",
            "--workspace",
            str(tmp_path),
            "--batch-size",
            "16",
            "--index",
            "flat",
            "--strategy",
            "head",
            "--seed",
            "3",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    import asyncio

    async def find():
        async with get_client() as client:
            try:
                return await client.read_deployment_by_name("pipeline/test-serve")
            except Exception:
                return None

    try:
        deadline = time.monotonic() + 120
        dep = None
        while dep is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(2)
            dep = asyncio.run(find())
        assert dep is not None, proc.stdout.read() if proc.poll() is not None else "timeout"
        assert dep.parameters["source"] == str(digits_dir.resolve())
        settings = dep.parameters["settings"]  # every setting of `run`, as the flow takes them
        assert settings["embed"]["batch_size"] == 16 and settings["index"]["kind"] == "flat"
        assert settings["finetune"]["strategy"] == "head"
        assert settings["embed"]["seed"] == settings["finetune"]["seed"] == 3
        assert any(s.schedule.cron == "*/5 * * * *" for s in dep.schedules)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_embed_with_layers_logs_stage_throughput(
    prefect_server, mlflow_tmp, digits_dir, tmp_path
) -> None:
    import mlflow

    ws = str(tmp_path / "ws")
    store = str(tmp_path / "layered")
    args = ["embed", str(digits_dir), "--store", store, "--workspace", ws, "--layers=-1"]
    report = json.loads(_ok([*args, "--json"]))
    assert report["rows"] == 100 and report["stats"]["images_per_s"] > 0
    from extractors.store.store import Store

    assert Store(store).features() == ["embedding", "emb_blocks_6"]
    runs = mlflow.search_runs(experiment_names=[report["source_name"]])
    run = runs[runs["run_id"] == report["run_id"]].iloc[0]
    for stage in ("decode", "model", "write"):
        assert run[f"metrics.embed_{stage}_ms_per_image"] > 0
    assert run["metrics.images_embedded"] == 100
    res = runner.invoke(app, ["embed", str(digits_dir), "--store", store, "--layers=-2"])
    assert res.exit_code == 2 and "holds layer columns" in res.output
    preds = json.loads(
        _ok(["train", "--store", store, "--workspace", ws, "--head", "logreg", "--json"])
    )
    assert preds["heads"][0]["params"].get("feature", "embedding") in ("embedding", "emb_blocks_6")
    query = str(sorted((digits_dir / "2").iterdir())[0])
    out = json.loads(_ok(["predict", query, "--store", store, "--workspace", ws, "--json"]))
    assert out[0]["label"] in {"0", "1", "2", "3"}


def test_dedup_command(planted, tmp_path) -> None:
    store, copies = planted
    out = tmp_path / "groups.csv"
    res = runner.invoke(app, ["dedup", "--store", str(store.path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "3 groups, 6 images" in res.stdout and out.exists()
    res = runner.invoke(app, ["dedup", "--store", str(store.path), "--json"])
    assert {r["path"] for r in json.loads(res.stdout)} == set(copies) | set(copies.values())
    res = runner.invoke(app, ["dedup", "--store", str(tmp_path / "none")])
    assert res.exit_code == 2 and "holds no embeddings yet" in res.output


def test_index_choice_tuning_and_map(prefect_server, mlflow_tmp, digits_dir, tmp_path) -> None:
    import mlflow

    ws, store = str(tmp_path / "ws"), str(tmp_path / "st")
    args = ["embed", str(digits_dir), "--store", store, "--workspace", ws, "--json"]
    report = json.loads(_ok([*args, "--index", "hnsw", "--recall", "0.9"]))
    entry = report["index"]
    assert entry["type"] == "IDMap2,HNSW32,Flat" and entry["choice"]["reason"] == "asked for hnsw"
    assert entry["settings"]["recall"] == 0.9 and entry["tuning"]["queries"] == 10
    client = mlflow.MlflowClient()
    run = client.get_run(report["run_id"])
    assert run.data.params["index_type"] == "IDMap2,HNSW32,Flat"
    assert 0 < run.data.metrics["index_recall_at_10"] <= 1
    names = {a.path for a in client.list_artifacts(report["run_id"])}
    assert {"index_curve.csv", "index_curve.png"} <= names

    # Switch the index of the existing store; info and search follow.
    changed = json.loads(_ok(["index", "--store", store, "--index", "ivf_pq", "--json"]))
    assert changed["choice"]["kind"] == "ivf_pq" and changed["settings"]["recall"] == 0.9
    assert changed["history"][-1]["action"].startswith("built (asked to rebuild)")
    text = _ok(["info", "--store", store, "--workspace", ws])
    assert "IVF" in text and "asked for ivf_pq" in text
    query = sorted((digits_dir / "3").iterdir())[1]
    hits = json.loads(_ok(["search", str(query), "--store", store, "-k", "2", "--json"]))["hits"]
    assert hits[0]["path"] == str(query.resolve()) and hits[0]["score"] > 0.999
    auto = json.loads(_ok(["index", "--store", store, "--index", "auto", "--json"]))
    assert auto["choice"]["kind"] == "flat"  # 100 rows: exact search
    res = runner.invoke(app, ["index", "--store", store, "--max-memory", "lots"])
    assert res.exit_code == 2 and "512MB" in res.output

    out = _ok(["map", "--store", store, "--out", str(tmp_path / "digits-map.png")])
    assert "tsne map of 100 rows" in out
    assert (tmp_path / "digits-map.png").stat().st_size > 10_000
    assert (
        "MAP_DATA" not in (tmp_path / "digits-map.html").read_text().split("const INLINE")[1][:20]
    )


def test_rerun_on_unchanged_data_reuses_heads_and_says_why(
    prefect_server, mlflow_tmp, digits_dir, tmp_path
) -> None:
    import shutil

    import mlflow

    src = tmp_path / "digits"
    shutil.copytree(digits_dir, src)
    ws = str(tmp_path / "ws")
    args = ["run", str(src), "--workspace", ws, "--target", "0", "--json"]
    first = json.loads(_ok(args))
    assert first["retrain_reason"] == "first training of this store"
    second = json.loads(_ok(args))
    assert second["reused_from"] == first["run_id"] and second["embed"]["embedded"] == 0
    assert "data unchanged" in second["retrain_reason"]
    assert [h["head"] for h in second["heads"]] == [h["head"] for h in first["heads"]]
    run = mlflow.MlflowClient().get_run(second["run_id"])
    assert run.data.params["heads_retrained"] == "False"
    assert "data unchanged" in run.data.tags["retrain_reason"]
    text = _ok(["run", str(src), "--workspace", ws, "--target", "0"])
    assert "nothing new" in text

    # A grown folder: the new image is embedded and the heads are trained again.
    shutil.copy(sorted((src / "1").iterdir())[0], src / "1" / "extra.png")
    Image.open(src / "1" / "extra.png").rotate(90).save(src / "1" / "extra.png")
    third = json.loads(_ok(args))
    assert third["embed"]["embedded"] == 1 and "reused_from" not in third
    assert third["retrain_reason"].startswith("data changed")
    forced = json.loads(_ok([*args, "--retrain"]))
    assert forced["retrain_reason"] == "asked to retrain (--retrain)"


def test_embed_compile_gives_the_eager_store(
    prefect_server, mlflow_tmp, digits_dir, built_store, tmp_path
) -> None:
    """`embed --compile` runs the compiled network and lands the same rows as the eager one."""
    import numpy as np

    store = tmp_path / "compiled"
    args = ["embed", str(digits_dir), "--store", str(store), "--workspace", str(tmp_path)]
    report = json.loads(_ok([*args, "--compile", "--json"]))
    assert report["compiled"] is True and report["embedded"] == 100
    assert report["model_path"] == "compiled (--compile)"
    want, got = built_store.table().sort_by("id"), Store(store).table().sort_by("id")
    assert got["id"].equals(want["id"]) and Store(store).verify() == []
    emb = [np.stack(t["embedding"].to_numpy(zero_copy_only=False)) for t in (want, got)]
    np.testing.assert_allclose(emb[1], emb[0], atol=1e-4)


def test_cli_runs_are_prefect_flow_runs_when_a_server_is_set(
    prefect_server, mlflow_tmp, digits_dir, tmp_path, monkeypatch
) -> None:
    """Without PREFECT_API_URL the CLI runs in-process (the other tests); with it, the same
    run is a Prefect flow run on that server, visible in its UI."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    ws = tmp_path / "ws"
    report = json.loads(_ok(["embed", str(digits_dir), "--workspace", str(ws), "--json"]))
    assert report["embedded"] == 100 and report["run_id"]

    async def flow_runs():
        async with get_client() as client:
            top = FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True))
            return await client.read_flow_runs(flow_run_filter=top)

    ours = [r for r in asyncio.run(flow_runs()) if r.parameters.get("workspace") == str(ws)]
    assert len(ours) == 1 and ours[0].state.is_completed()
    assert ours[0].parameters["source"] == str(digits_dir)
