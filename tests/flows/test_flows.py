"""Prefect flows under one session-scoped server, MLflow in a temporary SQLite store."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from flows.settings import PipelineSettings
from heads.evaluate import METRICS
from heads.settings import FineTuneSettings

pytestmark = pytest.mark.slow


FT = FineTuneSettings(epochs=2, image_size=32, flip=False, batch_size=16)


def test_pipeline_flow_tracks_heads_finetune_and_registry(
    prefect_server, digits_dir, mlflow_tmp, tmp_path
) -> None:
    from flows.pipeline import pipeline

    settings = PipelineSettings(target=1.01, finetune=FT)
    result = pipeline(str(digits_dir), settings=settings, workspace=str(tmp_path), progress=False)
    assert result["embed"]["embedded"] == 100
    assert result["decision"]["escalate"] is True  # no head can reach 1.01
    assert "< target" in result["decision"]["reason"]
    tuned = result["finetune"]
    assert tuned["head"] == "finetune:full" and tuned["backbone"].startswith("finetuned:")
    assert tuned["epochs_run"] == 2 and "vs_best_head" in tuned

    mlflow.set_tracking_uri(mlflow_tmp)
    client = MlflowClient()
    exp = client.get_experiment_by_name("digits")
    parent = client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["backbone"] == "efficientnet_lite0"
    assert parent.data.params["fingerprint"] == result["embed"]["fingerprint"]
    assert parent.data.params["escalate"] == "True"
    assert parent.data.params["finetune.epochs"] == "2"  # every setting, flattened
    assert parent.data.params["embed.batch_size"] == "32"
    assert parent.data.tags["escalation_reason"] == result["decision"]["reason"]
    assert parent.data.metrics["images_embedded"] == 100
    assert parent.data.tags["finetuned_backbone"] == tuned["backbone"]
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{result['run_id']}'"
    )
    kinds = sorted(c.data.tags["headstart.head"] for c in children)
    assert kinds == ["finetune:full", "knn", "linear_svm", "logreg", "rbf_svm"]
    metric_names = {frozenset(set(c.data.metrics) & set(METRICS)) for c in children}
    assert metric_names == {frozenset(set(METRICS) - {"top5_accuracy"})}  # same for every model
    for child in children:
        files = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"confusion_matrix.png", "classification_report.txt", "per_class.json"} <= files
        if child.data.tags["headstart.kind"] == "head":
            assert {"val_sweep.png", "val_sweep.csv", "head"} <= files
        else:
            assert {"curves.png", "network"} <= files
            history = client.get_metric_history(child.info.run_id, "val_accuracy")
            assert sorted(m.step for m in history) == [0, 1]
    assert "embedding_map.png" in {a.path for a in client.list_artifacts(result["run_id"])}
    # The run's Prefect artifacts: its heads table and a link to its MLflow run.
    table, link = _artifacts("heads-digits"), _artifacts("mlflow-digits")
    heads_rows = json.loads(table[-1].data)
    assert [r["head"] for r in heads_rows][-1] == "finetune:full"
    assert {r["head"] for r in heads_rows} == set(kinds)
    assert heads_rows[0]["mlflow_run"] in {c.info.run_id for c in children}
    assert f"/#/experiments/{exp.experiment_id}/runs/{result['run_id']}" in link[-1].data
    # Each head is an MLflow model (MLflow 3 keeps them as logged models of their run).
    models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    head_runs = {c.info.run_id for c in children if c.data.tags["headstart.kind"] == "head"}
    image_models = [m for m in models if m.name == "image_model"]
    models = [m for m in models if m.name != "image_model"]
    assert {m.source_run_id for m in models} == head_runs
    # An image model beside the best head and beside the fine-tuned network, both registered.
    tuned_run = next(c for c in children if c.data.tags["headstart.kind"] == "finetune")
    best_run = next(c for c in children if c.info.run_id == heads_rows[0]["mlflow_run"])
    assert {m.source_run_id for m in image_models} == {best_run.info.run_id, tuned_run.info.run_id}
    versions = client.search_model_versions("name = 'digits-image'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert result["champion"]["line"].startswith("champion: digits-image version")
    assert "champion_decision" in client.get_model_version("digits-image", "2").tags
    assert _artifacts("champion-digits")[-1].data.startswith("champion: digits-image")
    for m in models:
        info = mlflow.models.get_model_info(f"models:/{m.model_id}")
        assert (
            "sklearn" in info.flavors and info.flavors["sklearn"]["serialization_format"] == "skops"
        )
        assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1280]

    # The best head is registered and loads back through pyfunc (skops inside, no pickle).
    reg = result["registered"]
    assert reg["uri"] == "models:/digits-head@newest"
    version = client.get_model_version_by_alias("digits-head", "newest")
    assert int(version.version) == reg["version"]
    from extractors.store.store import Store

    X = Store(result["store"]).arrays(where_labelled=True)[0][:4]
    preds = mlflow.pyfunc.load_model(reg["uri"]).predict(X)
    # The model ships the code its head imports (heads/ and extractors/), not just heads/.
    code = Path(mlflow.artifacts.download_artifacts(reg["uri"])) / "code"
    assert (code / "heads" / "knn.py").exists() and (code / "extractors" / "common.py").exists()
    assert set(preds) <= {"0", "1", "2", "3"}

    # Scheduled re-runs over the same folder embed nothing new and reuse the heads, and
    # say so in the run's log...
    quiet = PipelineSettings(target=None)
    state = pipeline(
        str(digits_dir), settings=quiet, workspace=str(tmp_path), progress=False, return_state=True
    )
    again = state.result()
    log = _flow_run_log(state.state_details.flow_run_id)
    assert "nothing new: 100 images unchanged" in log
    assert f"heads: data unchanged since run {result['run_id']}" in log
    assert again["embed"]["embedded"] == 0 and again["embed"]["kept"] == 100
    assert again["finetune"] is None and "no target" in again["decision"]["reason"]
    assert again["reused_from"] == result["run_id"]
    assert int(client.get_model_version_by_alias("digits-head", "newest").version) == 1
    # ...unless asked to retrain: then the best head is a new version under the alias.
    retrain = quiet.replace(retrain=True)
    forced = pipeline(str(digits_dir), settings=retrain, workspace=str(tmp_path), progress=False)
    assert "reused_from" not in forced
    assert int(client.get_model_version_by_alias("digits-head", "newest").version) == 2
    # The third run over unchanged content is a cache hit of the embed step (keyed on the
    # files, the backbone and the store, not on the flow run): nothing embedded.
    assert forced["embed"]["cached"] is True and forced["embed"]["embedded"] == 0


def _flow_run_log(flow_run_id) -> str:
    """The run's log as the Prefect server holds it (what the UI shows)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs go to the API in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(entry.message for entry in logs)


