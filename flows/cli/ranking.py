"""The `rank` command: candidate networks (and their `--layers` columns) ranked on a labelled
source by transferability estimates, in seconds, before any head is trained."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from extractors import DEFAULT_WORKSPACE
from extractors.settings import EmbedSettings
from flows.cli.app import app
from flows.cli.options import Group, JsonOpt, Workspace, with_settings
from flows.cli.render import DataTable, show


@app.command()
@with_settings(embedding=Group(EmbedSettings, skip=frozenset({"backbone", "weights"})))
def rank(
    source: Annotated[
        str,
        typer.Argument(
            help="Labelled folder (one sub-folder per class) or CSV/Parquet manifest with "
            "path,label[,split][,group]."
        ),
    ],
    backbones: Annotated[
        list[str],
        typer.Option(
            "--backbone",
            help="A candidate network; repeat it: efficientnet_lite0, efficientnet_lite1, "
            "efficientnet_lite2 (offline), `finetuned:<id>`, `timm:<model>`, "
            "`torchvision:<model>`.",
        ),
    ],
    embedding: EmbedSettings,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: JsonOpt = False,
) -> None:
    """Rank candidate networks for SOURCE before training: best LogME first.

    Each --backbone embeds SOURCE into its own store (the one `embed` and `run` use, so the
    work is kept), and each of its feature columns (the penultimate embedding, and every
    --layers column) is scored from the train split by LogME (You et al., ICML 2021: the
    evidence of a Bayesian linear model on the features) and the shrunk H-score (Bao et al.,
    2019). Higher is better for both. The scores and seconds go to one MLflow run.
    """
    from flows.steps.ranking import log_ranking, rank_backbones
    from flows.tracking.store import check

    check(workspace)
    ranking = rank_backbones(
        source, backbones, embedding=embedding, workspace=workspace, progress=not as_json
    )
    ranking["run_id"] = log_ranking(ranking, workspace)
    if as_json:
        print(json.dumps(ranking, indent=2))
    else:
        show(_table(ranking))


def _table(ranking: dict[str, Any]) -> DataTable:
    """The candidates, best first: network, feature column, scores and seconds; on a narrow
    terminal the dimension and the seconds give way, never the names."""
    table = DataTable(
        title=f"{ranking['source_name']}: {len(ranking['candidates'])} candidates on "
        f"{ranking['train_images']} train images, best LogME first (MLflow run "
        f"{ranking['run_id']})",
        more="--json adds: {names}",
    )
    table.add_column("network", no_wrap=True)
    table.add_column("features", no_wrap=True)
    table.add_column("LogME", justify="right", no_wrap=True)
    table.add_column("H-score", justify="right", no_wrap=True)
    table.add_column("score s", justify="right", no_wrap=True, spare=1)
    table.add_column("embed s", justify="right", no_wrap=True, spare=2)
    table.add_column("dim", justify="right", no_wrap=True, spare=3)
    for c in ranking["candidates"]:
        table.add_row(
            c["backbone"],
            c["feature"],
            f"{c['logme']:.4f}",
            f"{c['h_score']:.3f}",
            f"{c['score_s']:.2f}",
            f"{c['embed_s']:.1f}",
            str(c["dim"]),
        )
    return table
