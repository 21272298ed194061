"""Prefect flows `embed`, `train-heads`, `pipeline`, `finetune` and `score`: the runs of
flows/runs.py with their steps as Prefect tasks.

Tasks retry transient failures (a store another run is writing, a locked or unreachable
database) with exponential backoff; the embed step is cached on the source's content, the
backbone and the store's state (`embed_cache_key`), its result persisted
as JSON: reports and paths pass between tasks, never arrays. Each pipeline run publishes its
heads table, a link to its MLflow run and the champion decision as Prefect artifacts; each
scoring run what it scored.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from extractors import DEFAULT_WORKSPACE
from extractors.embedding.objects import stamps
from extractors.embedding.sources import read_source
from extractors.settings import EmbedSettings, EngineSettings, IndexSettings, MonitorSettings
from extractors.store.store import StoreBusy
from extractors.workspace import resolve_store
from flows import runs
from flows.settings import PipelineSettings
from flows.steps import audit, embedding, finetuning, scoring, training
from flows.tracking import monitoring
from flows.tracking.monitoring import DRIFT_EVENT
from flows.tracking.tracker import Tracker
from heads.settings import FineTuneSettings

RETRIES = 3


def is_transient(exc: BaseException | None) -> bool:
    """Failures worth retrying with backoff: a store another run is writing, a tracking or
    orchestration database that is locked or unreachable, a dropped connection."""
    if isinstance(exc, StoreBusy | ConnectionError | TimeoutError):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return type(exc).__name__ == "OperationalError" or any(
        s in text for s in ("database is locked", "Connection refused", "API request to")
    )


def embed_cache_key(
    source: str | Path,
    embedding: EmbedSettings = EmbedSettings(),
    index: IndexSettings = IndexSettings(),
    store: str | Path | None = None,
    workspace: str | Path = DEFAULT_WORKSPACE,
    **_: Any,
) -> str | None:
    """Cache key of an embed step: the source's content (every file's path, label, split,
    size and mtime), the backbone and its weights, and what the store holds (fingerprint,
    rows, failures; not its timestamps, which every update rewrites). None
    (no caching) when the store does not exist yet or the source cannot be read."""
    try:
        src = read_source(source)
        st = resolve_store(store, workspace, source=src.root, backbone=embedding.backbone)
        if not st.exists:
            return None
        m = st.manifest()
        h = hashlib.sha256()
        stored = [m["fingerprint"], m["backbone"], m["weights"], m["rows"], m["failures"]]
        e = embedding
        h.update(
            json.dumps([str(st.path), stored, e.backbone, e.weights, e.layers, e.seed]).encode()
        )
        if e.split_from is not None:  # the split it takes: that store's, as it is now
            other = resolve_store(e.split_from, workspace).manifest()
            h.update(json.dumps([e.split_from, other["fingerprint"], other["rows"]]).encode())
        h.update(json.dumps(index.as_dict(), sort_keys=True, default=str).encode())
        stamped = stamps([r.path for r in src.records], src.stamps)
        for r in sorted(src.records, key=lambda r: r.path):
            if isinstance(stamped[r.path], OSError):
                raise stamped[r.path]
            size, mtime_ns = stamped[r.path]
            h.update(f"{r.path}\0{r.label}\0{r.split}\0{size}\0{mtime_ns}\n".encode())
        return f"embed-{h.hexdigest()}"
    except (OSError, ValueError, KeyError):
        return None


def from_cache(report: dict[str, Any]) -> dict[str, Any]:
    """A cached embed report as this run's: nothing embedded, removed or resumed."""
    return report | {
        "embedded": 0,
        "kept": report["rows"],
        "removed": 0,
        "resumed": 0,
        "stats": {},
        "cached": True,
    }


def _transient(task, task_run, state) -> bool:
    return is_transient(state.data)


def _embed_key(context, parameters: dict[str, Any]) -> str | None:
    return embed_cache_key(**parameters)


def _backoff(first: float) -> list[float]:
    return [first * 2**i for i in range(RETRIES)]


