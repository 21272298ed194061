"""Monitoring in MLflow: one run per scored batch under the experiment (tag
`headstart.kind = monitor`), its figures as metrics at the batch's time (the UI plots them over
time) and its most unusual images as a table; the history `headstart monitor` reads back; the
Prefect event an alarm raises (flows/pipeline.py). A batch's figures are kept on disk beside
its predictions until MLflow has them (`record`), so an MLflow failure after the batch was
written loses nothing: the next scoring run logs them, at the batch's own time."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from pathlib import Path
from typing import Any

from extractors.common import HeadstartError, exclusive, write_json_atomic
from flows.tracking.tracker import Tracker

KIND = "monitor"
DRIFT_EVENT = "headstart.drift.detected"  # what an automation of deployments.toml listens for
PARTS = ("embedding_drift", "ood", "prediction_drift", "confidence")
PENDING = ".monitoring-pending"  # in a predictions folder: batches' figures not yet in MLflow


def record(
    workspace: str | Path,
    experiment: str,
    source: str,
    report: dict[str, Any],
    predictions: str | Path,
) -> str | None:
    """Log the batch of `report` (if it was monitored) and any batch an earlier run could not
    log, oldest first; the batch's run id. Each batch's figures are written to the
    predictions folder's PENDING folder first and removed once MLflow has them."""
    folder = Path(predictions) / PENDING
    if report.get("monitor") and report.get("part"):
        entry = {
            "experiment": experiment,
            "source": source,
            "at": time.time(),
            "report": {k: report[k] for k in ("model", "part", "monitor")},
        }
        write_json_atomic(folder / f"{Path(report['part']).stem}.json", entry)
    if not folder.is_dir():
        return None
    busy = HeadstartError(f"another scoring run is logging the batches of {predictions}")
    run_id = None
    with exclusive(folder / ".lock", busy, wait_s=120):
        for pending in sorted(folder.glob("*.json")):
            e = json.loads(pending.read_text())
            logged = log_batch(workspace, e["experiment"], e["source"], e["report"], e["at"])
            pending.unlink()
            if report.get("part") and Path(report["part"]).stem == pending.stem:
                run_id = logged
    return run_id


def figures(watched: dict[str, Any]) -> dict[str, float]:
    """The batch's numbers, flat (`part.figure`): metrics, and an event's payload."""
    flat: dict[str, float] = {"images": float(watched["images"]), "alarm": float(watched["alarm"])}
    for part in PARTS:
        for key, value in (watched.get(part) or {}).items():
            if isinstance(value, bool | int | float) and math.isfinite(float(value)):
                flat[f"{part}.{key}"] = float(value)
    return flat


def log_batch(
    workspace: str | Path,
    experiment: str,
    source: str,
    report: dict[str, Any],
    at: float | None = None,
) -> str:
    """The batch's monitoring run, at its time `at` (seconds; default now); its id."""
    watched = report["monitor"]
    tracker = Tracker(workspace)
    client = tracker.client()
    at = time.time() if at is None else at
    stamp = dt.datetime.fromtimestamp(at).strftime("%Y%m%d-%H%M%S")
    run = client.create_run(
        tracker.experiment_id(experiment),
        run_name=f"monitor-{stamp}",
        tags={
            "headstart.kind": KIND,
            "alarm": "yes" if watched["alarm"] else "no",
            "reasons": "; ".join(watched["reasons"]) or "none",
        },
    )
    run_id = run.info.run_id
    now = int(at)
    for key, value in {"source": source, "model": report["model"], "part": report["part"]}.items():
        client.log_param(run_id, key, str(value))
    for key, value in figures(watched).items():
        client.log_metric(run_id, key, value, timestamp=now * 1000, step=now)
    if watched.get("flagged"):
        client.log_table(run_id, _columns(watched["flagged"]), "flagged.json")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {k: [r[k] for r in rows] for k in rows[0]}


def history(workspace: str | Path, experiment: str | None = None) -> list[dict[str, Any]]:
    """Every monitoring run, newest first: when, which experiment, alarm, reasons, figures."""
    tracker = Tracker(workspace)
    client = tracker.client(write=False)
    experiments = client.search_experiments()
    ids = [e.experiment_id for e in experiments if experiment in (None, e.name)]
    names = {e.experiment_id: e.name for e in experiments}
    if not ids:
        return []
    runs = client.search_runs(
        ids, f"tags.`headstart.kind` = '{KIND}'", order_by=["attributes.start_time DESC"]
    )
    return [
        {
            "at": dt.datetime.fromtimestamp(r.info.start_time / 1000).isoformat(timespec="seconds"),
            "experiment": names[r.info.experiment_id],
            "run_id": r.info.run_id,
            "source": r.data.params.get("source"),
            "alarm": r.data.tags.get("alarm") == "yes",
            "reasons": r.data.tags.get("reasons", ""),
            **r.data.metrics,
        }
        for r in runs
    ]


def summary(watched: dict[str, Any]) -> str:
    """The batch's figures as Markdown (a Prefect artifact)."""
    lines = [f"**{'ALARM' if watched['alarm'] else 'no alarm'}**: {watched['images']} images"]
    lines += [f"- {r}" for r in watched["reasons"]]
    lines += [f"- `{k}`: {v:.4g}" for k, v in figures(watched).items()]
    return "\n".join(lines)
