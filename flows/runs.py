"""The runs behind the commands, `embed`, `train-heads`, `pipeline`, `finetune` and `score`:
each one short sequence of steps, run by a `Runner`.

`LOCAL` calls the steps in this process: what the CLI does when no Prefect server is set up
(nothing to start, nothing imported). flows/pipeline.py wraps the same functions as Prefect
flows whose steps are Prefect tasks (retries, the embed cache, artifacts): what `serve`, the
schedules and the CLI with `PREFECT_API_URL` set run. `using_prefect` says which applies.
"""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import os
import tomllib
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extractors import DEFAULT_WORKSPACE
from extractors.common import HeadstartError
from extractors.settings import EmbedSettings, EngineSettings, IndexSettings, Settings
from flows.settings import PipelineSettings
from heads.settings import FineTuneSettings

RETRY_DELAY_S = 10.0  # Prefect only: the first retry of a transient failure (then 20, 40)


@dataclass(frozen=True)
class Runner:
    """How a run's steps execute. Each step takes the arguments of its function in
    flows.steps; `embed` also takes the first retry delay, which only Prefect uses."""

    embed: Callable[..., dict[str, Any]]
    train: Callable[..., dict[str, Any]]
    reuse: Callable[..., tuple[dict[str, Any] | None, str]]
    decide: Callable[..., dict[str, Any]]
    finetune: Callable[..., dict[str, Any]]
    log: Callable[[str], None]
    publish: Callable[[str, str, str, dict, dict | None], None]  # name, run, workspace, ...
    score: Callable[..., dict[str, Any]]
    publish_score: Callable[[str, dict], None]  # name, the score step's report
    audit: Callable[..., dict[str, Any]]


def _step(module: str, name: str) -> Callable[..., Any]:
    """A function of flows.steps.<module>, imported at its first call: a command imports only
    the stages it runs."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"flows.steps.{module}"), name)(*args, **kwargs)

    return call


def _local_embed(retry_delay_s: float, **kwargs: Any) -> dict[str, Any]:
    return _step("embedding", "embed_source")(**kwargs)  # no retries here: the user sees it


LOCAL = Runner(
    embed=_local_embed,
    train=_step("training", "train_and_track"),
    reuse=_step("training", "reusable_training"),
    decide=_step("training", "escalation_decision"),
    finetune=_step("finetuning", "finetune_and_track"),
    log=logging.getLogger("headstart").info,
    publish=lambda *args: None,  # Prefect artifacts need a Prefect server
    score=_step("scoring", "score_new"),
    publish_score=lambda *args: None,
    audit=_step("audit", "audit_and_track"),
)


def prefect_api_url() -> str | None:
    """The Prefect API runs report to: `PREFECT_API_URL`, else the active Prefect profile's
    (`prefect config set PREFECT_API_URL=...`); None when neither names one. Read without
    importing Prefect."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    url = profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return str(url) if url else None


def using_prefect() -> bool:
    """Run the CLI's commands as Prefect flows: when a Prefect server is set up for them."""
    return prefect_api_url() is not None


class OrchestrationError(HeadstartError, RuntimeError):
    """The Prefect server that runs should report to is not there."""


def check_prefect_server(timeout_s: float = 5.0) -> str:
    """The configured Prefect API's URL, once it answers its health check; else a clear
    error (not Prefect's traceback after its own time-out)."""
    url = prefect_api_url()
    if url is None:
        raise OrchestrationError("no Prefect server is set up (PREFECT_API_URL is not set)")
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as r:
            if r.status == 200:
                return url
    except (OSError, ValueError):
        pass
    raise OrchestrationError(
        f"no Prefect server answers at {url} (PREFECT_API_URL): start it with "
        "`uv run prefect server start`, or unset PREFECT_API_URL to run without Prefect"
    )


def for_cli(name: str, workspace: str | Path | None = None) -> Callable[..., dict[str, Any]]:
    """The run `name` for a CLI command: the Prefect flow of flows/pipeline.py when a Prefect
    server is set up (its UI then shows the run; one clear error when it does not answer),
    else the run itself, in this process, without Prefect. Either way the same steps, and
    MLflow records the run: given the `workspace` the run logs to, its tracking store is
    checked first (it answers, it can be written), so a run does not embed or train for
    minutes and then fail on it."""
    if workspace is not None:
        from flows.tracking.store import check

        check(workspace)
    if not using_prefect():
        return globals()[name]
    check_prefect_server()
    from flows import pipeline

    return getattr(pipeline, name)