retrying: dict[str, Any] = {
    "retries": RETRIES,
    "retry_delay_seconds": _backoff(runs.RETRY_DELAY_S),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": _transient,
}
embed_task = task(
    embedding.embed_source,
    name="embed-source",
    cache_key_fn=_embed_key,
    persist_result=True,
    result_serializer="json",
    **retrying,
)
train_task = task(training.train_and_track, name="train-heads", cache_policy=NO_CACHE, **retrying)
decide_task = task(training.escalation_decision, name="escalation-decision", cache_policy=NO_CACHE)
finetune_task = task(finetuning.finetune_and_track, name="fine-tune", cache_policy=NO_CACHE)
reuse_task = task(training.reusable_training, name="reuse-check", cache_policy=NO_CACHE)
score_task = task(scoring.score_new, name="score-new-files", cache_policy=NO_CACHE, **retrying)
audit_task = task(audit.audit_and_track, name="audit-data", cache_policy=NO_CACHE)


class PrefectRunner(runs.Runner):
    """The runs' steps as the Prefect tasks above: retries with backoff, the embed cache,
    the run logger, and artifacts (the heads table, the MLflow link, the champion)."""

    def embed(
        self,
        source: str,
        embedding: EmbedSettings,
        index: IndexSettings,
        engine: EngineSettings,
        store: str | None,
        workspace: str,
        progress: bool,
        retry_delay_s: float = runs.RETRY_DELAY_S,
    ) -> dict[str, Any]:
        """The embed task; a cache hit reads as "nothing new" for this run."""
        t = embed_task.with_options(retry_delay_seconds=_backoff(retry_delay_s))
        state = t(source, embedding, index, engine, store, workspace, progress, return_state=True)
        report = state.result()
        return from_cache(report) if state.name == "Cached" else report

    def train(
        self,
        store: str,
        parent_run_id: str,
        workspace: str,
        heads: list[str] | None,
        seed: int,
        progress: bool = False,
    ) -> dict[str, Any]:
        return train_task(store, parent_run_id, workspace, heads, seed, progress)

    def reuse(
        self, store: str, heads: list[str] | None, seed: int
    ) -> tuple[dict[str, Any] | None, str]:
        return reuse_task(store, heads, seed)

    def decide(
        self, summary: dict[str, Any], target: float | None, always_finetune: bool
    ) -> dict[str, Any]:
        return decide_task(summary, target, always_finetune)

    def finetune(
        self,
        store: str,
        parent_run_id: str,
        workspace: str,
        settings: FineTuneSettings,
        best_head: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        return finetune_task(
            store, parent_run_id, workspace, settings, best_head, progress=progress
        )

    def audit(self, store: str, parent_run_id: str, workspace: str, seed: int) -> dict[str, Any]:
        return audit_task(store, parent_run_id, workspace, seed)

    def score(
        self,
        source: str,
        predictions: str,
        model: str,
        store: str | None,
        workspace: str,
        embedding: EmbedSettings,
        progress: bool,
        monitor: MonitorSettings = MonitorSettings(),
    ) -> dict[str, Any]:
        return score_task(
            source, predictions, model, store, workspace, embedding, progress, monitor
        )

    def log(self, message: str) -> None:
        get_run_logger().info(message)

    def step(self, number: int, total: int, what: str) -> None:
        self.log(f"step {number}/{total}: {what}")

    def publish(
        self, name: str, run_id: str, workspace: str, summary: dict, tuned: dict | None
    ) -> None:
        """Prefect artifacts of the run: its heads table, a link to its MLflow run and the
        champion decision."""
        key = _key(name)
        url = Tracker(workspace).run_url(run_id)
        create_table_artifact(
            training.heads_table(summary, tuned),
            key=f"heads-{key}",
            description=f"Heads of {name}, best first: {summary['best']}. MLflow run: {url}",
        )
        create_link_artifact(url, link_text=f"MLflow run {run_id}", key=f"mlflow-{key}")
        create_markdown_artifact(
            runs.champion_of(summary, tuned)["line"].replace("*", "\\*"),
            key=f"champion-{key}",
            description=f"The champion decision of {name}'s run "
            "(flows/tracking/champion.py states the rule)",
        )

    def publish_score(self, name: str, report: dict) -> None:
        """A Prefect artifact of a scoring run: what it scored, with which model, where."""
        keys = ("model", "rows", "scored", "errors", "duplicates", "unchanged")
        rows = [
            {k: report[k] for k in keys}
            | {"part": report["part"] or "nothing new", "predictions": report["predictions"]}
        ]
        create_table_artifact(rows, key=f"score-{_key(name)}", description=f"Scoring of {name}")
        watched = report.get("monitor")
        if not watched:
            return
        create_markdown_artifact(
            monitoring.summary(watched),
            key=f"monitor-{_key(name)}",
            description=f"Drift and out-of-distribution figures of {name}'s batch",
        )
        if watched["alarm"]:
            emit_event(
                event=DRIFT_EVENT,
                resource={"prefect.resource.id": f"headstart.experiment.{name}"},
                payload=monitoring.figures(watched),
            )


def _key(name: str) -> str:
    """An artifact key from a run's name (Prefect takes lowercase letters, digits, dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "run"


PREFECT = PrefectRunner()


# The runs of flows/runs.py as Prefect flows: the same parameters (Prefect validates them and
# shows them as a form; tests/flows/test_runs.py checks they match), the steps above as tasks.
# Deployments load them by these names.


@flow(name="embed", description=runs.embed.__doc__)
def embed(
    source: str,
    embedding: EmbedSettings = EmbedSettings(),
    index: IndexSettings = IndexSettings(),
    engine: EngineSettings = EngineSettings(),
    store: str | None = None,
    workspace: str = str(DEFAULT_WORKSPACE),
    progress: bool = True,
    retry_delay_s: float = runs.RETRY_DELAY_S,
) -> dict[str, Any]:
    return runs.embed(
        source, embedding, index, engine, store, workspace, progress, retry_delay_s, PREFECT
    )


@flow(name="train-heads", description=runs.train_heads.__doc__)
def train_heads(
    store: str,
    experiment: str | None = None,
    heads: list[str] | None = None,
    workspace: str = str(DEFAULT_WORKSPACE),
    seed: int = 0,
) -> dict[str, Any]:
    return runs.train_heads(store, experiment, heads, workspace, seed, PREFECT)


@flow(name="pipeline", description=runs.pipeline.__doc__)
def pipeline(
    source: str,
    settings: PipelineSettings = PipelineSettings(),
    store: str | None = None,
    workspace: str = str(DEFAULT_WORKSPACE),
    experiment: str | None = None,
    progress: bool = True,
    retry_delay_s: float = runs.RETRY_DELAY_S,
) -> dict[str, Any]:
    return runs.pipeline(
        source, settings, store, workspace, experiment, progress, retry_delay_s, PREFECT
    )


@flow(name="finetune", description=runs.finetune.__doc__)
def finetune(
    store: str,
    settings: FineTuneSettings = FineTuneSettings(),
    experiment: str | None = None,
    workspace: str = str(DEFAULT_WORKSPACE),
    progress: bool = True,
) -> dict[str, Any]:
    return runs.finetune(store, settings, experiment, workspace, progress, PREFECT)


@flow(name="score", description=runs.score.__doc__)
def score(
    source: str,
    predictions: str | None = None,
    model: str | None = None,
    experiment: str | None = None,
    store: str | None = None,
    workspace: str = str(DEFAULT_WORKSPACE),
    embedding: EmbedSettings = EmbedSettings(),
    progress: bool = True,
    monitor: MonitorSettings = MonitorSettings(),
) -> dict[str, Any]:
    return runs.score(
        source,
        predictions,
        model,
        experiment,
        store,
        workspace,
        embedding,
        progress,
        monitor,
        PREFECT,
    )


FLOWS = {
    runs.embed: embed,
    runs.train_heads: train_heads,
    runs.pipeline: pipeline,
    runs.finetune: finetune,
    runs.score: score,
}
DEPLOYABLE = {"pipeline": pipeline, "score": score}  # flows/deployments.py's kinds


def flow_of(run: runs.Run) -> runs.Run:
    """The Prefect flow of one of flows/runs.py's runs."""
    return FLOWS[run]  # type: ignore[return-value]
