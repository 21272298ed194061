"""Scheduled deployments, declared in deployments.toml and served by `serve`: the training
pipeline, and scoring with the champion.

One `[[deployment]]` per source: `name`, `source`, `cron` or `interval` (seconds), optional
`store`, `workspace` and `experiment`, the pipeline's own settings (`target`, `heads`,
`always_finetune`, `retrain`) and one table per stage, each field as in flows/settings.py:

    [[deployment]]
    name = "photos-nightly"
    source = "photos"
    cron = "0 2 * * *"
    target = 0.85
    [deployment.embed]
    backbone = "timm:convnext_tiny.fb_in1k"
    batch_size = 64
    [deployment.index]
    max_memory = "2GB"
    [deployment.engine]
    kind = "dask"
    [deployment.finetune]
    strategy = "partial"

`kind = "score"` makes it a scoring deployment instead: each run scores the new or changed
images of `source` with `model` (default `models:/<experiment>-image@champion`) and appends
them to the `predictions` folder (default WORKSPACE/predictions/<experiment>); its stage
tables are `[deployment.embed]` (batch_size, decode_threads, device) and
`[deployment.monitor]` (the drift and out-of-distribution thresholds, `MonitorSettings`):

    [[deployment]]
    name = "photos-hourly-scores"
    kind = "score"
    source = "incoming"
    cron = "0 * * * *"
    experiment = "photos"
    [deployment.monitor]
    ood_level = 0.05

The whole file is checked against one typed schema (`_File`) when it is read, before anything
is served: a wrong type, shape or unknown key is one line naming the key and the deployment.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from extractors.common import HeadstartError
from extractors.embedding.sources import source_name
from extractors.settings import MonitorSettings, SettingsError
from extractors.store.layout import is_url
from flows.settings import STAGES, PipelineSettings

LOCATIONS = ("store", "workspace", "experiment")  # where a run reads and records, not settings
KINDS = ("pipeline", "score")
SCORE_OPTIONS = ("model", "predictions", "on_drift", "monitor")  # a score deployment's own keys
AUTOMATION_OPTIONS = ("on_drift",)  # what `serve` makes Prefect automations of, not parameters
SCORE_EMBED = ("batch_size", "decode_threads", "device")  # what a score run takes of embed


class DeploymentError(HeadstartError, ValueError):
    """A deployments file or option that cannot be served; the message says what to fix."""


@dataclass(frozen=True)
class DeploymentSpec:
    """One scheduled pipeline: a source, a cron or an interval (seconds), where it records
    (store, workspace, experiment) and its settings."""

    name: str
    source: str
    cron: str | None = None
    interval: float | None = None
    settings: PipelineSettings = field(default_factory=PipelineSettings)
    locations: dict[str, str] = field(default_factory=dict)
    kind: str = "pipeline"
    options: dict[str, Any] = field(default_factory=dict)  # score: SCORE_OPTIONS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DeploymentError(
                f"deployment {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}"
            )
        if (self.cron is None) == (self.interval is None):
            raise DeploymentError(f"deployment {self.name!r}: give either cron or interval")
        if self.cron is not None:
            _check_cron(self.name, self.cron)
        if self.interval is not None:
            if isinstance(self.interval, bool) or not isinstance(self.interval, int | float):
                raise DeploymentError(
                    f"deployment {self.name!r}: interval must be a number of seconds, not "
                    f"{self.interval!r}"
                )
            if not (math.isfinite(self.interval) and self.interval > 0):
                raise DeploymentError(
                    f"deployment {self.name!r}: interval must be a finite number of seconds "
                    f"> 0, not {self.interval!r}"
                )
        unknown = sorted(set(self.locations) - set(LOCATIONS))
        if unknown:
            raise DeploymentError(
                f"deployment {self.name!r}: unknown parameters {unknown}; the locations are "
                f"{', '.join(LOCATIONS)}"
            )

    @property
    def schedule(self) -> str:
        return f"cron '{self.cron}'" if self.cron else f"every {self.interval:g} s"

    def parameters(self) -> dict[str, Any]:
        """The flow's parameters (JSON: Prefect stores them and validates them)."""
        if self.kind == "score":  # a schedule never floats to whatever was trained last
            return {
                "source": self.source,
                "embedding": self.settings.embed.as_dict(),
                "progress": False,
                "experiment": source_name(self.source),
                **self.locations,
                **{k: v for k, v in self.options.items() if k not in AUTOMATION_OPTIONS},
            }
        return {
            "source": self.source,
            "settings": self.settings.as_dict(),
            "progress": False,
            **self.locations,
        }


