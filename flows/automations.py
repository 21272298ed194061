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


def automation_name(spec: DeploymentSpec) -> str:
    return f"headstart: run {spec.options['on_drift']} on drift in {spec.name}"


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
    its id."""
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
