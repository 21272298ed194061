"""Results read back from MLflow: every model of the runs side by side (what analysts see in
the UI), the test images a run's models disagree on, and the trainings scored on a store."""

from __future__ import annotations

from typing import Any

import mlflow

from extractors.common import HeadstartError
from flows.tracking.models import TEST_TABLE, _metrics
from flows.tracking.tracker import Tracker

MAX_RUNS = 5000  # model runs read back per kind


class ExperimentNotFound(HeadstartError, ValueError):
    """An experiment name that the tracking store does not hold."""


def compare_runs(
    tracker: Tracker, experiment: str | None = None, last: int | None = None
) -> list[dict[str, Any]]:
    """Every head and fine-tuned network read back from MLflow, grouped by parent run (newest
    parent first, best validation score first within it): the table analysts see in the UI."""
    client = tracker.client(write=False)
    names = _experiments(tracker, experiment)
    runs = (
        [
            r
            for kind in ("head", "finetune")
            for r in client.search_runs(
                list(names), f"tags.`headstart.kind` = '{kind}'", max_results=MAX_RUNS
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
    rows = []
    for pid in order if last is None else order[:last]:
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid]
        kids.sort(key=lambda r: -r.data.metrics.get("val_score", 0.0))
        rows += [_row(r, parents[pid], names) for r in kids]
    return rows


def _experiments(tracker: Tracker, experiment: str | None) -> dict[str, str]:
    """Ids and names of the experiment asked for (an error naming it when there is none),
    else of all of them."""
    client = tracker.client(write=False)
    if experiment is None:
        return {e.experiment_id: e.name for e in client.search_experiments()}
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ExperimentNotFound(
            f"no MLflow experiment {experiment!r} in {tracker.uri}; "
            "`headstart compare` without --experiment lists them all"
        )
    return {exp.experiment_id: exp.name}


def _row(run: Any, parent: Any, names: dict[str, str]) -> dict[str, Any]:
    """One model run as a row of the comparison."""
    m, params, tags = run.data.metrics, run.data.params, run.data.tags
    chosen = {k.removeprefix("chosen."): v for k, v in params.items() if k.startswith("chosen.")}
    if params.get("feature", "embedding") != "embedding":
        chosen["feature"] = params["feature"]
    return {
        "experiment": names[run.info.experiment_id],
        "parent_run": parent.info.run_name,
        "parent_run_id": parent.info.run_id,
        # the model's own (a run over several backbones), else its parent's
        "backbone": params.get("backbone") or parent.data.params.get("backbone", ""),
        "model": tags.get("headstart.head", run.info.run_name),
        "kind": tags.get("headstart.kind"),
        "finetuned_backbone": tags.get("headstart.backbone"),
        "chosen": chosen,
        "run_id": run.info.run_id,
        "val_score": m.get("val_score"),
        **{k: m.get(k) for k in _metrics()},
    }


def disagreements(
    tracker: Tracker, experiment: str | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """The test images the models of the newest run disagree on: (the models, best first;
    one row per such image: path, label and each model's prediction), from each model run's
    test predictions table."""
    rows = compare_runs(tracker, experiment=experiment, last=1)
    client = tracker.client(write=False)
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


def runs_scored_on(tracker: Tracker, store: str, fingerprint: str) -> list[dict[str, Any]]:
    """The trainings (parent runs, newest first) whose models were scored on the store's rows
    as they are now (`fingerprint`): each its run id, name, start and link."""
    client = tracker.client(write=False)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    models = client.search_runs(
        experiments, f"params.fingerprint = '{fingerprint}' and params.store = '{store}'"
    )
    parents = dict.fromkeys(
        r.data.tags.get("mlflow.parentRunId", r.info.run_id)
        for r in models
        if "model" in r.data.params  # else an embed run: it scored nothing
    )
    out = []
    for run_id in parents:
        run = client.get_run(run_id)
        out.append(
            {
                "run_id": run_id,
                "name": run.info.run_name,
                "started": run.info.start_time,
                "url": tracker.run_url(run_id),
            }
        )
    return sorted(out, key=lambda r: -r["started"])
