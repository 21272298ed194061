"""Prefect flows: `embed`, `train_heads` and `pipeline`, thin orchestration over flows.steps.

Tasks retry transient failures (a store another run is writing, a locked or unreachable
database) with exponential backoff; the embed step is cached on the source's content, the
backbone and the store's state (flows.steps.embed_cache_key), its result persisted as JSON:
reports and paths pass between tasks, never arrays.
"""

from __future__ import annotations

import re
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import DEFAULT_WORKSPACE, steps, tracking

RETRIES = 3
RETRY_DELAY_S = 10.0  # then 20, 40 (with jitter)


def _transient(task, task_run, state) -> bool:
    return steps.is_transient(state.data)


def _embed_key(context, parameters: dict[str, Any]) -> str | None:
    return steps.embed_cache_key(**parameters)


def _backoff(first: float) -> list[float]:
    return [first * 2**i for i in range(RETRIES)]


retrying: dict[str, Any] = {
    "retries": RETRIES,
    "retry_delay_seconds": _backoff(RETRY_DELAY_S),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": _transient,
}
embed_task = task(
    steps.embed_source,
    name="embed-source",
    cache_key_fn=_embed_key,
    persist_result=True,
    result_serializer="json",
    **retrying,
)
train_task = task(steps.train_and_track, name="train-heads", cache_policy=NO_CACHE, **retrying)
decide_task = task(steps.escalation_decision, name="escalation-decision", cache_policy=NO_CACHE)
finetune_task = task(steps.finetune_and_track, name="fine-tune", cache_policy=NO_CACHE)
reuse_task = task(steps.reusable_training, name="reuse-check", cache_policy=NO_CACHE)


def _embed(retry_delay_s: float, **kwargs: Any) -> dict[str, Any]:
    """The embed task; a cache hit reads as "nothing new" for this run."""
    t = embed_task.with_options(retry_delay_seconds=_backoff(retry_delay_s))
    state = t(**kwargs, return_state=True)
    report = state.result()
    return steps.from_cache(report) if state.name == "Cached" else report


def _publish(name: str, run_id: str, workspace: str, summary: dict, tuned: dict | None) -> None:
    """Prefect artifacts of the run: its heads table and a link to its MLflow run."""
    key = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "run"
    url = tracking.run_url(run_id, workspace)
    create_table_artifact(
        steps.heads_table(summary, tuned),
        key=f"heads-{key}",
        description=f"Heads of {name}, best first: {summary['best']}. MLflow run: {url}",
    )
    create_link_artifact(url, link_text=f"MLflow run {run_id}", key=f"mlflow-{key}")


@flow(name="embed")
def embed(
    source: str,
    store: str | None = None,
    backbone: str | None = None,
    weights: str | None = None,
    workspace: str = str(DEFAULT_WORKSPACE),
    batch_size: int = 32,
    num_workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
    layers: list[str] | None = None,
    fast_decode: bool = True,
    index_settings: dict[str, Any] | None = None,
    engine: str = "local",
    address: str | None = None,
    engine_workers: int | None = None,
    compile_model: bool = False,
    retry_delay_s: float = RETRY_DELAY_S,
) -> dict[str, Any]:
    """Extract embeddings of new or changed images into the store and refresh its index;
    counts, per-stage throughput and the index's recall curve go to an MLflow run."""
    report = _embed(
        retry_delay_s,
        source=source,
        store=store,
        backbone=backbone,
        weights=weights,
        workspace=workspace,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        progress=progress,
        layers=layers,
        fast_decode=fast_decode,
        index_settings=index_settings,
        engine=engine,
        address=address,
        workers=engine_workers,
        compile_model=compile_model,
    )
    get_run_logger().info(steps.embed_summary(report))
    params = steps.run_params(report, seed, None) | {"batch_size": batch_size, "layers": layers}
    run_id = tracking.start_parent_run(
        report["source_name"], workspace, steps.run_name("embed"), params
    )
    with tracking.closing_run(run_id, workspace):
        tracking.log_to_run(run_id, workspace, metrics=steps.embed_metrics(report))
        tracking.log_index(run_id, workspace, report["index"])
    return report | {"run_id": run_id}