def run_name(prefix: str) -> str:
    return f"{prefix}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def nothing_new(report: dict[str, Any]) -> bool:
    """An embed report of a store that the update left exactly as it was."""
    return not (report["embedded"] or report["removed"])


def embed(
    source: str,
    embedding: EmbedSettings = EmbedSettings(),
    index: IndexSettings = IndexSettings(),
    engine: EngineSettings = EngineSettings(),
    store: str | None = None,
    workspace: str = str(DEFAULT_WORKSPACE),
    progress: bool = True,
    retry_delay_s: float = RETRY_DELAY_S,
    runner: Runner = LOCAL,
) -> dict[str, Any]:
    """Extract embeddings of new or changed images into the store and refresh its index;
    counts, per-stage throughput and the index's recall curve go to an MLflow run (none when
    nothing changed: there is nothing to record, and the command stays fast)."""
    report = runner.embed(
        retry_delay_s,
        source=source,
        embedding=embedding,
        index=index,
        engine=engine,
        store=store,
        workspace=workspace,
        progress=progress,
    )
    from flows.steps.embedding import embed_metrics, embed_summary, run_params

    runner.log(embed_summary(report))
    if nothing_new(report):
        return report | {"run_id": None}
    from flows.tracking import lifecycle as tracking

    params = run_params(report, embedding.seed, None) | flat_params(
        {"embed": embedding, "index": index, "engine": engine}
    )
    run_id = tracking.start_parent_run(report["source_name"], workspace, run_name("embed"), params)
    with tracking.closing_run(run_id, workspace):
        tracking.log_to_run(run_id, workspace, metrics=embed_metrics(report))
        tracking.log_index(run_id, workspace, report["index"])
    return report | {"run_id": run_id}


def train_heads(
    store: str,
    experiment: str | None = None,
    heads: list[str] | None = None,
    workspace: str = str(DEFAULT_WORKSPACE),
    seed: int = 0,
    runner: Runner = LOCAL,
) -> dict[str, Any]:
    """Train the heads on a store under one MLflow parent run."""
    from extractors.store.store import Store
    from flows.tracking import lifecycle as tracking

    name = experiment or Store(store).manifest()["source"]["name"]
    run_id = tracking.start_parent_run(
        name, workspace, run_name("train"), {"store": store, "seed": seed}
    )
    with tracking.closing_run(run_id, workspace):
        summary = runner.train(store, run_id, workspace=workspace, heads=heads, seed=seed)
    return {**summary, "run_id": run_id, "experiment": name}


def pipeline(
    source: str,
    settings: PipelineSettings = PipelineSettings(),
    store: str | None = None,
    workspace: str = str(DEFAULT_WORKSPACE),
    experiment: str | None = None,
    progress: bool = True,
    retry_delay_s: float = RETRY_DELAY_S,
    runner: Runner = LOCAL,
) -> dict[str, Any]:
    """embed -> heads (reused when the data is unchanged, unless `settings.retrain`) ->
    escalate to fine-tuning when the best head is below `settings.target` (or
    `settings.always_finetune`), scored on the same test split; every setting, the decisions
    and their reasons go to MLflow, the heads table to a Prefect artifact."""
    s = settings
    report = runner.embed(
        retry_delay_s,
        source=source,
        embedding=s.embed,
        index=s.index,
        engine=s.engine,
        store=store,
        workspace=workspace,
        progress=progress,
    )
    from flows.steps.embedding import embed_metrics, embed_summary, run_params
    from flows.tracking import lifecycle as tracking

    runner.log(embed_summary(report))
    name = experiment or report["source_name"]
    seed = s.embed.seed
    params = run_params(report, seed, s.target) | flat_params(s.as_dict())
    run_id = tracking.start_parent_run(name, workspace, run_name("pipeline"), params)
    with tracking.closing_run(run_id, workspace):
        tracking.log_to_run(run_id, workspace, metrics=embed_metrics(report))
        tracking.log_index(run_id, workspace, report["index"])
        summary, why = runner.reuse(report["store"], s.heads, seed)
        if summary is None or s.retrain:
            why = "asked to retrain (--retrain)" if summary is not None else why
            summary = runner.train(
                report["store"], run_id, workspace, heads=s.heads, seed=seed, progress=progress
            )
        tracking.log_to_run(
            run_id,
            workspace,
            params={"heads_retrained": "reused_from" not in summary},
            tags={"retrain_reason": why},
        )
        runner.log(f"heads: {why}")
        decision = runner.decide(summary, s.target, s.always_finetune)
        tracking.log_to_run(
            run_id,
            workspace,
            params={"escalate": decision["escalate"]},
            tags={"escalation_reason": decision["reason"]},
        )
        audited = None
        if s.audit:
            audited = runner.audit(report["store"], run_id, workspace, seed=seed)
            runner.log(audited["line"])
        tuned = None
        if decision["escalate"]:
            best = next(h for h in summary["heads"] if h["head"] == summary["best"])
            tuned = runner.finetune(
                report["store"], run_id, workspace, s.finetune, best, progress=progress
            )
    champ = champion_of(summary, tuned)
    runner.log(champ["line"])
    runner.publish(name, run_id, workspace, summary, tuned)
    return {
        "embed": report,
        **summary,
        "retrain_reason": why,
        "decision": decision,
        "finetune": tuned,
        "champion": champ,
        "audit": audited,
        "run_id": run_id,
        "experiment": name,
    }


