"""Monitoring in MLflow: one run per scored batch under the experiment (tag
`headstart.kind = monitor`), its figures as metrics at the batch's time (the UI plots them over
time) and its most unusual images as a table; the history `headstart monitor` reads back; the
Prefect event an alarm raises (flows/pipeline.py)."""

from __future__ import annotations

import datetime as dt
import math
import time
from pathlib import Path
from typing import Any

from flows.tracking.tracker import Tracker

KIND = "monitor"
DRIFT_EVENT = "headstart.drift.detected"  # what an automation of deployments.toml listens for
PARTS = ("embedding_drift", "ood", "prediction_drift", "confidence")


def figures(watched: dict[str, Any]) -> dict[str, float]:
    """The batch's numbers, flat (`part.figure`): metrics, and an event's payload."""
    flat: dict[str, float] = {"images": float(watched["images"]), "alarm": float(watched["alarm"])}
    for part in PARTS:
        for key, value in (watched.get(part) or {}).items():
            if isinstance(value, bool | int | float) and math.isfinite(float(value)):
                flat[f"{part}.{key}"] = float(value)
    return flat


def log_batch(workspace: str | Path, experiment: str, source: str, report: dict[str, Any]) -> str:
    """The batch's monitoring run; its id."""
    watched = report["monitor"]
    tracker = Tracker(workspace)
    client = tracker.client()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
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
    now = int(time.time())
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
