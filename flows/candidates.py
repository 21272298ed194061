"""A pipeline run over several backbones (`run SOURCE --backbone A --backbone B`): a store each,
all on one split (the first backbone's: `EmbedSettings.split_from`, so the split does not
depend on which store was embedded first), embedded in one pass with the local engine (each
image read and decoded once for all: `embed_together`), the heads of every backbone under one
MLflow parent run (each head run carries its `backbone`), then a ladder before fine-tuning:
the frozen candidates, cheapest first: a rung per backbone (in the order given, as a person
lists them) and feature column (`embedding`, then its `--layers` columns as given), each
rung's best head against the target; fine-tuning, from the best frozen candidate, only when no
rung reaches it. The single-backbone run climbs the same ladder over its feature columns
(flows/steps/training.py `escalation_decision`). Every candidate is trained: the grid is what
an analyst compares."""

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
    together = s.engine.kind == "local" and len(candidates) > 1
    steps = (1 if together else len(candidates)) + 2  # embedding, the heads, fine-tuning or not
    reports = []
    if together:
        runner.step(1, steps, f"embedding with {', '.join(candidates)}, each image decoded once")
        embedded = embed_together(source, s, workspace, progress, retry_delay_s, runner)
        reports = [runs._embedded(runner, r) for r in embedded]
    for i, backbone in enumerate(candidates if not together else [], 1):
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
        grid = [_backbone_row(runner, tracker, run_id, r, s, progress) for r in reports]
        rungs = [r for g in grid for r in rungs_of(g["summary"], g["backbone"])]
        decision = ladder(rungs, s.target, s.always_finetune)
        k = [g["backbone"] for g in grid].index(decision["best_backbone"])
        best = grid[k]
        _log_grid(runner, tracker, run_id, grid, decision)
        runner.step(steps, steps, f"fine-tuning: {decision['reason']}")
        tuned = None
        if decision["escalate"]:
            head = next(h for h in best["summary"]["heads"] if h["head"] == decision["best_head"])
            tuned = runner.finetune(best["store"], run_id, workspace, s.finetune, head, progress)
    champ = runs.champion_of(best["summary"], tuned)
    runner.log(champ["line"])
    runner.publish(name, run_id, workspace, best["summary"], tuned)
    return {
        "backbones": [{k: v for k, v in g.items() if k != "summary"} for g in grid],
        "best_backbone": best["backbone"],
        "embed": reports[k],
        **best["summary"],
        "retrain_reason": best["why"],
        "decision": decision,
        "finetune": tuned,
        "champion": champ,
        "run_id": run_id,
        "experiment": name,
    }


def embed_together(
    source: str,
    s: PipelineSettings,
    workspace: str,
    progress: bool,
    retry_delay_s: float,
    runner: Runner,
) -> list[dict[str, Any]]:
    """The candidates' stores updated in one pass (extractors/store/update_many.py, local
    engine): each image file read and decoded once for every backbone. The same stores,
    splits (the later stores take the first's) and reports as embedding them one after
    another; a store whose update would change nothing is reported by the usual embed step
    (no model built for it)."""
    from extractors.embedding.engines import LocalEngine
    from extractors.embedding.sources import read_source
    from extractors.store.update_many import update_many
    from extractors.workspace import backbone_for, resolve_store
    from flows.steps.embedding import _report, splits_of

    e, names = s.embed, list(s.backbones or [])
    src = read_source(source)
    stores = [resolve_store(None, workspace, source=src.root, backbone=b) for b in names]
    for st, name in zip(stores, names, strict=True):
        st.check_backbone(name)
    first = stores[0]
    plain = e.weights is None and not s.index.given
    done: dict[int, dict[str, Any]] = {}
    for k, (st, name) in enumerate(zip(stores, names, strict=True)):
        if not plain or (k and 0 not in done):  # the first's split is not known yet
            continue
        if st.unchanged(src if k == 0 else splits_of(src, first), name, e.layers):
            embed = e.replace(backbone=name, split_from=str(first.path) if k else None)
            args = (s.index, s.engine, None, workspace, progress, retry_delay_s)
            done[k] = runner.embed(source, embed, *args)
    todo = [k for k in range(len(names)) if k not in done]
    nets = {k: backbone_for(names[k], workspace, weights=e.weights, device=e.device) for k in todo}
    for k, net in nets.items():
        st = stores[k]
        own = [v["module"] for v in st.manifest().get("layers", {}).values()] if st.exists else []
        net.set_layers(e.layers if e.layers is not None else own)
    updated = update_many(
        [(stores[k], nets[k]) for k in todo],
        src,
        seed=e.seed,
        engine=LocalEngine(e, progress),
        index=s.index,
        grouping=e.grouping(),
        commit_source=lambda st, base: base if st.path == first.path else splits_of(base, first),
    )
    for k, report in zip(todo, updated, strict=True):
        done[k] = _report(stores[k], report, src, "local", compiled=nets[k].compiled)
    return [done[k] for k in range(len(names))]


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