def champion_of(summary: dict[str, Any], tuned: dict[str, Any] | None) -> dict[str, Any]:
    """The champion decision of this run: the fine-tuned network's when it ran (decided
    last), else the heads'; none when the heads were reused and nothing was registered."""
    if tuned and tuned.get("image_model"):
        return tuned["image_model"]["champion"]
    if "reused_from" in summary or not summary.get("image_model"):
        return {"line": "champion: unchanged (nothing new was registered)", "promoted": False}
    return summary["image_model"]["champion"]


def finetune(
    store: str,
    settings: FineTuneSettings = FineTuneSettings(),
    experiment: str | None = None,
    workspace: str = str(DEFAULT_WORKSPACE),
    progress: bool = True,
    runner: Runner = LOCAL,
) -> dict[str, Any]:
    """Fine-tune a store's backbone on its labelled images under an MLflow parent run of its
    own (scored on the store's test split, like the heads)."""
    from extractors.store.store import Store
    from flows.tracking import lifecycle as tracking

    manifest = Store(store).manifest()
    name = experiment or manifest["source"]["name"]
    params = {"store": store, "backbone": manifest["backbone"]} | flat_params(
        {"finetune": settings}
    )
    run_id = tracking.start_parent_run(name, workspace, run_name("finetune"), params)
    with tracking.closing_run(run_id, workspace):
        row = runner.finetune(store, run_id, workspace, settings, progress=progress)
    return {"finetune": row, "run_id": run_id, "experiment": name}


def score(
    source: str,
    predictions: str | None = None,
    model: str | None = None,
    experiment: str | None = None,
    store: str | None = None,
    workspace: str = str(DEFAULT_WORKSPACE),
    embedding: EmbedSettings = EmbedSettings(),
    progress: bool = True,
    runner: Runner = LOCAL,
) -> dict[str, Any]:
    """Score the new or changed images of `source` with `model` (default: the champion of
    `<experiment>-image`, the experiment defaulting to the source's name) and append them to
    the predictions table `predictions` (default: WORKSPACE/predictions/<source name>)."""
    from extractors.store.layout import slug

    name = experiment or Path(source).stem
    model = model or f"models:/{name}-image@champion"
    predictions = predictions or str(Path(workspace) / "predictions" / slug(name))
    report = runner.score(
        source,
        predictions,
        model,
        store=store,
        workspace=workspace,
        embedding=embedding,
        progress=progress,
    )
    if report["nothing_new"]:
        runner.log(f"nothing new in {source}: all {report['unchanged']} files already scored")
    else:
        runner.log(
            f"scored {report['rows']} new or changed files of {source} with {report['model']} "
            f"into {report['part']} ({report['errors']} errors)"
        )
    runner.publish_score(name, report)
    return report


def flat_params(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as MLflow params: nested settings flattened to `stage.field` keys."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Settings):
            value = value.as_dict()
        if isinstance(value, dict):
            flat |= {f"{key}.{k}": v for k, v in flat_params(value).items()}
        else:
            flat[key] = value
    return flat
