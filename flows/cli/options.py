"""Options shared by the commands, declared once: the locations (workspace, store), --json, and
every settings field as an option of its own (`with_settings`), with the default, help text
and check of its settings class (extractors/settings.py, heads/settings.py, flows/settings.py).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from extractors.settings import Settings

Workspace = Annotated[
    Path,
    typer.Option(
        help="Workspace for stores, sample data and the default MLflow store.",
        envvar="HEADSTART_HOME",
    ),
]
StoreOpt = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help="Store directory (default: one per source and backbone under "
        "WORKSPACE/stores; commands without a source use the latest store).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
Experiment = Annotated[
    str | None, typer.Option(help="MLflow experiment (default: the source's name).")
]


@dataclasses.dataclass(frozen=True)
class Group:
    """One settings object a command takes: its class, the fields it offers as options (`only`,
    default all) or leaves out (`skip`: the command sets them), and the defaults it changes."""

    cls: type[Settings]
    skip: frozenset[str] = frozenset()
    only: frozenset[str] | None = None
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)

    def offers(self, f: dataclasses.Field) -> bool:
        declared = "help" in f.metadata  # a stage's settings inside the pipeline's are not
        return declared and f.name not in self.skip and (self.only is None or f.name in self.only)


def with_settings(**groups: type[Settings] | Group) -> Callable[[Callable], Callable]:
    """Give a command one option per field of each settings class; the command receives the
    built objects as the keyword arguments named here (a bad value: one line, exit 2)."""
    specs = {k: g if isinstance(g, Group) else Group(g) for k, g in groups.items()}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        sig, hints = inspect.signature(command), typing.get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints[p.name]) for p in sig.parameters.values()]
        own = [p for p in own if p.name not in specs]
        added: list[inspect.Parameter] = []
        parsers: dict[str, tuple[str, str, Callable[[Any], Any]]] = {}
        for group, spec in specs.items():
            field_hints = typing.get_type_hints(spec.cls)
            panel = f"{spec.cls.section or 'run'} settings"
            for f in dataclasses.fields(spec.cls):
                if not spec.offers(f):
                    continue
                kind, parse = f.metadata.get("cli") or (field_hints[f.name], _same)
                if kind is Any:
                    kind = Path | None
                flags = f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",)
                option = typer.Option(*flags, help=f.metadata["help"], rich_help_panel=panel)
                name = f"{group}__{f.name}"
                default = spec.defaults.get(f.name, f.default)
                added.append(
                    inspect.Parameter(
                        name,
                        inspect.Parameter.KEYWORD_ONLY,
                        default=default,
                        annotation=Annotated[kind, option],
                    )
                )
                parsers[name] = (group, f.name, parse)

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            values: dict[str, dict[str, Any]] = {g: {} for g in specs}
            for name, (group, field_name, parse) in parsers.items():
                value = kwargs.pop(name)
                values[group][field_name] = None if value is None else parse(value)
            built = {g: specs[g].cls(**v) for g, v in values.items()}
            return command(**kwargs, **built)

        keyword = inspect.Parameter.KEYWORD_ONLY
        last = [p.replace(kind=keyword) for p in own if p.name == "as_json"]
        params = [p.replace(kind=keyword) for p in own if p.name != "as_json"]
        ordered = [*params, *added, *last]
        run.__signature__ = sig.replace(parameters=ordered)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in ordered}
        del run.__wrapped__  # typer reads the signature above, not the command's
        return run

    return decorate


def _same(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value