def _check_cron(name: str, cron: Any) -> None:
    """Refuse a cron string Prefect's scheduler would refuse, now rather than at serve time."""
    from prefect.client.schemas.schedules import CronSchedule

    problem = None if isinstance(cron, str) else "must be a string"
    if problem is None:
        try:
            CronSchedule(cron=cron)
        except ValueError:
            problem = "is not a valid cron schedule"
    if problem:
        raise DeploymentError(
            f"deployment {name!r}: cron {cron!r} {problem}; write five fields like "
            "'0 * * * *' (minute 0-59, hour 0-23, day, month, weekday) or @hourly, @daily"
        )


def settings_of(entry: dict[str, Any], where: str) -> PipelineSettings:
    """A deployment's settings from its TOML keys, with a one-line error for a wrong one."""
    _check_placement(entry, where)
    try:
        return PipelineSettings.from_dict(entry)
    except SettingsError as exc:
        raise DeploymentError(f"{where}: {exc}") from None


def _check_placement(entry: dict[str, Any], where: str) -> None:
    """Refuse a stage's setting written at the top of a deployment, saying which table."""
    sections = {cls.section: cls for cls in STAGES}
    misplaced = {
        k: cls.section
        for k in entry
        if k not in sections and k not in {f.name for f in dataclasses.fields(PipelineSettings)}
        for cls in STAGES
        if k in {f.name for f in dataclasses.fields(cls)}
    }
    if misplaced:
        hints = ", ".join(f"{k} under [deployment.{s}]" for k, s in misplaced.items())
        raise DeploymentError(f"{where}: stage settings go in their table: put {hints}")


Text = Annotated[str, Field(strict=True, min_length=1)]


class _Entry(BaseModel):
    """One [[deployment]] table: its own keys typed here, the settings (pipeline keys and stage
    tables, `PipelineSettings` fields) passed whole to the settings objects, which check them."""

    model_config = ConfigDict(strict=True, extra="forbid")
    name: Text
    source: Text
    cron: Text | None = None
    interval: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    kind: Literal["pipeline", "score"] = "pipeline"
    store: Text | None = None
    workspace: Text | None = None
    experiment: Text | None = None
    model: Text | None = None
    predictions: Text | None = None
    on_drift: Text | None = None
    monitor: dict[str, Any] | None = None  # a score deployment's [deployment.monitor] table


# The settings' keys, from the settings object itself (one list): checked by `settings_of`.
_Deployment = create_model(
    "_Deployment",
    __base__=_Entry,
    **{f.name: (Any, None) for f in dataclasses.fields(PipelineSettings)},
)


class _File(BaseModel):
    """deployments.toml: one or more [[deployment]] tables and nothing else."""

    model_config = ConfigDict(strict=True, extra="forbid")
    deployment: Annotated[list[_Deployment], Field(min_length=1)]  # type: ignore[valid-type]


