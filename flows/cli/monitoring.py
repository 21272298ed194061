"""`headstart monitor`: the drift history of scoring runs, newest first, as a table and a plot
(each batch's out-of-distribution share and embedding-drift AUC over time, alarms marked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from extractors import DEFAULT_WORKSPACE
from flows.cli.app import app, out
from flows.cli.options import JsonOpt, WideOpt, Workspace
from flows.cli.render import DataTable, num, show, when


@app.command()
def monitor(
    experiment: Annotated[
        str | None, typer.Option(help="Only this MLflow experiment (default: all).")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Also write the history as a PNG plot to this file."),
    ] = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    wide: WideOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Every scoring batch's drift figures, newest first: the share of images out of
    distribution, the embedding two-sample test, the shift of predicted classes, and whether
    it alarmed (and why). Recorded by `score` and the scheduled scoring."""
    from flows.tracking.store import check

    check(workspace, write=False)
    from flows.tracking.monitoring import history

    rows = history(workspace, experiment)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        out.print("no scoring batches monitored yet: `headstart score SOURCE` records them")
        return
    table = DataTable(title="scoring batches, newest first", wide=wide)
    for col, spare in (("at", 0), ("experiment", 2), ("images", 0), ("ood", 0)):
        table.add_column(col, no_wrap=True, spare=spare)
    for col, spare in (("drift AUC", 0), ("drift p", 1), ("class TV", 3), ("alarm", 0)):
        table.add_column(col, justify="right", no_wrap=True, spare=spare)
    for r in rows:
        alarm = Text("ALARM", style="bold red") if r["alarm"] else Text("no", style="green")
        table.add_row(
            when(r["at"]),
            r["experiment"],
            f"{r.get('images', 0):.0f}",
            f"{r.get('ood.share', 0):.1%}",
            num(r.get("embedding_drift.auc")),
            num(r.get("embedding_drift.p_value")),
            num(r.get("prediction_drift.total_variation")),
            alarm,
        )
    show(table)
    for r in rows[:1]:
        if r["alarm"]:
            out.print(Text(f"newest alarm: {r['reasons']}", style="red"))
    if plot is not None:
        from heads.plots import history_png

        history_png(rows, plot)
        out.print(Text(f"plot: {plot}"))
