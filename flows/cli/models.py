"""Commands of the model registry: `promote` and `rollback` (the champion, when a person
decides otherwise than the rule of flows/tracking/champion.py) and `champion` (who holds it,
and why)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.text import Text

from extractors import DEFAULT_WORKSPACE
from flows.cli.app import app, out
from flows.cli.options import JsonOpt, WideOpt, Workspace
from flows.cli.render import DataTable, show, when

ModelName = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Registered image model, `<experiment>-image` (default: the one trained last).",
    ),
]


def _name(model: str | None, workspace, write: bool) -> str:
    """The model to act on, once the tracking store answers (checked before the imports of
    the model code: a store that is down fails fast)."""
    from flows.tracking.store import check

    check(workspace, write=write)
    from flows.tracking.image_model import latest_image_model

    return model or latest_image_model(workspace, write)


@app.command()
def promote(
    version: Annotated[int, typer.Argument(help="The version to make champion.", min=1)],
    model: ModelName = None,
    reason: Annotated[str, typer.Option(help="Why, recorded with the decision.")] = "",
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: JsonOpt = False,
) -> None:
    """Make VERSION the champion that `predict --model models:/<name>@champion` and the
    scheduled `score` deployment use; recorded in the registry with your reason."""
    from flows.tracking import champion

    decision = champion.promote(_name(model, workspace, True), version, workspace, reason)
    _show(decision, as_json)


@app.command()
def rollback(
    model: ModelName = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: JsonOpt = False,
) -> None:
    """Give the champion back to the version that held it before; recorded."""
    from flows.tracking import champion

    _show(champion.rollback(_name(model, workspace, True), workspace), as_json)


@app.command(name="champion")
def champion_cmd(
    model: ModelName = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    wide: WideOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Which version is champion, and every decision that moved it or kept it (times in local
    time; --json has the UTC stamps)."""
    from flows.tracking import champion

    name = _name(model, workspace, False)
    entries = champion.history(name, workspace)
    now = champion.current(name, workspace)
    if as_json:
        print(json.dumps({"name": name, "champion": now, "history": entries}, indent=2))
        return
    out.print(Text(f"{name}: champion version {now}", style="bold"))
    table = DataTable(title=f"decisions on {name}, oldest first", wide=wide)
    table.add_column("at", no_wrap=True)
    table.add_column("version", justify="right", no_wrap=True)
    table.add_column("decision", no_wrap=True)
    table.add_column("by", no_wrap=True, spare=1)
    table.add_column("reason")  # prose: wraps between words
    for e in entries:
        verdict = "champion" if e["promoted"] else "kept out"
        table.add_row(when(e["at"]), str(e["version"]), verdict, e["by"], e["reason"])
    show(table)


def _show(decision, as_json: bool) -> None:
    if as_json:
        print(json.dumps(decision.as_dict(), indent=2))
    else:
        out.print(Text(decision.line(), style="bold"))
