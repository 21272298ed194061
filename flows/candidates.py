"""A pipeline run over several backbones (`run SOURCE --backbone A --backbone B`): a store each,
all on one split (the first backbone's: `EmbedSettings.split_from`, so the split does not
depend on which store was embedded first), the heads of every backbone under one MLflow parent
run (each head run carries its `backbone`), then a ladder before fine-tuning: the frozen
candidates in the order given (cheapest first, as a person lists them), each rung's best head
against the target; fine-tuning, from the best frozen candidate, only when no rung reaches it.
Every candidate is trained: the grid is what an analyst compares."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flows.settings import PipelineSettings
from flows.tracking.tracker import metric_key

if TYPE_CHECKING:
    from flows.runs import Runner
    from flows.tracking.tracker import Tracker


def pipeline_over(
    source: str,
    s: PipelineSettings,
    workspace: str,
    experiment: str | None,
    progress: bool,
    retry_delay_s: float,
    runner: Runner,
) -> dict[str, Any]:
    """embed with each backbone -> the heads of each under one parent run -> the ladder's
    decision -> fine-tuning from the best when none reaches the target."""
    from flows import runs
    from flows.tracking.tracker import Tracker

    candidates = list(s.backbones or [])
    steps = len(candidates) + 2  # an embedding each, the heads, fine-tuning or not
    reports = []
    for i, backbone in enumerate(candidates, 1):
        runner.step(i, steps, f"embedding with {backbone}")
        split_from = reports[0]["store"] if reports else None
        embed = s.embed.replace(backbone=backbone, split_from=split_from)
        report = runner.embed(
            source, embed, s.index, s.engine, None, workspace, progress, retry_delay_s
        )
        reports.append(runs._embedded(runner, report))
    name = experiment or reports[0]["source_name"]
    tracker = Tracker(workspace)
    params = {"source": source, "candidates": ", ".join(candidates)}
    params |= runs.flat_params(s.replace(backbones=None).as_dict())
    with tracker.parent_run(name, runs.run_name("compare"), params) as run_id:
        reports = _shortlist(tracker, run_id, reports, s.shortlist)
        runner.step(steps - 1, steps, f"the heads of {len(reports)} backbones, one split")
        grid = [_rung(runner, tracker, run_id, r, s, progress) for r in reports]
        decision = ladder(grid, s.target, s.always_finetune)
        best = grid[decision["best"]]
        _log_grid(tracker, run_id, grid, decision)
        runner.step(steps, steps, f"fine-tuning: {decision['reason']}")
        tuned = None
        if decision["escalate"]:
            head = next(h for h in best["summary"]["heads"] if h["head"] == best["best_head"])
            tuned = runner.finetune(best["store"], run_id, workspace, s.finetune, head, progress)
    champ = runs.champion_of(best["summary"], tuned)
    runner.log(champ["line"])
    runner.publish(name, run_id, workspace, best["summary"], tuned)
    return {
        "backbones": [{k: v for k, v in g.items() if k != "summary"} for g in grid],
        "best_backbone": best["backbone"],
        "embed": reports[decision["best"]],
        **best["summary"],
        "retrain_reason": best["why"],
        "decision": decision,
        "finetune": tuned,
        "champion": champ,
        "run_id": run_id,
        "experiment": name,
    }


def _shortlist(
    tracker: Tracker, run_id: str, reports: list[dict[str, Any]], keep: int | None
) -> list[dict[str, Any]]:
    """The `keep` candidates LogME ranks best on their shared train images (all of them when
    `keep` is None), in the order given; each score a metric `logme.<backbone>`."""
    if keep is None or keep >= len(reports):
        return reports
    from extractors.store.store import Store
    from flows.steps.ranking import score, shared_train_paths, train_rows

    stores = [Store(r["store"]) for r in reports]
    paths = shared_train_paths(stores)
    logme = [score(*train_rows(st, "embedding", paths))["logme"] for st in stores]
    best = sorted(range(len(reports)), key=lambda i: -logme[i])[:keep]
    kept = [reports[i] for i in sorted(best)]
    tracker.log_to_run(
        run_id,
        metrics={
            f"logme.{metric_key(r['backbone'])}": v for r, v in zip(reports, logme, strict=True)
        },
        tags={"shortlist": ", ".join(r["backbone"] for r in kept)},
    )
    return kept


def _rung(
    runner: Runner,
    tracker: Tracker,
    run_id: str,
    report: dict[str, Any],
    s: PipelineSettings,
    progress: bool,
) -> dict[str, Any]:
    """One backbone's heads (reused when its data is unchanged) as a row of the grid."""
    seed, store = s.embed.seed, report["store"]
    summary, why = runner.reuse(store, s.heads, seed)
    if summary is None or s.retrain:
        why = "asked to retrain (--retrain)" if summary is not None else why
        summary = runner.train(store, run_id, str(tracker.workspace), s.heads, seed, progress)
    tracker.log_to_run(run_id, tags={f"retrain_reason.{metric_key(report['backbone'])}": why})
    runner.log(f"heads on {report['backbone']}: {why}")
    best = next(h for h in summary["heads"] if h["head"] == summary["best"])
    return {
        "backbone": report["backbone"],
        "store": report["store"],
        "best_head": best["head"],
        "val_score": best["val_score"],
        "accuracy": best.get("accuracy"),
        "heads": {h["head"]: h["val_score"] for h in summary["heads"]},
        "why": why,
        "summary": summary,
    }


