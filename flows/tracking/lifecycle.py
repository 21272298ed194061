"""MLflow tracking: one parent run per pipeline run, a nested run per head and fine-tuned
network, heads as MLflow models in the registry, and the comparison read back."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from extractors.common import HeadstartError
from flows.tracking.store import connect, registry_lock, tracking_uri

if TYPE_CHECKING:
    from heads.evaluate import HeadResult


ROOT = Path(__file__).resolve().parents[2]
# Artifact downloads here are small tables and models: no progress bars among our output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# What a head's MLflow model ships as code: heads/, and extractors/ for what heads import
# (extractors.common's normalisation and errors), so it loads outside this checkout.
MODEL_CODE = ("heads", "extractors")


class ExperimentNotFound(HeadstartError, ValueError):
    """An experiment name that the tracking store does not hold."""


def _metrics() -> tuple[str, ...]:
    """The metric names every model row logs (heads/evaluate.py; imported when needed, so
    an embed run does not load scikit-learn)."""
    from heads.evaluate import METRICS

    return tuple(METRICS)


def ui_command(workspace: str | Path) -> str:
    """The exact command that opens the MLflow UI on this store."""
    return f"uv run mlflow ui --backend-store-uri {tracking_uri(workspace)} --port 5000"


# The experiment tag MLflow's UI reads to open an experiment on its runs (model training)
# rather than on the GenAI overview of traces and tokens.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(name: str, workspace: str | Path) -> str:
    """Get or create the experiment, marked as model training (`EXPERIMENT_KIND`, also on
    experiments made before); with the default store its artifacts live in the workspace."""
    connect(workspace)
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location(name, workspace), tags=EXPERIMENT_KIND
            )
        except mlflow.exceptions.MlflowException:
            exp = client.get_experiment_by_name(name)  # another command created it just now
            if exp is None:
                raise
    for key, value in EXPERIMENT_KIND.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def experiment_of(run_id: str, workspace: str | Path) -> str:
    """The name of a run's experiment."""
    connect(workspace, write=False)
    client = MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def artifact_location(experiment: str, workspace: str | Path) -> str | None:
    """Where a new experiment keeps its files: beside the SQLite database (`mlartifacts/`).

    MLflow's own default for a database store is `./mlruns` under whatever folder the command
    runs in, which scatters artifacts (and once filled a git checkout); a tracking server
    (http/https URIs) decides for itself, so None there. Another database (PostgreSQL,
    MySQL) keeps them in $HEADSTART_ARTIFACTS (a folder or a URI such as s3://bucket/mlflow),
    else in the workspace's `mlartifacts/`.
    """
    uri = tracking_uri(workspace)
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///")).resolve()  # sqlite:////abs or sqlite:///rel
        return (db.parent / "mlartifacts" / experiment).as_uri()
    root = os.environ.get("HEADSTART_ARTIFACTS") or str(Path(workspace) / "mlartifacts")
    if "://" in root:  # shared storage a team can reach: s3://bucket/mlflow, ...
        return f"{root.rstrip('/')}/{experiment}"
    return (Path(root).resolve() / experiment).as_uri()


def run_url(run_id: str, workspace: str | Path, ui_url: str | None = None) -> str:
    """Link to a run in the MLflow UI at `ui_url` ($MLFLOW_UI_URL, else the tracking server
    itself, else http://127.0.0.1:5000 where `headstart`'s `mlflow ui` command serves)."""
    uri = tracking_uri(workspace)
    default = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    base = (ui_url or os.environ.get("MLFLOW_UI_URL") or default).rstrip("/")
    connect(workspace, write=False)
    exp = MlflowClient().get_run(run_id).info.experiment_id
    # workflowType: the UI opens on model training (runs), not the GenAI overview.
    return f"{base}/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"


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
    connect(workspace)
    MlflowClient().set_terminated(run_id, status=status)


