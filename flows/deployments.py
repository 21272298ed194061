"""Scheduled deployments of the pipeline, declared in deployments.toml and served by `serve`."""

from __future__ import annotations

import inspect
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_FILE = "deployments.toml"


class DeploymentError(ValueError):
    """A deployments file or option that cannot be served; the message says what to fix."""


@dataclass
class DeploymentSpec:
    """One scheduled pipeline: a source, a cron or an interval (seconds), its parameters."""

    name: str
    source: str
    cron: str | None = None
    interval: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.interval is None):
            raise DeploymentError(f"deployment {self.name!r}: give either cron or interval")
        if self.interval is not None and self.interval <= 0:
            raise DeploymentError(f"deployment {self.name!r}: interval must be > 0 seconds")
        allowed = set(pipeline_parameters()) - {"source", "progress"}
        unknown = sorted(set(self.parameters) - allowed)
        if unknown:
            raise DeploymentError(
                f"deployment {self.name!r}: unknown parameters {unknown}; "
                f"the pipeline takes {sorted(allowed)}"
            )

    @property
    def schedule(self) -> str:
        return f"cron '{self.cron}'" if self.cron else f"every {self.interval:g} s"


def pipeline_parameters() -> list[str]:
    from flows.pipeline import pipeline

    return list(inspect.signature(pipeline.fn).parameters)


def read_file(path: str | Path) -> list[DeploymentSpec]:
    """Every [[deployment]] of a TOML file; relative paths are relative to the file."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise DeploymentError(
            f"no {path}: give a SOURCE to serve, or declare deployments in {path} "
            f"(one [[deployment]] per source with name, source, cron or interval)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise DeploymentError(f"{path} is not valid TOML: {exc}") from None
    entries = doc.get("deployment", [])
    if not entries:
        raise DeploymentError(f"{path} declares no [[deployment]]")
    specs = []
    for i, entry in enumerate(entries):
        entry = dict(entry)
        try:
            name, source = entry.pop("name"), entry.pop("source")
        except KeyError as exc:
            raise DeploymentError(f"{path}: deployment #{i + 1} has no {exc.args[0]!r}") from None
        cron, interval = entry.pop("cron", None), entry.pop("interval", None)
        for key in ("source", "store", "workspace", "weights"):
            value = source if key == "source" else entry.get(key)
            if value is not None and not Path(value).is_absolute():
                value = str((path.parent / value).resolve())
            if key == "source":
                source = value
            elif value is not None:
                entry[key] = value
        specs.append(DeploymentSpec(name, source, cron, interval, entry))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DeploymentError(f"{path}: deployment names must be unique, got {names}")
    return specs


def build(specs: list[DeploymentSpec]) -> list[Any]:
    """Prefect deployments of the pipeline flow, one per spec."""
    from flows.pipeline import pipeline

    return [
        pipeline.to_deployment(
            name=s.name,
            cron=s.cron,
            interval=s.interval,
            parameters={"source": s.source, "progress": False, **s.parameters},
            description=f"headstart pipeline over {s.source}, {s.schedule}",
            tags=["headstart"],
        )
        for s in specs
    ]