def _backbone_row(
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


def rungs_of(summary: dict[str, Any], backbone: str | None = None) -> list[dict[str, Any]]:
    """The frozen candidates of one training, a rung per feature column in the store's order
    (`embedding` first, then the `--layers` columns in the order given): each column's best
    head on validation (`val_by_feature` of the heads table; a head without it counts on the
    column it chose). `accuracy` (test) is known when that head chose this column."""
    scores: dict[str, dict[str, float]] = {}
    for h in summary["heads"]:
        chose = (h.get("params") or {}).get("feature", "embedding")
        for f, v in (h.get("val_by_feature") or {chose: h["val_score"]}).items():
            scores.setdefault(f, {})[h["head"]] = v
    features = sorted(scores, key=lambda f: f != "embedding")  # stable: the layers as given
    rungs = []
    for f in features:
        head = max(scores[f], key=lambda name: scores[f][name])  # ties: the table's order
        row = next(h for h in summary["heads"] if h["head"] == head)
        chose = (row.get("params") or {}).get("feature", "embedding")
        rungs.append(
            {
                "backbone": backbone,
                "feature": f,
                "best_head": head,
                "val_score": scores[f][head],
                "accuracy": row.get("accuracy") if chose == f else None,
            }
        )
    return rungs


def rung_name(rung: dict[str, Any], sep: str = " ") -> str:
    """A rung as the ladder names it: `backbone feature`, or the feature alone (one backbone)."""
    return sep.join(x for x in (rung.get("backbone"), rung["feature"]) if x)


def ladder(rungs: list[dict[str, Any]], target: float | None, finetune: bool) -> dict[str, Any]:
    """The rungs in order (cheapest first: `rungs_of` each backbone, in the order given), each
    rung's best head against `target`: the first that reaches it (`reached`) means no
    fine-tuning; when none does, fine-tuning starts from the best frozen candidate (`best`:
    the best validation score of all rungs, its backbone). Every rung's verdict is kept
    (`rungs`), and the reason names the rung reached or the best."""
    best = max(range(len(rungs)), key=lambda i: rungs[i]["val_score"])
    out = []
    for r in rungs:
        verdict = f"{rung_name(r)}: {r['best_head']} val {r['val_score']:.3f}"
        reaches = None if target is None else r["val_score"] >= target
        if target is not None:
            verdict += f" {'>=' if reaches else '<'} target {target:.3f}"
        out.append(r | {"reaches": reaches, "verdict": verdict})
    reached = next((i for i, r in enumerate(out) if r["reaches"]), None)
    top, n = out[best], len(out)
    if finetune:
        escalate, reason = True, "fine-tuning requested (--finetune)"
    elif target is None:
        escalate, reason = False, "no target set"
    elif reached is not None:
        escalate = False
        reason = f"rung {reached + 1} of {n}, {out[reached]['verdict']}: no fine-tuning needed"
    else:
        escalate = True
        reason = (
            f"no frozen candidate reaches the target ({n} rungs; best: rung {best + 1}, "
            f"{top['verdict']}); fine-tuning {top['backbone'] or 'the backbone'}, "
            f"whose best frozen feature is {top['feature']}"
        )
    return {
        "escalate": escalate,
        "reason": reason,
        "best": best,
        "reached": reached,
        "rungs": out,
        "best_backbone": top["backbone"],
        "best_feature": top["feature"],
        "best_head": top["best_head"],
        "best_val_score": top["val_score"],
    }


def log_ladder(runner: Runner, tracker: Tracker, run_id: str, decision: dict[str, Any]) -> None:
    """The decision on the parent run (param `escalate`, tag `escalation_reason`) and, when
    it was a ladder, each rung's verdict: the `ladder` tag (in order, ` | ` between), a metric
    `val.<rung>` each, and a runner line each."""
    rungs = decision.get("rungs") or []
    tags = {"escalation_reason": decision["reason"]}
    if rungs:
        for i, r in enumerate(rungs, 1):
            runner.log(f"ladder rung {i} of {len(rungs)}: {r['verdict']}")
        runner.log(f"ladder decision: {decision['reason']}")
        tags |= {"ladder": " | ".join(r["verdict"] for r in rungs)}
        tags |= {"best_feature": decision["best_feature"]}
    tracker.log_to_run(
        run_id,
        params={"escalate": decision["escalate"]},
        metrics={f"val.{metric_key(rung_name(r, '.'))}": r["val_score"] for r in rungs},
        tags=tags,
    )


def _log_grid(
    runner: Runner,
    tracker: Tracker,
    run_id: str,
    grid: list[dict[str, Any]],
    decision: dict[str, Any],
) -> None:
    """The grid on the parent run: each backbone's best val score (metric `val.<backbone>`),
    the best backbone, the ladder's rungs and decision (`log_ladder`); the parent's best_*
    are the best rung's."""
    log_ladder(runner, tracker, run_id, decision)
    tracker.log_to_run(
        run_id,
        metrics={
            **{f"val.{metric_key(g['backbone'])}": g["val_score"] for g in grid},
            "best_val_score": decision["best_val_score"],
        },
        tags={"best_backbone": decision["best_backbone"], "best_head": decision["best_head"]},
    )