def _schema_error(path: Path, doc: dict[str, Any], exc: ValidationError) -> DeploymentError:
    """The first problem of a file that does not fit `_File`, as one line naming the key
    and the deployment."""
    errors = exc.errors()
    top = [e for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
    err = (top or errors)[0]  # a misspelt [[deployments]] before "no [[deployment]]"
    loc, value = err["loc"], err.get("input")
    if loc == ("deployment",) and err["type"] == "missing":
        return DeploymentError(f"{path} declares no [[deployment]]")
    if len(loc) == 1:
        if err["type"] == "extra_forbidden":
            return DeploymentError(
                f"{path}: unknown top-level key {loc[0]!r}; declare each deployment as "
                "[[deployment]]"
            )
        if isinstance(value, dict):
            return DeploymentError(
                f"{path}: write each deployment as [[deployment]] (an array of tables), "
                "not [deployment]"
            )
        if isinstance(value, list) and not value:
            return DeploymentError(f"{path} declares no [[deployment]]")
        return DeploymentError(f"{path}: deployment must be [[deployment]] tables, not {value!r}")
    i = loc[1]
    entry = doc["deployment"][i]
    if len(loc) == 2:  # the entry itself is not a table
        return DeploymentError(f"{path}: deployment #{i + 1} is {value!r}, not a table")
    name = entry.get("name")
    who = f"deployment {name!r}" if isinstance(name, str) and name else f"deployment #{i + 1}"
    key = ".".join(str(k) for k in loc[2:])
    if err["type"] == "missing":
        return DeploymentError(f"{path}: {who} has no {key!r}")
    if err["type"] == "extra_forbidden":
        takes = ", ".join(_Deployment.model_fields)
        return DeploymentError(f"{path}: {who}: unknown key {key!r}; a deployment takes {takes}")
    if key == "kind":
        problem = f"is not one of {', '.join(KINDS)}"
    elif key == "interval":
        problem = "is not a finite number of seconds > 0"
    elif err["type"] in ("string_type", "string_too_short"):
        problem = "is not a non-empty string"
    else:
        problem = f"is wrong: {err['msg'].lower()}"
    return DeploymentError(f"{path}: {who}: {key} {value!r} {problem}")


def read_file(path: str | Path) -> list[DeploymentSpec]:
    """Every [[deployment]] of a TOML file, the whole file checked against one schema
    (`_File`: each key's type, no unknown key; the settings by the settings objects) before
    anything is built; relative paths are relative to the file."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise DeploymentError(
            f"no {path}: give a SOURCE to serve, or declare deployments in {path} "
            f"(one [[deployment]] per source with name, source, cron or interval)"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DeploymentError(f"{path} is not valid TOML: {exc}") from None
    entries = doc.get("deployment")
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(entry, dict):
            who = repr(name) if isinstance(name, str) else f"#{i + 1}"
            own = {k: v for k, v in entry.items() if k not in _Entry.model_fields}
            _check_placement(own, f"{path}: deployment {who}")
    try:
        parsed = _File.model_validate(doc)
    except ValidationError as exc:
        raise _schema_error(path, doc, exc) from None
    specs = []
    for dep in parsed.deployment:
        entry = dep.model_dump(exclude_unset=True)
        name, source = entry.pop("name"), entry.pop("source")
        cron, interval = entry.pop("cron", None), entry.pop("interval", None)
        kind = entry.pop("kind", "pipeline")
        locations = {k: entry.pop(k) for k in LOCATIONS if k in entry}
        for key in ("store", "workspace"):
            if key in locations:
                locations[key] = _resolve(path, locations[key])
        options = _score_options(path, name, kind, entry)
        embed = entry.get("embed")
        if isinstance(embed, dict) and embed.get("weights"):
            entry["embed"] = embed | {"weights": _resolve(path, embed["weights"])}
        settings = settings_of(entry, f"{path}: deployment {name!r}")
        specs.append(
            DeploymentSpec(
                name, _resolve(path, source), cron, interval, settings, locations, kind, options
            )
        )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DeploymentError(f"{path}: deployment names must be unique, got {names}")
    for spec in specs:
        _check_on_drift(path, spec, specs)
    return specs


def _check_on_drift(path: Path, spec: DeploymentSpec, specs: list[DeploymentSpec]) -> None:
    """`on_drift` names a pipeline deployment of the file that trains the experiment scored."""
    target = spec.options.get("on_drift")
    if target is None:
        return
    pipelines = {s.name: s for s in specs if s.kind == "pipeline"}
    where = f"{path}: deployment {spec.name!r}: on_drift {target!r}"
    if target not in pipelines:
        raise DeploymentError(
            f"{where} is not a pipeline deployment of this file ({', '.join(pipelines) or 'none'})"
        )
    trains = pipelines[target].locations.get("experiment") or source_name(pipelines[target].source)
    scores = spec.parameters()["experiment"]
    if trains != scores:
        raise DeploymentError(
            f"{where} trains experiment {trains!r}, but this deployment scores with {scores!r}'s "
            "champion: the retrained model would never score here"
        )


def _score_options(path: Path, name: str, kind: str, entry: dict[str, Any]) -> dict[str, str]:
    """A score deployment's model and predictions folder, taken out of `entry`; refuses the
    training settings it would ignore."""
    options = {k: entry.pop(k) for k in SCORE_OPTIONS if k in entry}
    where = f"{path}: deployment {name!r}"
    if kind != "score":
        if options:
            raise DeploymentError(f'{where}: {sorted(options)} are for kind = "score"')
        return options
    ignored = sorted(k for k in entry if k != "embed") + [
        f"embed.{k}" for k in entry.get("embed", {}) if k not in SCORE_EMBED
    ]
    if ignored:
        raise DeploymentError(
            f"{where}: a score deployment takes model, predictions, on_drift, monitor and "
            f"embed.{{{', '.join(SCORE_EMBED)}}}, not {ignored} (its model decides the backbone)"
        )
    if "monitor" in options:  # the thresholds, checked as `score --help` documents them
        try:
            options["monitor"] = MonitorSettings.from_dict(options["monitor"]).as_dict()
        except SettingsError as exc:
            raise DeploymentError(f"{where}: [deployment.monitor] {exc}") from None
    if "predictions" in options:
        options["predictions"] = _resolve(path, options["predictions"])
    return options


def _resolve(path: Path, value: Any) -> str:
    if not isinstance(value, str):
        raise DeploymentError(f"{path}: paths are strings, not {value!r}")
    if is_url(value) or Path(value).is_absolute():  # s3://bucket/prefix/: as it is
        return value
    return str((path.parent / value).resolve())


def build(specs: list[DeploymentSpec]) -> list[Any]:
    """Prefect deployments, one per spec: of the pipeline flow, or of the score flow."""
    from flows import pipeline

    return [
        pipeline.DEPLOYABLE[s.kind].to_deployment(
            name=s.name,
            cron=s.cron,
            interval=s.interval,
            parameters=s.parameters(),
            description=f"headstart {s.kind} over {s.source}, {s.schedule}",
            tags=["headstart"],
        )
        for s in specs
    ]