def _artifacts(key: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )

    found = sorted(asyncio.run(read()), key=lambda a: a.created)
    assert found, f"no Prefect artifact {key!r}"
    return found


def test_a_busy_store_is_retried_with_backoff(
    prefect_server, digits_dir, mlflow_tmp, tmp_path
) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from extractors.store.store import Store, StoreBusy, StoreError
    from flows.pipeline import embed, is_transient

    src = tmp_path / "digits"
    shutil.copytree(digits_dir, src)
    first = embed(str(src), workspace=str(tmp_path), progress=False)
    store = Store(first["store"])
    # One new image, so the second run has to write (an unchanged store needs no lock).
    Image.open(next((src / "1").iterdir())).rotate(90).save(src / "1" / "new.png")
    held = threading.Event()

    def hold_lock() -> None:  # another writer, for 2 s
        with store.lock():
            held.set()
            time.sleep(2)

    writer = threading.Thread(target=hold_lock)
    writer.start()
    held.wait()
    state = embed(
        str(src), workspace=str(tmp_path), progress=False, retry_delay_s=1, return_state=True
    )
    writer.join()
    assert state.is_completed() and state.result()["embedded"] == 1

    async def task_runs():
        async with get_client() as client:
            ids = FlowRunFilterId(any_=[state.state_details.flow_run_id])
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=ids))

    (run,) = [t for t in asyncio.run(task_runs()) if t.name.startswith("embed-source")]
    assert run.run_count >= 2  # failed on the lock, retried after the backoff
    assert is_transient(StoreBusy("busy")) and not is_transient(StoreError("bad backbone"))
    assert is_transient(ConnectionRefusedError()) and not is_transient(ValueError("bad input"))


def test_prefect_server_records_flow_runs(prefect_server) -> None:
    from prefect import flow, get_client

    @flow
    def ping() -> str:
        return "pong"

    state = ping(return_state=True)
    assert state.result() == "pong"
    import asyncio

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(state.state_details.flow_run_id)

    run = asyncio.run(read())
    assert run.state.is_completed()


def test_failed_training_marks_the_run_failed(
    prefect_server, built_store, mlflow_tmp, tmp_path
) -> None:
    from flows.pipeline import train_heads

    with pytest.raises(Exception, match="unknown head"):
        train_heads(str(built_store.path), heads=["tree"], workspace=str(tmp_path))
    mlflow.set_tracking_uri(mlflow_tmp)
    runs = mlflow.search_runs(experiment_names=["digits"])
    assert list(runs["status"]) == ["FAILED"]
