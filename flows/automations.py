"""Prefect automations of deployments.toml: a score deployment's `on_drift = "<pipeline
deployment>"` makes Prefect run that deployment when its scoring emits the drift event
(flows/tracking/monitoring.py `DRIFT_EVENT`, resource `headstart.experiment.<experiment>`);
the champion rule then decides whether the retrained model takes over."""

from __future__ import annotations

import contextlib
from typing import Any

from prefect.automations import Automation
from prefect.events.actions import RunDeployment
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.exceptions import ObjectNotFound

from flows.deployments import DeploymentSpec
from flows.tracking.monitoring import DRIFT_EVENT

PREFIX, SUFFIX = "headstart: run ", " on drift in "  # the automations headstart makes


def automation_name(spec: DeploymentSpec) -> str:
    return f"{PREFIX}{spec.options['on_drift']}{SUFFIX}{spec.name}"


def trigger_of(spec: DeploymentSpec) -> EventTrigger:
    """The drift event of the score deployment's experiment, each time it is emitted."""
    experiment = spec.parameters()["experiment"]
    return EventTrigger(
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": f"headstart.experiment.{experiment}"},
        posture=Posture.Reactive,
        threshold=1,
    )


def drift_automations(specs: list[DeploymentSpec], built: list[Any]) -> list[Automation]:
    """One automation per score deployment with `on_drift`, replacing one of the same name
    (so serving again does not pile them up); the target deployment is applied first, for
    its id. An automation an earlier `serve` made for a score deployment of `specs` that
    no longer has it (on_drift removed, or pointing elsewhere) is deleted (`stale`)."""
    by_name = {d.name: d for d in built}
    made = []
    for spec in specs:
        if spec.kind != "score" or not spec.options.get("on_drift"):
            continue
        target = by_name[spec.options["on_drift"]].apply()
        name = automation_name(spec)
        with contextlib.suppress(ObjectNotFound, ValueError):
            Automation.read(name=name).delete()
        action = RunDeployment(source="selected", deployment_id=target)
        made.append(Automation(name=name, trigger=trigger_of(spec), actions=[action]).create())
    return made


def stale(specs: list[DeploymentSpec]) -> list[str]:
    """Delete the automations headstart made for the score deployments of `specs` that they
    no longer declare; their names."""
    from prefect import get_client

    wanted = {automation_name(s) for s in specs if s.options.get("on_drift")}
    mine = tuple(f"{SUFFIX}{s.name}" for s in specs if s.kind == "score")
    removed = []
    with get_client(sync_client=True) as client:
        for automation in client.read_automations():
            name = automation.name
            if name.startswith(PREFIX) and name.endswith(mine) and name not in wanted:
                client.delete_automation(automation.id)
                removed.append(name)
    return removed