@contextlib.contextmanager
def closing_run(run_id: str, workspace: str | Path) -> Iterator[None]:
    """End the run FINISHED when the block succeeds, FAILED (and re-raise) when it does not;
    the block's error is the one raised, even when the store cannot take the FAILED status
    (a full disk, a server gone: the same cause)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            end_run(run_id, workspace, "FAILED")
        raise
    end_run(run_id, workspace, "FINISHED")


def store_dataset(manifest: dict[str, Any], store: str | Path) -> Any:
    """The store as an MLflow dataset: named after its source and backbone, its digest the
    store's fingerprint (so runs on the same data group together), its source the Parquet
    file, its profile the row, label, class and split counts."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class StoreDataset(MetaDataset):
        @property
        def profile(self) -> dict[str, Any]:
            return {
                "rows": manifest["rows"],
                "labelled_rows": manifest.get("labelled_rows"),
                "classes": len(manifest.get("classes", [])),
                **{f"{k}_rows": v for k, v in manifest.get("splits", {}).items()},
            }

        def to_dict(self) -> dict[str, str]:
            return super().to_dict() | {"profile": json.dumps(self.profile)}

    with warnings.catch_warnings():  # two registered local sources: both are the same class
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
        source = resolve_dataset_source(str(Path(store) / "embeddings.parquet"))
    name = f"{manifest['source']['name']} ({manifest['backbone']})"
    return StoreDataset(source, name=name, digest=manifest["fingerprint"])


def log_dataset(run_id: str, workspace: str | Path, manifest: dict[str, Any], store: Path) -> None:
    """Record the store as the run's training dataset (the Dataset column of the runs table)."""
    from mlflow.entities import DatasetInput, InputTag

    connect(workspace)
    entity = store_dataset(manifest, store)._to_mlflow_entity()
    tag = InputTag(key="mlflow.data.context", value="training")
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(entity, tags=[tag])])


@contextlib.contextmanager
def model_run(
    parent_run_id: str,
    workspace: str | Path,
    name: str,
    kind: str,
    fit_seconds: float,
    params: dict[str, Any],
    data: tuple[dict[str, Any], Path] | None = None,
) -> Iterator[Any]:
    """A nested run for one model, active for the block. It spans the time the model took to
    fit (its start is set that far back, its end that far after), so the UI's durations are
    the fits', and it logs the parameters every model row shares: `backbone`, `model`,
    `feature`, then `params` (`chosen.*` among them); `data` (manifest, store) is its
    dataset input."""
    client = MlflowClient()
    exp_id = client.get_run(parent_run_id).info.experiment_id
    start = int(time.time() * 1000 - fit_seconds * 1000)
    run = client.create_run(
        exp_id,
        start_time=start,
        tags={"mlflow.parentRunId": parent_run_id, "headstart.kind": kind},
        run_name=name,
    )
    with mlflow.start_run(run_id=run.info.run_id, nested=True) as active:
        mlflow.log_params({k: _short(v) for k, v in params.items()})
        if data is not None:
            log_dataset(run.info.run_id, workspace, *data)
        yield active
    client.set_terminated(run.info.run_id, "FINISHED", end_time=start + int(fit_seconds * 1000))


def log_to_run(
    run_id: str,
    workspace: str | Path,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
    artifacts: list[Path] | None = None,
) -> None:
    """Add params, metrics, tags and files to an existing run."""
    connect(workspace)
    client = MlflowClient()
    for k, v in (params or {}).items():
        client.log_param(run_id, k, _short(v))
    for k, v in (metrics or {}).items():
        client.log_metric(run_id, k, float(v))
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, str(v))
    for path in artifacts or []:
        client.log_artifact(run_id, str(path))


def log_index(run_id: str, workspace: str | Path, entry: dict[str, Any]) -> None:
    """The store's index on the run: kind, why, tuned parameters, and the recall/latency/
    memory trade-off of the tuning sweep as a table (index_curve.csv) and a plot."""
    import csv

    tuning = entry.get("tuning", {})
    choice = entry.get("choice", {})
    with tempfile.TemporaryDirectory() as tmp:
        curve = [row | {"memory_bytes": entry.get("file_bytes")} for row in tuning.get("curve", [])]
        files = []
        if curve:
            table = Path(tmp) / "index_curve.csv"
            with open(table, "w", newline="") as fh:
                writer = csv.DictWriter(fh, list(dict.fromkeys(k for row in curve for k in row)))
                writer.writeheader()
                writer.writerows(curve)
            files = [table, _index_curve_plot(entry, Path(tmp) / "index_curve.png")]
        log_to_run(
            run_id,
            workspace,
            params={
                "index_type": entry.get("type"),
                "index_params": json.dumps(tuning.get("params", {})),
                "index_recall_target": tuning.get("target"),
            },
            metrics={
                "index_recall_at_10": tuning.get("recall", 1.0),
                "index_ms_per_query": tuning.get("ms_per_query", 0.0),
                "index_memory_bytes": entry.get("file_bytes", 0),
                "index_ntotal": entry.get("ntotal", 0),
            },
            tags={
                "index_reason": choice.get("reason", ""),
                "index_action": (entry.get("history") or [{}])[-1].get("action", ""),
            },
            artifacts=files,
        )


