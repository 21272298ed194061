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
import inspect
import json
import os
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE

from extractors import DEFAULT_WORKSPACE
from extractors.embedding.sources import read_source
from extractors.settings import EmbedSettings, IndexSettings
from extractors.store.layout import os_path
from extractors.store.store import StoreBusy
from extractors.workspace import resolve_store
from flows import runs
from flows.steps import audit, embedding, finetuning, scoring, training
from flows.tracking import lifecycle as tracking

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
        h.update(json.dumps(index.as_dict(), sort_keys=True, default=str).encode())
        for r in sorted(src.records, key=lambda r: r.path):
            stat = os.stat(os_path(r.path))
            h.update(
                f"{r.path}\0{r.label}\0{r.split}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
            )
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


def _embed(retry_delay_s: float, **kwargs: Any) -> dict[str, Any]:
    """The embed task; a cache hit reads as "nothing new" for this run."""
    t = embed_task.with_options(retry_delay_seconds=_backoff(retry_delay_s))
    state = t(**kwargs, return_state=True)
    report = state.result()
    return from_cache(report) if state.name == "Cached" else report


def _publish(name: str, run_id: str, workspace: str, summary: dict, tuned: dict | None) -> None:
    """Prefect artifacts of the run: its heads table, a link to its MLflow run and the
    champion decision."""
    key = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "run"
    url = tracking.run_url(run_id, workspace)
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


def _publish_score(name: str, report: dict) -> None:
    """A Prefect artifact of a scoring run: what it scored, with which model, where."""
    key = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "run"
    rows = [
        {k: report[k] for k in ("model", "rows", "scored", "errors", "duplicates", "unchanged")}
        | {"part": report["part"] or "nothing new", "predictions": report["predictions"]}
    ]
    create_table_artifact(rows, key=f"score-{key}", description=f"Scoring of {name}")


def _log(message: str) -> None:
    get_run_logger().info(message)


PREFECT = runs.Runner(
    embed=_embed,
    train=train_task,
    reuse=reuse_task,
    decide=decide_task,
    finetune=finetune_task,
    log=_log,
    publish=_publish,
    score=score_task,
    publish_score=_publish_score,
    audit=audit_task,
)


def _as_flow(run: Callable[..., dict[str, Any]]) -> Any:
    """The run as a Prefect flow with the run's own parameters (validated by Prefect, shown
    in its UI as a form) and the tasks above as its steps. The flow is this module's attribute
    of the run's name, which is what Prefect's deployments load."""

    def body(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return run(*args, **kwargs, runner=PREFECT)

    sig, hints = inspect.signature(run), typing.get_type_hints(run)
    body.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[
            p.replace(annotation=hints[p.name])
            for p in sig.parameters.values()
            if p.name != "runner"
        ],
        return_annotation=hints["return"],
    )
    body.__annotations__ = {k: v for k, v in hints.items() if k != "runner"}
    body.__name__ = body.__qualname__ = run.__name__
    body.__doc__ = run.__doc__
    return flow(name=run.__name__.replace("_", "-"))(body)


embed = _as_flow(runs.embed)
train_heads = _as_flow(runs.train_heads)
pipeline = _as_flow(runs.pipeline)
finetune = _as_flow(runs.finetune)
score = _as_flow(runs.score)
