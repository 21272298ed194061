"""The runs behind the commands, `embed`, `train-heads`, `pipeline`, `finetune` and `score`:
each one short sequence of steps, carried out by a `Runner`.

`LOCAL`, a plain `Runner`, calls the steps of flows/steps/ in this process: what the CLI does
when no Prefect server is set up (nothing to start, nothing imported). flows/pipeline.py's
`PrefectRunner` runs the same steps as Prefect tasks (retries, the embed cache, artifacts)
inside Prefect flows of the same names: what `serve`, the schedules and the CLI with
`PREFECT_API_URL` set run. `using_prefect` says which applies; `for_cli` picks.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from extractors import DEFAULT_WORKSPACE
from extractors.common import plural
from extractors.settings import (
    EmbedSettings,
    EngineSettings,
    IndexSettings,
    MonitorSettings,
    Settings,
    SettingsError,
)
from flows.settings import PipelineSettings
from heads.settings import FineTuneSettings

if TYPE_CHECKING:
    from flows.tracking.tracker import Tracker

RETRY_DELAY_S = 10.0  # Prefect only: the first retry of a transient failure (then 20, 40)
Run = TypeVar("Run", bound=Callable[..., dict[str, Any]])


class Runner:
    """How a run's steps execute: here, each step a call of its function in flows/steps/
    (imported at its first call: a command imports only the stages it runs), no retries
    (the user sees a failure at once), nothing published (artifacts need a Prefect server)."""

    def embed(
        self,
        source: str,
        embedding: EmbedSettings,
        index: IndexSettings,
        engine: EngineSettings,
        store: str | None,
        workspace: str,
        progress: bool,
        retry_delay_s: float = RETRY_DELAY_S,
    ) -> dict[str, Any]:
        from flows.steps.embedding import embed_source

        return embed_source(source, embedding, index, engine, store, workspace, progress)

    def train(
        self,
        store: str,
        parent_run_id: str,
        workspace: str,
        heads: list[str] | None,
        seed: int,
        progress: bool = False,
    ) -> dict[str, Any]:
        from flows.steps.training import train_and_track

        return train_and_track(store, parent_run_id, workspace, heads, seed, progress)

    def reuse(
        self, store: str, heads: list[str] | None, seed: int
    ) -> tuple[dict[str, Any] | None, str]:
        from flows.steps.training import reusable_training

        return reusable_training(store, heads, seed)

    def decide(
        self, summary: dict[str, Any], target: float | None, always_finetune: bool
    ) -> dict[str, Any]:
        from flows.steps.training import escalation_decision

        return escalation_decision(summary, target, always_finetune)

    def finetune(
        self,
        store: str,
        parent_run_id: str,
        workspace: str,
        settings: FineTuneSettings,
        best_head: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        from flows.steps.finetuning import finetune_and_track

        return finetune_and_track(
            store, parent_run_id, workspace, settings, best_head, progress=progress
        )

    def audit(self, store: str, parent_run_id: str, workspace: str, seed: int) -> dict[str, Any]:
        from flows.steps.audit import audit_and_track

        return audit_and_track(store, parent_run_id, workspace, seed)

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
        from flows.steps.scoring import score_new

        return score_new(source, predictions, model, store, workspace, embedding, progress, monitor)

    def log(self, message: str) -> None:
        logging.getLogger("headstart").info(message)

    def step(self, number: int, total: int, what: str) -> None:
        """Which step of a run starts: one line a person sees (the CLI prints it)."""
        logging.getLogger("headstart.steps").info(f"step {number}/{total}: {what}")

    def publish(
        self, name: str, run_id: str, workspace: str, summary: dict, tuned: dict | None
    ) -> None:
        """A training run's results where a person looks (here: nowhere but the log)."""

    def publish_score(self, name: str, report: dict) -> None:
        """A scoring run's results where a person looks (here: nowhere but the log)."""


LOCAL = Runner()


def for_cli(run: Run, workspace: str | Path | None = None) -> Run:
    """`run` (one of this module's) for a CLI command: its Prefect flow (flows/pipeline.py)
    when a Prefect server is set up (its UI then shows the run; one clear error when it does
    not answer), else the run itself, in this process, without Prefect. Either way the same
    steps, and MLflow records the run: given the `workspace` the run logs to, its tracking
    store is checked first (it answers, it can be written), so a run does not embed or train
    for minutes and then fail on it."""
    if workspace is not None:
        from flows.tracking.store import check

        check(workspace)
    from flows.orchestration import check_prefect_server, using_prefect

    if not using_prefect():
        return run
    check_prefect_server()
    from flows import pipeline

    return pipeline.flow_of(run)


def run_name(prefix: str) -> str:
    return f"{prefix}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def nothing_new(report: dict[str, Any]) -> bool:
    """An embed report of a store that the update left exactly as it was."""
    return not (report["embedded"] or report["removed"])


def _embedded(runner: Runner, report: dict[str, Any]) -> dict[str, Any]:
    """An embed step's report, said in one line."""
    from flows.steps.embedding import embed_summary

    runner.log(embed_summary(report))
    return report


