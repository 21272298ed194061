"""Options shared by the commands, declared once: the locations (workspace, store), --json, and
every settings field as an option of its own (`with_settings`), with the default, help text
and check of its settings class (extractors/settings.py, heads/settings.py, flows/settings.py).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from extractors.settings import Settings
from flows.settings import PipelineSettings

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
WideOpt = Annotated[
    bool,
    typer.Option(
        "--wide",
        help="Show every column of the tables, whatever the terminal's width (a narrow one "
        "leaves some out and names them under the table; --json has everything).",
    ),
]
Experiment = Annotated[
    str | None, typer.Option(help="MLflow experiment (default: the source's name).")
]


@dataclasses.dataclass(frozen=True)
class Group:
    """One settings object a command takes: its class; the fields it offers as options (`only`,
    default all) or leaves out (`skip`), as dotted paths (`finetune.seed`; a stage's name
    stands for all its fields); the defaults it changes; and `link`, fields set from another
    (`{"finetune.seed": "embed.seed"}`: one --seed for both)."""

    cls: type[Settings]
    skip: frozenset[str] = frozenset()
    only: frozenset[str] | None = None
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    link: dict[str, str] = dataclasses.field(default_factory=dict)

    def offers(self, path: str) -> bool:
        def within(paths: frozenset[str]) -> bool:
            return any(path == p or path.startswith(f"{p}.") for p in paths)

        return not within(self.skip) and (self.only is None or within(self.only))


@dataclasses.dataclass(frozen=True)
class _Option:
    group: str
    path: tuple[str, ...]  # field names from the group's class down
    parse: Callable[[Any], Any]


def _fields(cls: type[Settings], prefix: tuple[str, ...] = ()):
    """(path, field, its type, the class declaring it) of every settings field, stages'
    fields included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if isinstance(kind, type) and issubclass(kind, Settings):
            yield from _fields(kind, (*prefix, f.name))
        elif "help" in f.metadata:
            yield (*prefix, f.name), f, kind, cls


def with_settings(**groups: type[Settings] | Group) -> Callable[[Callable], Callable]:
    """Give a command one option per field of each settings class (a stage's fields too); the
    command receives the built objects as the keyword arguments named here (a bad value: one
    line, exit 2)."""
    specs = {k: g if isinstance(g, Group) else Group(g) for k, g in groups.items()}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        sig, hints = inspect.signature(command), typing.get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints[p.name]) for p in sig.parameters.values()]
        own = [p for p in own if p.name not in specs]
        added: list[inspect.Parameter] = []
        options: dict[str, _Option] = {}
        for group, spec in specs.items():
            for path, f, kind, owner in _fields(spec.cls):
                dotted = ".".join(path)
                if not spec.offers(dotted):
                    continue
                kind, parse = f.metadata.get("cli") or (kind, _same)
                flags = f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",)
                panel = f"{owner.section or 'run'} settings"
                option = typer.Option(*flags, help=f.metadata["help"], rich_help_panel=panel)
                name = "__".join((group, *path))
                added.append(
                    inspect.Parameter(
                        name,
                        inspect.Parameter.KEYWORD_ONLY,
                        default=spec.defaults.get(dotted, f.default),
                        annotation=Annotated[Path | None if kind is Any else kind, option],
                    )
                )
                options[name] = _Option(group, path, parse)

        def run(**kwargs: Any) -> Any:
            values: dict[str, dict[str, Any]] = {g: {} for g in specs}
            for name, opt in options.items():
                value = kwargs.pop(name)
                _put(values[opt.group], opt.path, None if value is None else opt.parse(value))
            for group, spec in specs.items():
                for target, source in spec.link.items():
                    _put(values[group], tuple(target.split(".")), _get(values[group], source))
            built = {g: specs[g].cls.from_dict(v) for g, v in values.items()}
            return command(**kwargs, **built)

        keyword = inspect.Parameter.KEYWORD_ONLY
        last = [p.replace(kind=keyword) for p in own if p.name == "as_json"]
        params = [p.replace(kind=keyword) for p in own if p.name != "as_json"]
        ordered = [*params, *added, *last]
        # What typer reads to make the options: the command's own name, help and parameters,
        # then one keyword parameter per settings field (inspect.signature honours
        # __signature__, the documented way to state a callable's parameters).
        run.__name__, run.__qualname__ = command.__name__, command.__qualname__
        run.__doc__, run.__module__ = command.__doc__, command.__module__
        run.__signature__ = sig.replace(parameters=ordered)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in ordered}
        return run

    return decorate


def _put(values: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        values = values.setdefault(key, {})
    values[path[-1]] = value


def _get(values: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        values = values[key]
    return values


# Every setting of a pipeline run, for `run` and `serve`; one --seed for the split, the heads
# and fine-tuning.
RUN = Group(
    PipelineSettings,
    skip=frozenset(
        {"finetune.seed", "embed.backbone", "embed.split_from"}
    ),  # --backbone: backbones
    link={"finetune.seed": "embed.seed"},
)


def _same(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value
