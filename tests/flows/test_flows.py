"""Prefect flows under one session-scoped server, MLflow in a temporary SQLite store."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from heads.evaluate import METRICS

pytestmark = pytest.mark.slow


def test_pipeline_flow_tracks_parent_and_nested_runs(
    prefect_server, digits_dir, mlflow_tmp, tmp_path
) -> None:
    from flows.pipeline import pipeline

    result = pipeline(str(digits_dir), workspace=str(tmp_path), target=1.01, progress=False)
    assert result["embed"]["embedded"] == 100
    assert result["decision"]["escalate"] is True  # no head can reach 1.01
    assert "< target" in result["decision"]["reason"]

    mlflow.set_tracking_uri(mlflow_tmp)
    client = MlflowClient()
    exp = client.get_experiment_by_name("digits")
    parent = client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["backbone"] == "efficientnet_lite0"
    assert parent.data.params["fingerprint"] == result["embed"]["fingerprint"]
    assert parent.data.params["escalate"] == "True"
    assert parent.data.metrics["images_embedded"] == 100
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{result['run_id']}'"
    )
    assert sorted(c.data.tags["headstart.head"] for c in children) == ["knn", "logreg", "svm"]
    for child in children:
        assert {"accuracy", "macro_f1", "balanced_accuracy"} <= set(child.data.metrics)
        assert set(child.data.metrics) & set(METRICS) == {
            "accuracy",
            "balanced_accuracy",
            "macro_f1",
        }
        files = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"confusion_matrix.png", "classification_report.txt", "head"} <= files
    assert "embedding_map.png" in {a.path for a in client.list_artifacts(result["run_id"])}

    # Scheduled re-runs over the same folder embed nothing new.
    again = pipeline(str(digits_dir), workspace=str(tmp_path), progress=False)
    assert again["embed"]["embedded"] == 0 and again["embed"]["kept"] == 100


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