def _log_embedding(tracker: Tracker, run_id: str, report: dict[str, Any]) -> None:
    """What the embed step did on the parent run: counts, throughput, the index."""
    from flows.steps.embedding import embed_metrics

    tracker.log_to_run(run_id, metrics=embed_metrics(report))
    tracker.log_index(run_id, report["index"])


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
    report = _embedded(
        runner,
        runner.embed(source, embedding, index, engine, store, workspace, progress, retry_delay_s),
    )
    if nothing_new(report):
        return report | {"run_id": None}
    from flows.steps.embedding import run_params
    from flows.tracking.tracker import Tracker

    tracker = Tracker(workspace)
    params = run_params(report, embedding.seed, None) | flat_params(
        {"embed": embedding, "index": index, "engine": engine}
    )
    with tracker.parent_run(report["source_name"], run_name("embed"), params) as run_id:
        _log_embedding(tracker, run_id, report)
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
    from flows.tracking.tracker import Tracker

    name = experiment or Store(store).manifest()["source"]["name"]
    params = {"store": store, "seed": seed}
    with Tracker(workspace).parent_run(name, run_name("train"), params) as run_id:
        summary = runner.train(store, run_id, workspace, heads, seed)
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
    from flows.steps.embedding import run_params
    from flows.tracking.tracker import Tracker

    s = settings
    if len(s.candidates()) > 1:
        from flows.candidates import pipeline_over

        if store is not None:
            raise SettingsError("--store names one store: give one --backbone with it")
        return pipeline_over(source, s, workspace, experiment, progress, retry_delay_s, runner)
    s = s.replace(embed=s.embed.replace(backbone=s.candidates()[0]))
    steps = 4 if s.audit else 3  # embed, heads, (audit), fine-tuning or not
    runner.step(1, steps, f"embedding the new or changed images of {source}")
    report = _embedded(
        runner,
        runner.embed(source, s.embed, s.index, s.engine, store, workspace, progress, retry_delay_s),
    )
    name = experiment or report["source_name"]
    tracker = Tracker(workspace)
    params = run_params(report, s.embed.seed, s.target) | flat_params(s.as_dict())
    with tracker.parent_run(name, run_name("pipeline"), params) as run_id:
        _log_embedding(tracker, run_id, report)
        runner.step(2, steps, "the heads, each swept on val and scored once on test")
        summary, why = _heads(runner, tracker, run_id, report["store"], s, progress)
        decision = _decide(runner, tracker, run_id, summary, s)
        if s.audit:
            runner.step(3, steps, "the label audit")
        audited = _audit(runner, run_id, report["store"], workspace, s)
        runner.step(steps, steps, f"fine-tuning: {decision['reason']}")
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


def _heads(
    runner: Runner,
    tracker: Tracker,
    run_id: str,
    store: str,
    s: PipelineSettings,
    progress: bool,
) -> tuple[dict[str, Any], str]:
    """The pipeline's heads: reused when the data is unchanged (unless `s.retrain`), else
    trained; and why, on the run."""
    seed = s.embed.seed
    summary, why = runner.reuse(store, s.heads, seed)
    if summary is None or s.retrain:
        why = "asked to retrain (--retrain)" if summary is not None else why
        summary = runner.train(store, run_id, str(tracker.workspace), s.heads, seed, progress)
    tracker.log_to_run(
        run_id,
        params={"heads_retrained": "reused_from" not in summary},
        tags={"retrain_reason": why},
    )
    runner.log(f"heads: {why}")
    return summary, why


def _decide(
    runner: Runner, tracker: Tracker, run_id: str, summary: dict[str, Any], s: PipelineSettings
) -> dict[str, Any]:
    """Whether to escalate to fine-tuning, and why, on the run: with `--layers` columns, the
    ladder's rungs too (flows/candidates.py `log_ladder`)."""
    from flows.candidates import log_ladder

    decision = runner.decide(summary, s.target, s.always_finetune)
    log_ladder(runner, tracker, run_id, decision)
    return decision


def _audit(
    runner: Runner, run_id: str, store: str, workspace: str, s: PipelineSettings
) -> dict[str, Any] | None:
    """The label audit, when asked for (`s.audit`)."""
    if not s.audit:
        return None
    audited = runner.audit(store, run_id, workspace, s.embed.seed)
    runner.log(audited["line"])
    return audited


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
    from flows.tracking.tracker import Tracker

    manifest = Store(store).manifest()
    name = experiment or manifest["source"]["name"]
    params = {"store": store, "backbone": manifest["backbone"]} | flat_params(
        {"finetune": settings}
    )
    with Tracker(workspace).parent_run(name, run_name("finetune"), params) as run_id:
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
    monitor: MonitorSettings = MonitorSettings(),
    runner: Runner = LOCAL,
) -> dict[str, Any]:
    """Score the new or changed images of `source` with `model` (default: the champion of
    `<experiment>-image`; without an experiment, the champion a bare `predict` uses: that of
    the latest store with heads, or of `store`) and append them to the predictions table
    `predictions` (default: WORKSPACE/predictions/<experiment>), each image with its
    out-of-distribution score; the batch's drift figures (`monitor`'s thresholds) go to an
    MLflow monitoring run, and an alarm is said (and, under Prefect, emitted as an event)."""
    from extractors.store.layout import slug
    from flows.steps.scoring import scoring_model

    model, name = scoring_model(source, model, experiment, store, workspace)
    predictions = predictions or str(Path(workspace) / "predictions" / slug(name))
    report = runner.score(
        source, predictions, model, store, workspace, embedding, progress, monitor
    )
    from flows.tracking.monitoring import record

    run_id = record(workspace, name, source, report, predictions)  # earlier batches' too
    if report.get("monitor"):
        report["monitor"]["run_id"] = run_id
        if report["monitor"]["alarm"]:
            runner.log(f"drift alarm on {source}: {'; '.join(report['monitor']['reasons'])}")
    if report["nothing_new"]:
        runner.log(f"nothing new in {source}: all {report['unchanged']} files already scored")
    else:
        runner.log(
            f"scored {plural(report['rows'], 'new or changed file')} of {source} with "
            f"{report['model']} into {report['part']} ({plural(report['errors'], 'error')})"
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