def _index_curve_plot(entry: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuning = entry["tuning"]
    curve = tuning["curve"]
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[dict]] = {}
    for row in curve:
        key = f"rerank x{row['rerank']}" if "rerank" in row else entry["type"]
        groups.setdefault(key, []).append(row)
    for key, rows in groups.items():
        ax.plot([r["ms_per_query"] for r in rows], [r["recall"] for r in rows], "o-", label=key)
        for r in rows:
            knob = {k: v for k, v in r.items() if k in ("nprobe", "efSearch")}
            if knob:
                ax.annotate(
                    ",".join(map(str, knob.values())),
                    (r["ms_per_query"], r["recall"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.axhline(tuning.get("target", 0.95), color="grey", ls="--", lw=1, label="recall target")
    ax.set_xlabel("ms per query (batched)")
    ax.set_ylabel(f"recall@{tuning.get('k', 10)} on held-out queries")
    size = entry.get("file_bytes", 0) / 2**20
    ax.set_title(f"{entry['type']}: {entry['ntotal']:,} vectors, {size:.1f} MB", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_head_run(
    parent_run_id: str,
    workspace: str | Path,
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
    connect(workspace)
    params = vocabulary(result, context)
    data = (context["manifest"], Path(context["store"])) if "manifest" in context else None
    fit = result.fit_seconds
    with model_run(parent_run_id, workspace, result.name, "head", fit, params, data) as run:
        mlflow.set_tags({"headstart.head": result.name})
        mlflow.log_metric("val_score", result.val_score)
        mlflow.log_metrics({m: result.metrics[m] for m in _metrics() if m in result.metrics})
        mlflow.log_metric("fit_seconds", result.fit_seconds)
        mlflow.log_metric("sweep_points", len(result.sweep))
        _log_result_files(result, sweep=True)
        log_test_predictions(result, test_rows)
        mlflow.log_artifact(str(saved_head), artifact_path="head")
        mlflow.log_artifact(str(saved_head.with_suffix(".json")), artifact_path="head")
        model_uri = _log_model(result, example)
        return run.info.run_id, model_uri


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


TEST_TABLE = "test_predictions.json"


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
            code_paths=[str(ROOT / package) for package in MODEL_CODE],
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


HEAD_REQUIREMENTS = ("scikit-learn", "skops", "numpy", "scipy", "faiss-cpu", "torch")


def pinned(names: tuple[str, ...]) -> list[str]:
    """`name==version` from this environment (MLflow's own inference fails under uv)."""
    from importlib import metadata

    out = []
    for n in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out.append(f"{n}=={metadata.version(n)}")
    return out


def register_best(model_uri: str, experiment: str, workspace: str | Path) -> dict[str, Any]:
    """Register the best head of a run as a new version of `<experiment>-head`, alias `newest`."""
    connect(workspace)
    name = f"{experiment}-head"
    with registry_lock(workspace):
        version = mlflow.register_model(model_uri, name)
        MlflowClient().set_registered_model_alias(name, "newest", version.version)
    return {"name": name, "version": int(version.version), "uri": f"models:/{name}@newest"}


def log_finetune_run(
    parent_run_id: str,
    workspace: str | Path,
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

    connect(workspace)
    shared = vocabulary(result, params)
    rest = {k: v for k, v in params.items() if k not in shared and k != "manifest"}
    data = (params["manifest"], Path(params["store"])) if "manifest" in params else None
    fit = result.fit_seconds
    with model_run(
        parent_run_id, workspace, result.name, "finetune", fit, shared | rest, data
    ) as run:
        mlflow.set_tags(
            {
                "headstart.head": result.name,
                "headstart.backbone": result.extra["backbone"],
            }
        )
        for row in history:
            step = int(row["epoch"])
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=step)
        mlflow.log_metric("val_score", result.val_score)
        mlflow.log_metrics({m: result.metrics[m] for m in _metrics() if m in result.metrics})
        mlflow.log_metric("fit_seconds", result.fit_seconds)
        mlflow.log_metric("skipped_files", len(skipped))
        log_test_predictions(result, test_rows)
        if skipped:
            mlflow.log_dict({"skipped": list(skipped)}, "skipped_files.json")
        _log_result_files(result, sweep=False)
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(curves_png(history, result.name, Path(tmp) / "curves.png")))
        mlflow.log_artifacts(str(model_dir), artifact_path="network")
        return run.info.run_id


def compare_runs(
    workspace: str | Path, experiment: str | None = None, last: int | None = None
) -> list[dict[str, Any]]:
    """Every head and fine-tuned network read back from MLflow, grouped by parent run (newest
    parent first, best validation score first within it): the table analysts see in the UI."""
    connect(workspace, write=False)
    client = MlflowClient()
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ExperimentNotFound(
                f"no MLflow experiment {experiment!r} in {tracking_uri(workspace)}; "
                "`headstart compare` without --experiment lists them all"
            )
        exps = [exp]
    else:
        exps = client.search_experiments()
    names = {e.experiment_id: e.name for e in exps}
    runs = (
        [
            r
            for kind in ("head", "finetune")
            for r in client.search_runs(
                list(names), f"tags.`headstart.kind` = '{kind}'", max_results=5000
            )
        ]
        if names
        else []
    )
    parents: dict[str, Any] = {}
    for r in runs:
        pid = r.data.tags.get("mlflow.parentRunId")
        if pid and pid not in parents:
            parents[pid] = client.get_run(pid)
    order = sorted(parents, key=lambda p: -parents[p].info.start_time)
    if last is not None:
        order = order[:last]
    rows = []
    for pid in order:
        parent = parents[pid]
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid]
        kids.sort(key=lambda r: -r.data.metrics.get("val_score", 0.0))
        for r in kids:
            m = r.data.metrics
            rows.append(
                {
                    "experiment": names[r.info.experiment_id],
                    "parent_run": parent.info.run_name,
                    "parent_run_id": pid,
                    "backbone": parent.data.params.get("backbone", ""),
                    "model": r.data.tags.get("headstart.head", r.info.run_name),
                    "kind": r.data.tags.get("headstart.kind"),
                    "finetuned_backbone": r.data.tags.get("headstart.backbone"),
                    "chosen": {
                        k.removeprefix("chosen."): v
                        for k, v in r.data.params.items()
                        if k.startswith("chosen.")
                    }
                    | (
                        {"feature": r.data.params["feature"]}
                        if r.data.params.get("feature", "embedding") != "embedding"
                        else {}
                    ),
                    "run_id": r.info.run_id,
                    "val_score": m.get("val_score"),
                    **{k: m.get(k) for k in _metrics()},
                }
            )
    return rows


def disagreements(
    workspace: str | Path, experiment: str | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """The test images the models of the newest run disagree on: (the models, best first;
    one row per such image: path, label and each model's prediction), from each model run's
    test predictions table."""
    rows = compare_runs(workspace, experiment=experiment, last=1)
    client = MlflowClient()
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        try:
            exp = client.get_run(r["run_id"]).info.experiment_id
            frame = client.load_table(exp, TEST_TABLE, run_ids=[r["run_id"]])
        except mlflow.exceptions.MlflowException:
            continue  # a run logged before test tables existed
        tables[r["model"]] = {t["sha256"]: t for t in frame.to_dict("records")}
    models = list(tables)
    if not models:
        return [], []
    out = []
    for sha, first in tables[models[0]].items():
        preds = {m: tables[m][sha]["prediction"] for m in models if sha in tables[m]}
        if len(set(preds.values())) > 1:
            out.append({"path": first["path"], "label": first["label"], "predictions": preds})
    return models, sorted(out, key=lambda r: r["path"])


def runs_scored_on(workspace: str | Path, store: str, fingerprint: str) -> list[dict[str, Any]]:
    """The trainings (parent runs, newest first) whose models were scored on the store's rows
    as they are now (`fingerprint`): each its run id, name, start and link."""
    connect(workspace, write=False)
    client = MlflowClient()
    found: dict[str, Any] = {}
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    models = client.search_runs(
        experiments, f"params.fingerprint = '{fingerprint}' and params.store = '{store}'"
    )
    for r in models:
        if "model" not in r.data.params:  # an embed run: it scored nothing
            continue
        parent = r.data.tags.get("mlflow.parentRunId", r.info.run_id)
        found.setdefault(parent, None)
    out = []
    for run_id in found:
        run = client.get_run(run_id)
        out.append(
            {
                "run_id": run_id,
                "name": run.info.run_name,
                "started": run.info.start_time,
                "url": run_url(run_id, workspace),
            }
        )
    return sorted(out, key=lambda r: -r["started"])


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."
