"""MLflow tracking: where the store is, one parent run per pipeline run, a nested run per head."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from heads.evaluate import METRICS, HeadResult
from heads.plots import confusion_matrix_png


def tracking_uri(workspace: str | Path) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite store at <workspace>/mlflow.db."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = Path(workspace).resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def ui_command(workspace: str | Path) -> str:
    """The exact command that opens the MLflow UI on this store."""
    return f"uv run mlflow ui --backend-store-uri {tracking_uri(workspace)} --port 5000"


def experiment_id(name: str, workspace: str | Path) -> str:
    """Get or create the experiment; with the default store its artifacts live in the workspace."""
    mlflow.set_tracking_uri(tracking_uri(workspace))
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(name, workspace))


def artifact_location(experiment: str, workspace: str | Path) -> str | None:
    """Where a new experiment keeps its files: beside the SQLite database (`mlartifacts/`).

    MLflow's own default for a database store is `./mlruns` under whatever folder the command
    runs in, which scatters artifacts (and once filled a git checkout); a tracking server
    (http/https URIs) decides for itself, so None there.
    """
    uri = tracking_uri(workspace)
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///")).resolve()  # sqlite:////abs or sqlite:///rel
    return (db.parent / "mlartifacts" / experiment).as_uri()


def start_parent_run(
    experiment: str, workspace: str | Path, run_name: str, params: dict[str, Any]
) -> str:
    """Create the pipeline's parent run and return its id (it stays open until `end_run`)."""
    exp_id = experiment_id(experiment, workspace)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as run:
        mlflow.log_params({k: _short(v) for k, v in params.items()})
        mlflow.set_tag("headstart.kind", "pipeline")
    client = MlflowClient()
    client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def end_run(run_id: str, workspace: str | Path, status: str = "FINISHED") -> None:
    mlflow.set_tracking_uri(tracking_uri(workspace))
    MlflowClient().set_terminated(run_id, status=status)


@contextlib.contextmanager
def closing_run(run_id: str, workspace: str | Path) -> Iterator[None]:
    """End the run FINISHED when the block succeeds, FAILED (and re-raise) when it does not."""
    try:
        yield
    except BaseException:
        end_run(run_id, workspace, "FAILED")
        raise
    end_run(run_id, workspace, "FINISHED")


def log_to_run(
    run_id: str,
    workspace: str | Path,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
    artifacts: list[Path] | None = None,
) -> None:
    """Add params, metrics, tags and files to an existing run."""
    mlflow.set_tracking_uri(tracking_uri(workspace))
    client = MlflowClient()
    for k, v in (params or {}).items():
        client.log_param(run_id, k, _short(v))
    for k, v in (metrics or {}).items():
        client.log_metric(run_id, k, float(v))
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, str(v))
    for path in artifacts or []:
        client.log_artifact(run_id, str(path))


def log_head_run(
    parent_run_id: str,
    workspace: str | Path,
    result: HeadResult,
    saved_head: Path,
    context: dict[str, Any],
) -> str:
    """A nested run for one head: params, the same metric names for every head, artifacts."""
    mlflow.set_tracking_uri(tracking_uri(workspace))
    exp_id = MlflowClient().get_run(parent_run_id).info.experiment_id
    with mlflow.start_run(
        experiment_id=exp_id, run_name=result.name, nested=True, parent_run_id=parent_run_id
    ) as run:
        mlflow.set_tag("headstart.kind", "head")
        mlflow.set_tag("headstart.head", result.name)
        params = {f"head.{k}": v for k, v in result.estimator.get_params(deep=True).items()}
        params = {k: v for k, v in params.items() if not hasattr(v, "get_params")}
        mlflow.log_params({k: _short(v) for k, v in {**context, **params}.items()})
        mlflow.log_params({f"chosen.{k}": v for k, v in result.params.items()})
        mlflow.log_metric("val_accuracy", result.val_accuracy)
        for value, acc in result.val_scores.items():
            mlflow.log_metric(f"val_sweep_accuracy_{value}", acc)
        mlflow.log_metrics({m: result.metrics[m] for m in METRICS if m in result.metrics})
        mlflow.log_metric("fit_seconds", result.fit_seconds)
        with tempfile.TemporaryDirectory() as tmp:
            cm = confusion_matrix_png(
                result.confusion,
                result.classes,
                f"{result.name}: test accuracy {result.metrics['accuracy']:.3f}",
                Path(tmp) / "confusion_matrix.png",
            )
            report = Path(tmp) / "classification_report.txt"
            report.write_text(result.report)
            mlflow.log_artifact(str(cm))
            mlflow.log_artifact(str(report))
        mlflow.log_artifact(str(saved_head), artifact_path="head")
        mlflow.log_artifact(str(saved_head.with_suffix(".json")), artifact_path="head")
        return run.info.run_id


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."
