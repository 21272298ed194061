"""The `Tracker`: one workspace's MLflow tracking store, reached through `connect`, and the
life of a run in it: experiments, parent runs that end FINISHED or FAILED, nested model runs,
params, metrics, tags, files, the dataset and the index a run used."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from flows.tracking.store import connect, tracking_uri

# Artifact downloads here are small tables and models: no progress bars among our output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# The experiment tag MLflow's UI reads to open an experiment on its runs (model training)
# rather than on the GenAI overview of traces and tokens.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
PARAM_CHARS = 500  # MLflow's limit on a param's value
# The UI's view of an experiment: model training (its runs), not the GenAI overview.
MODEL_TRAINING = "workflowType=machine_learning"


def experiment_page(base: str, experiment_id: str) -> str:
    """The MLflow UI's page of an experiment's runs at `base` (tests/flows/tracking/
    test_mlflow_ui.py opens it in a browser and finds the runs table)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?{MODEL_TRAINING}"


def short(value: Any) -> str:
    """A value as an MLflow param: its text, cut to what MLflow takes."""
    text = str(value)
    return text if len(text) <= PARAM_CHARS else text[: PARAM_CHARS - 3] + "..."


def metric_key(text: str) -> str:
    """`text` in the characters MLflow takes in a metric key (any other as `_`)."""
    return re.sub(r"[^\w.\-:/ ]", "_", text)


