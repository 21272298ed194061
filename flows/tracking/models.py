"""Models in MLflow: a nested run per head or fine-tuned network (the same params and metric
names for both, plots, test predictions), heads logged as MLflow models with pinned
requirements and the code they import, and registered versions."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from flows.tracking.store import registry_lock
from flows.tracking.tracker import Tracker

if TYPE_CHECKING:
    from heads.evaluate import HeadResult

ROOT = Path(__file__).resolve().parents[2]
# What a logged model ships as code: heads/, and extractors/ for what heads import, so it
# loads outside this checkout.
MODEL_CODE = ("heads", "extractors")
HEAD_REQUIREMENTS = ("scikit-learn", "skops", "numpy", "scipy", "faiss-cpu", "torch")
TEST_TABLE = "test_predictions.json"


def model_code_paths() -> list[str]:
    """The folders a logged model ships as its code (`MODEL_CODE`)."""
    return [str(ROOT / package) for package in MODEL_CODE]


def _metrics() -> tuple[str, ...]:
    """The metric names every model row logs (heads/evaluate.py; imported when needed, so
    an embed run does not load scikit-learn)."""
    from heads.evaluate import METRICS

    return tuple(METRICS)


def log_head_run(
    tracker: Tracker,
    parent_run_id: str,
    result: HeadResult,
    saved_head: Path,
    context: dict[str, Any],
    example: np.ndarray,
    test_rows: dict[str, list[Any]],
) -> tuple[str, str]:
    """A nested run for one head: params, the same metric names as every model, the sweep,
    plots, its test predictions, and the head as an MLflow model (skops, no pickle) with an
    input signature.

    Returns (run id, model URI)."""
    params = vocabulary(result, context)
    data = (context["manifest"], Path(context["store"])) if "manifest" in context else None
    fit = result.fit_seconds
    with tracker.model_run(parent_run_id, result.name, "head", fit, params, data) as run:
        mlflow.set_tags({"headstart.head": result.name})
        _log_scores(result)
        mlflow.log_metric("sweep_points", len(result.sweep))
        _log_result_files(result, sweep=True)
        log_test_predictions(result, test_rows)
        mlflow.log_artifact(str(saved_head), artifact_path="head")
        mlflow.log_artifact(str(saved_head.with_suffix(".json")), artifact_path="head")
        model_uri = _log_model(result, example)
        return run.info.run_id, model_uri


def log_finetune_run(
    tracker: Tracker,
    parent_run_id: str,
    result: HeadResult,
    history: list[dict[str, float]],
    params: dict[str, Any],
    model_dir: Path,
    test_rows: dict[str, list[Any]],
    skipped: list[dict[str, str]] = (),
) -> str:
    """A nested run for a fine-tuned network: per-epoch curves, the same test metrics as the
    heads (same test split), plots, the network (state dicts + config) as artifacts, and the
    files it skipped because they no longer decode (`skipped_files.json`, with reasons)."""
    from heads.plots import curves_png

    shared = vocabulary(result, params)
    rest = {k: v for k, v in params.items() if k not in shared and k != "manifest"}
    data = (params["manifest"], Path(params["store"])) if "manifest" in params else None
    fit = result.fit_seconds
    with tracker.model_run(parent_run_id, result.name, "finetune", fit, shared | rest, data) as run:
        mlflow.set_tags(
            {"headstart.head": result.name, "headstart.backbone": result.extra["backbone"]}
        )
        for row in history:
            step = int(row["epoch"])
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=step)
        _log_scores(result)
        mlflow.log_metric("skipped_files", len(skipped))
        log_test_predictions(result, test_rows)
        if skipped:
            mlflow.log_dict({"skipped": list(skipped)}, "skipped_files.json")
        _log_result_files(result, sweep=False)
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(curves_png(history, result.name, Path(tmp) / "curves.png")))
        mlflow.log_artifacts(str(model_dir), artifact_path="network")
        return run.info.run_id


def vocabulary(result: HeadResult, context: dict[str, Any]) -> dict[str, Any]:
    """The parameters of every model row, head or fine-tuned network alike: `backbone` (the
    one its features come from), `model` (head name or fine-tuning strategy), `feature`,
    `store`, `fingerprint`, `selection_metric` and the `chosen.*` values; no object dumps."""
    chosen = {k: v for k, v in result.params.items() if k != "feature"}
    return {
        "backbone": context["backbone"],
        "model": result.name,
        "feature": result.params.get("feature", "embedding"),
        "store": context.get("store"),
        "fingerprint": context.get("fingerprint"),
        "selection_metric": result.selection_metric,
        **{f"chosen.{k}": v for k, v in chosen.items()},
    }


def _log_scores(result: HeadResult) -> None:
    """The active run's validation score, test metrics and fit time."""
    mlflow.log_metric("val_score", result.val_score)
    mlflow.log_metrics({m: result.metrics[m] for m in _metrics() if m in result.metrics})
    mlflow.log_metric("fit_seconds", result.fit_seconds)