def ladder(grid: list[dict[str, Any]], target: float | None, finetune: bool) -> dict[str, Any]:
    """The rungs in order, each backbone's best head against `target`: the first that reaches
    it (`reached`) means no fine-tuning; when none does, fine-tuning starts from the best
    frozen candidate (`best`: the best validation score of the grid). Every rung's verdict is
    kept (`rungs`), and the reason names the rung or the best."""
    best = max(range(len(grid)), key=lambda i: grid[i]["val_score"])
    rungs = []
    for g in grid:
        verdict = f"{g['backbone']}: {g['best_head']} val {g['val_score']:.3f}"
        if target is not None:
            verdict += f" {'>=' if g['val_score'] >= target else '<'} target {target:.3f}"
        rungs.append(verdict)
    ok = [i for i, g in enumerate(grid) if target is not None and g["val_score"] >= target]
    reached = ok[0] if ok else None
    if finetune:
        escalate, reason = True, "fine-tuning requested (--finetune)"
    elif target is None:
        escalate, reason = False, "no target set"
    elif reached is not None:
        escalate = False
        reason = f"rung {reached + 1} of {len(grid)}, {rungs[reached]}: no fine-tuning needed"
    else:
        escalate = True
        reason = (
            f"no frozen candidate reaches the target (best: {rungs[best]}); fine-tuning "
            f"{grid[best]['backbone']}"
        )
    return {
        "escalate": escalate,
        "reason": reason,
        "best": best,
        "reached": reached,
        "rungs": rungs,
        "best_head": grid[best]["best_head"],
        "best_val_score": grid[best]["val_score"],
    }


def _log_grid(
    tracker: Tracker, run_id: str, grid: list[dict[str, Any]], decision: dict[str, Any]
) -> None:
    """The grid on the parent run: each backbone's best val score (metric `val.<backbone>`),
    the best backbone, the ladder's rungs and decision; the parent's best_* are the grid's."""
    best = grid[decision["best"]]
    tracker.log_to_run(
        run_id,
        params={"escalate": decision["escalate"]},
        metrics={
            **{f"val.{metric_key(g['backbone'])}": g["val_score"] for g in grid},
            "best_val_score": best["val_score"],
        },
        tags={
            "best_backbone": best["backbone"],
            "best_head": best["best_head"],
            "ladder": " | ".join(decision["rungs"]),
            "escalation_reason": decision["reason"],
        },
    )