@dataclass(frozen=True)
class Tracker:
    """The tracking store of `workspace` (its URI: `flows/tracking/store.py`), connected to
    before each call, so a Tracker can be made anywhere, cheaply, and passed by value."""

    workspace: str | Path

    @property
    def uri(self) -> str:
        return tracking_uri(self.workspace)

    def client(self, write: bool = True) -> MlflowClient:
        """A client of this store (created or migrated first when `write`)."""
        connect(self.workspace, write=write)
        return MlflowClient()

    def ui_command(self) -> str:
        """The exact command that opens the MLflow UI on this store."""
        return f"uv run mlflow ui --backend-store-uri {shlex.quote(self.uri)} --port 5000"

    def experiment_id(self, name: str) -> str:
        """Get or create the experiment, marked as model training (`EXPERIMENT_KIND`, also
        on experiments made before); with the default store its artifacts live in the
        workspace."""
        client = self.client()
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(
                    name, artifact_location=self.artifact_location(name), tags=EXPERIMENT_KIND
                )
            except mlflow.exceptions.MlflowException:
                exp = client.get_experiment_by_name(name)  # another command created it just now
                if exp is None:
                    raise
        for key, value in EXPERIMENT_KIND.items():
            if exp.tags.get(key) != value:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

    def experiment_of(self, run_id: str) -> str:
        """The name of a run's experiment."""
        client = self.client(write=False)
        return client.get_experiment(client.get_run(run_id).info.experiment_id).name

    def artifact_location(self, experiment: str) -> str | None:
        """Where a new experiment keeps its files: beside the SQLite database (`mlartifacts/`).

        MLflow's own default for a database store is `./mlruns` under whatever folder the
        command runs in, which scatters artifacts (and once filled a git checkout); a tracking
        server (http/https URIs) decides for itself, so None there. Another database
        (PostgreSQL, MySQL) keeps them in $HEADSTART_ARTIFACTS (a folder or a URI such as
        s3://bucket/mlflow), else in the workspace's `mlartifacts/`.
        """
        uri = self.uri
        if uri.startswith(("http://", "https://", "databricks")):
            return None
        if uri.startswith("sqlite:///"):
            db = Path(uri.removeprefix("sqlite:///")).resolve()  # sqlite:////abs or ///rel
            return (db.parent / "mlartifacts" / experiment).as_uri()
        root = os.environ.get("HEADSTART_ARTIFACTS") or str(Path(self.workspace) / "mlartifacts")
        if "://" in root:  # shared storage a team can reach: s3://bucket/mlflow, ...
            return f"{root.rstrip('/')}/{experiment}"
        return (Path(root).resolve() / experiment).as_uri()

    def ui_base(self, ui_url: str | None = None) -> str:
        """Where the MLflow UI of this store is: `ui_url`, $MLFLOW_UI_URL, else the tracking
        server itself, else http://127.0.0.1:5000 (where `ui_command` serves it)."""
        uri = self.uri
        default = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        return (ui_url or os.environ.get("MLFLOW_UI_URL") or default).rstrip("/")

    def run_url(self, run_id: str, ui_url: str | None = None) -> str:
        """Link to a run in the MLflow UI (`ui_base`)."""
        exp = self.client(write=False).get_run(run_id).info.experiment_id
        return f"{self.ui_base(ui_url)}/#/experiments/{exp}/runs/{run_id}?{MODEL_TRAINING}"

    def experiment_url(self, experiment: str, ui_url: str | None = None) -> str:
        """Link to an experiment's runs in the MLflow UI (`ui_base`): where analysts compare
        the heads side by side."""
        exp = self.client(write=False).get_experiment_by_name(experiment)
        if exp is None:
            raise ValueError(f"no MLflow experiment {experiment!r} in {self.uri}")
        return experiment_page(self.ui_base(ui_url), exp.experiment_id)

    def start_parent_run(self, experiment: str, run_name: str, params: dict[str, Any]) -> str:
        """Create a command's parent run and return its id (open until `end_run`)."""
        exp_id = self.experiment_id(experiment)
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as run:
            mlflow.log_params({k: short(v) for k, v in params.items()})
            mlflow.set_tag("headstart.kind", "pipeline")
        MlflowClient().update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client().set_terminated(run_id, status=status)

    @contextlib.contextmanager
    def closing_run(self, run_id: str) -> Iterator[None]:
        """End the run FINISHED when the block succeeds, FAILED (and re-raise) when it does
        not; the block's error is the one raised, even when the store cannot take the FAILED
        status (a full disk, a server gone: the same cause)."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id, "FINISHED")

    @contextlib.contextmanager
    def parent_run(self, experiment: str, run_name: str, params: dict[str, Any]) -> Iterator[str]:
        """`start_parent_run` and `closing_run` in one: the block gets the run's id."""
        run_id = self.start_parent_run(experiment, run_name, params)
        with self.closing_run(run_id):
            yield run_id

    def log_to_run(
        self,
        run_id: str,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
        artifacts: list[Path] | None = None,
    ) -> None:
        """Add params, metrics, tags and files to an existing run."""
        client = self.client()
        for k, v in (params or {}).items():
            client.log_param(run_id, k, short(v))
        for k, v in (metrics or {}).items():
            client.log_metric(run_id, k, float(v))
        for k, v in (tags or {}).items():
            client.set_tag(run_id, k, str(v))
        for path in artifacts or []:
            client.log_artifact(run_id, str(path))

    def log_dataset(self, run_id: str, manifest: dict[str, Any], store: Path) -> None:
        """Record the store as the run's training dataset (the runs table's Dataset column)."""
        from mlflow.entities import DatasetInput, InputTag

        entity = store_dataset(manifest, store)._to_mlflow_entity()
        tag = InputTag(key="mlflow.data.context", value="training")
        self.client().log_inputs(run_id, datasets=[DatasetInput(entity, tags=[tag])])

    @contextlib.contextmanager
    def model_run(
        self,
        parent_run_id: str,
        name: str,
        kind: str,
        fit_seconds: float,
        params: dict[str, Any],
        data: tuple[dict[str, Any], Path] | None = None,
    ) -> Iterator[Any]:
        """A nested run for one model, active for the block. It spans the time the model took
        to fit (its start is set that far back, its end that far after), so the UI's
        durations are the fits', and it logs the parameters every model row shares:
        `backbone`, `model`, `feature`, then `params` (`chosen.*` among them); `data`
        (manifest, store) is its dataset input."""
        client = self.client()
        exp_id = client.get_run(parent_run_id).info.experiment_id
        start = int(time.time() * 1000 - fit_seconds * 1000)
        run = client.create_run(
            exp_id,
            start_time=start,
            tags={"mlflow.parentRunId": parent_run_id, "headstart.kind": kind},
            run_name=name,
        )
        with mlflow.start_run(run_id=run.info.run_id, nested=True) as active:
            mlflow.log_params({k: short(v) for k, v in params.items()})
            if data is not None:
                self.log_dataset(run.info.run_id, *data)
            yield active
        end = start + int(fit_seconds * 1000)
        client.set_terminated(run.info.run_id, "FINISHED", end_time=end)

    def log_index(self, run_id: str, entry: dict[str, Any]) -> None:
        """The store's index on the run: kind, why, tuned parameters, and the recall/latency/
        memory trade-off of the tuning sweep as a table (index_curve.csv) and a plot."""
        tuning = entry.get("tuning", {})
        choice = entry.get("choice", {})
        with tempfile.TemporaryDirectory() as tmp:
            files = index_curve_files(entry, Path(tmp))
            self.log_to_run(
                run_id,
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


def store_dataset(manifest: dict[str, Any], store: str | Path) -> Any:
    """The store as an MLflow dataset: named after its source and backbone, its digest the
    store's fingerprint (so runs on the same data group together), its source the Parquet
    file, its profile the row, label, class and split counts."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from extractors.store.layout import EMBEDDINGS

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
        source = resolve_dataset_source(str(Path(store) / EMBEDDINGS))
    name = f"{manifest['source']['name']} ({manifest['backbone']})"
    return StoreDataset(source, name=name, digest=manifest["fingerprint"])


def index_curve_files(entry: dict[str, Any], folder: Path) -> list[Path]:
    """The index's tuning sweep as `index_curve.csv` and `index_curve.png` in `folder`
    (none when the index was not tuned)."""
    import csv

    tuning = entry.get("tuning", {})
    curve = [row | {"memory_bytes": entry.get("file_bytes")} for row in tuning.get("curve", [])]
    if not curve:
        return []
    table = folder / "index_curve.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(dict.fromkeys(k for row in curve for k in row)))
        writer.writeheader()
        writer.writerows(curve)
    from heads.plots import index_curve_png

    return [table, index_curve_png(entry, folder / "index_curve.png")]