def _log_result_files(result: HeadResult, sweep: bool) -> None:
    """Confusion matrix, classification report, per-class table and (heads) the sweep."""
    from heads.plots import confusion_matrix_png, sweep_png

    mlflow.log_dict(result.per_class, "per_class.json")
    mlflow.log_text(result.report, "classification_report.txt")
    with tempfile.TemporaryDirectory() as tmp:
        files = [
            confusion_matrix_png(
                result.confusion,
                result.classes,
                f"{result.name}: test accuracy {result.metrics['accuracy']:.3f}",
                Path(tmp) / "confusion_matrix.png",
            )
        ]
        if sweep and result.sweep:
            csv = Path(tmp) / "val_sweep.csv"
            cols = list(result.sweep[0])
            lines = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in result.sweep]
            csv.write_text("\n".join(lines) + "\n")
            files += [csv, sweep_png(result, Path(tmp) / "val_sweep.png")]
        for f in files:
            mlflow.log_artifact(str(f))


def log_test_predictions(result: HeadResult, test_rows: dict[str, list[Any]]) -> None:
    """The active run's predictions on the test split, one row per image (path, sha256,
    label, prediction, probability, correct, loss): what the champion rule compares, and
    which images each model gets wrong, as an MLflow table; and `mistakes.png`, the gallery
    of its worst mistakes and most confused pairs."""
    import pandas as pd

    proba = np.asarray(result.test_proba, dtype=np.float64)
    classes = np.asarray(result.classes, dtype=object)
    labels = np.asarray([str(v) for v in test_rows["label"]], dtype=object)
    index = {c: i for i, c in enumerate(result.classes)}
    truth = proba[np.arange(len(labels)), [index[v] for v in labels]]
    pred = classes[proba.argmax(axis=1)]
    frame = pd.DataFrame(
        {
            "path": test_rows["path"],
            "sha256": test_rows["sha256"],
            "label": labels,
            "prediction": pred,
            "probability": proba.max(axis=1),
            "correct": pred == labels,
            "loss": -np.log(np.clip(truth, 1e-7, 1)),
        }
    )
    mlflow.log_table(frame, TEST_TABLE)
    from heads.plots import mistakes_png

    with tempfile.TemporaryDirectory() as tmp:
        rows = frame.to_dict("records")
        mlflow.log_artifact(str(mistakes_png(rows, result.name, Path(tmp) / "mistakes.png")))


def _log_model(result: HeadResult, example: np.ndarray) -> str:
    """The fitted head as an MLflow sklearn model in skops format with a real-rows signature."""
    import mlflow.sklearn
    from mlflow.models import infer_signature

    from heads.persist import TRUSTED_TYPES

    X = np.asarray(example[:5], dtype=np.float32)
    with explicit_requirements():
        info = mlflow.sklearn.log_model(
            result.estimator,
            name="model",
            serialization_format="skops",
            skops_trusted_types=sorted(TRUSTED_TYPES),
            signature=infer_signature(X, result.estimator.predict(X)),
            pip_requirements=pinned(HEAD_REQUIREMENTS),
            code_paths=model_code_paths(),
        )
    return info.model_uri


@contextlib.contextmanager
def explicit_requirements() -> Iterator[None]:
    """Log a model with only the requirements given: MLflow otherwise copies this project's
    uv.lock and pyproject.toml (the whole headstart environment, 0.7 MB) into every model."""
    before = os.environ.get("MLFLOW_LOG_UV_FILES")
    os.environ["MLFLOW_LOG_UV_FILES"] = "false"
    try:
        with quiet("mlflow.utils.uv_utils"), quiet("mlflow.utils.environment"):
            yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_LOG_UV_FILES", None)
        else:
            os.environ["MLFLOW_LOG_UV_FILES"] = before


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Errors only from `logger` for the block (MLflow's warnings that do not apply here)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def pinned(names: tuple[str, ...]) -> list[str]:
    """`name==version` from this environment (MLflow's own inference fails under uv)."""
    from importlib import metadata

    out = []
    for n in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out.append(f"{n}=={metadata.version(n)}")
    return out


def register_newest(tracker: Tracker, model_uri: str, name: str) -> dict[str, Any]:
    """A new version of the registered model `name` with the alias `newest` (under the
    registry's lock: two trainings at once each get a version, and `newest` ends on the
    later one)."""
    tracker.client()
    with registry_lock(tracker.workspace):
        with quiet("mlflow.tracking._model_registry.fluent"):
            version = mlflow.register_model(model_uri, name)
        MlflowClient().set_registered_model_alias(name, "newest", version.version)
    return {"name": name, "version": int(version.version), "uri": f"models:/{name}@newest"}


def register_best(tracker: Tracker, model_uri: str, experiment: str) -> dict[str, Any]:
    """Register the best head of a run as a new version of `<experiment>-head`."""
    return register_newest(tracker, model_uri, f"{experiment}-head")