@flow(name="train-heads")
def train_heads(
    store: str,
    experiment: str | None = None,
    heads: list[str] | None = None,
    workspace: str = str(DEFAULT_WORKSPACE),
    seed: int = 0,
) -> dict[str, Any]:
    """Train the heads on a store under one MLflow parent run."""
    name = experiment or steps.Store(store).manifest()["source"]["name"]
    run_id = tracking.start_parent_run(
        name, workspace, steps.run_name("train"), {"store": store, "seed": seed}
    )
    with tracking.closing_run(run_id, workspace):
        summary = train_task(store, run_id, workspace=workspace, heads=heads, seed=seed)
    return {**summary, "run_id": run_id, "experiment": name}


@flow(name="pipeline")
def pipeline(
    source: str,
    store: str | None = None,
    backbone: str | None = None,
    weights: str | None = None,
    experiment: str | None = None,
    target: float | None = 0.9,
    finetune: bool = False,
    finetune_settings: dict[str, Any] | None = None,
    heads: list[str] | None = None,
    workspace: str = str(DEFAULT_WORKSPACE),
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    layers: list[str] | None = None,
    index_settings: dict[str, Any] | None = None,
    retrain: bool = False,
    engine: str = "local",
    address: str | None = None,
    engine_workers: int | None = None,
    compile_model: bool = False,
    retry_delay_s: float = RETRY_DELAY_S,
) -> dict[str, Any]:
    """embed -> heads (reused when the data is unchanged, unless `retrain`) -> escalate to
    fine-tuning when the best head is below `target` (or `finetune`), scored on the same test
    split; the decisions and their reasons go to MLflow, the heads table to a Prefect
    artifact."""
    report = _embed(
        retry_delay_s,
        source=source,
        store=store,
        backbone=backbone,
        weights=weights,
        workspace=workspace,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        layers=layers,
        index_settings=index_settings,
        engine=engine,
        address=address,
        workers=engine_workers,
        compile_model=compile_model,
    )
    log = get_run_logger()
    log.info(steps.embed_summary(report))
    name = experiment or report["source_name"]
    run_id = tracking.start_parent_run(
        name, workspace, steps.run_name("pipeline"), steps.run_params(report, seed, target)
    )
    with tracking.closing_run(run_id, workspace):
        tracking.log_to_run(run_id, workspace, metrics=steps.embed_metrics(report))
        tracking.log_index(run_id, workspace, report["index"])
        summary, why = reuse_task(report["store"], heads, seed)
        if summary is None or retrain:
            why = "asked to retrain (--retrain)" if summary is not None else why
            summary = train_task(
                report["store"], run_id, workspace, heads=heads, seed=seed, progress=progress
            )
        tracking.log_to_run(
            run_id,
            workspace,
            params={"heads_retrained": "reused_from" not in summary},
            tags={"retrain_reason": why},
        )
        log.info(f"heads: {why}")
        decision = decide_task(summary, target, finetune)
        tracking.log_to_run(
            run_id,
            workspace,
            params={"escalate": decision["escalate"]},
            tags={"escalation_reason": decision["reason"]},
        )
        tuned = None
        if decision["escalate"]:
            best = next(h for h in summary["heads"] if h["head"] == summary["best"])
            tuned = finetune_task(
                report["store"], run_id, workspace, finetune_settings, best, progress=progress
            )
    _publish(name, run_id, workspace, summary, tuned)
    return {
        "embed": report,
        **summary,
        "retrain_reason": why,
        "decision": decision,
        "finetune": tuned,
        "run_id": run_id,
        "experiment": name,
    }


@flow(name="finetune")
def finetune(
    store: str,
    experiment: str | None = None,
    settings: dict[str, Any] | None = None,
    workspace: str = str(DEFAULT_WORKSPACE),
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune a store's backbone on its labelled images under an MLflow parent run of its
    own (scored on the store's test split, like the heads)."""
    manifest = steps.Store(store).manifest()
    name = experiment or manifest["source"]["name"]
    params = {"store": store, "backbone": manifest["backbone"], "settings": settings or {}}
    run_id = tracking.start_parent_run(name, workspace, steps.run_name("finetune"), params)
    with tracking.closing_run(run_id, workspace):
        row = finetune_task(store, run_id, workspace, settings, progress=progress)
    return {"finetune": row, "run_id": run_id, "experiment": name}
