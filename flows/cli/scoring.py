"""Commands that label images with a model: `predict` (files, a folder or a manifest, to
the screen or a table) and `score` (the new or changed images of a source, appended to a
predictions table, as the scheduled scoring does)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from extractors import DEFAULT_WORKSPACE
from extractors.common import plural
from extractors.settings import EmbedSettings, MonitorSettings
from flows.cli.app import app, out
from flows.cli.options import Group, JsonOpt, StoreOpt, Workspace, with_settings
from flows.cli.render import DataTable

if TYPE_CHECKING:
    from heads.scoring.runner import ScoreReport


# What of the monitor `predict --out` uses: the per-image OOD columns, not the batch tests.
PER_IMAGE = frozenset({"ood_k", "ood_level"})


@app.command()
@with_settings(
    embedding=Group(EmbedSettings, only=frozenset({"batch_size", "decode_threads", "device"})),
    monitor=Group(MonitorSettings, only=PER_IMAGE),
)
def predict(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Image files, or one folder (any depth; one sub-folder per class gives each "
            "row its label) or a CSV/Parquet manifest with path[,label]."
        ),
    ],
    embedding: EmbedSettings,
    monitor: MonitorSettings,
    out_file: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Write every image's prediction to this .parquet or .csv file: path, "
            "prediction, probability, model, error and proba_CLASS for each class. "
            "Resumable: run again after an interruption. Without it, a table is printed.",
        ),
    ] = None,
    head: Annotated[
        Path | None,
        typer.Option(
            help="A saved head (.skops); default: the best head of the store's latest run."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Instead of a head: a fine-tuned network, `finetuned:<id>`, or a registered "
            "image model, `models:/<name>@champion` or `models:/<name>/<version>`."
        ),
    ] = None,
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    top: Annotated[int, typer.Option(min=1, help="Classes to show per image.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Label images with a trained head, a fine-tuned network or a registered model.

    With --out, a whole folder or manifest is scored into a table, one row per image (files
    that cannot be read are rows with an `error`, never dropped). Embeddings the store
    already holds for the same content are reused, the rest are embedded.
    """
    if out_file is None:
        from flows.steps.scoring import predict_images

        preds = predict_images(
            sources,
            head=head,
            store=store,
            workspace=workspace,
            top=top,
            model=model,
            device=embedding.device,
        )
        _print_predictions(preds, as_json)
        return
    from flows.steps.scoring import predict_to_file

    report = predict_to_file(
        sources,
        out_file,
        model=model,
        head=head,
        store=store,
        workspace=workspace,
        embedding=embedding,
        progress=not as_json,
        monitor=monitor,
    )
    _print_report(report, as_json)


@app.command()
@with_settings(
    embedding=Group(EmbedSettings, only=frozenset({"batch_size", "decode_threads", "device"})),
    monitor=MonitorSettings,
)
def score(
    source: Annotated[
        str, typer.Argument(help="Folder (any depth), bucket prefix or CSV/Parquet manifest.")
    ],
    embedding: EmbedSettings,
    monitor: MonitorSettings,
    predictions: Annotated[
        Path | None,
        typer.Option(
            help="Predictions folder the new rows are appended to, as part-NNNNNN.parquet "
            "(default: WORKSPACE/predictions/EXPERIMENT)."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model to score with (default: models:/EXPERIMENT-image@champion; without "
            "--experiment, the champion a bare `predict` uses: that of the latest store with "
            "heads, or of --store)."
        ),
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option(help="MLflow experiment whose champion scores and where the batch is logged."),
    ] = None,
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: JsonOpt = False,
) -> None:
    """Score the images of SOURCE not scored yet (new, or changed since) with the champion
    (the same model as a bare `predict`, said in one line), and append them to a predictions
    table: what the scheduled `kind = "score"` deployment runs. Nothing new, nothing written."""
    from flows import runs

    report = runs.for_cli(runs.score, workspace)(
        str(source),
        predictions=None if predictions is None else str(predictions),
        model=model,
        experiment=experiment,
        store=None if store is None else str(store),
        workspace=str(workspace),
        embedding=embedding,
        progress=not as_json,
        monitor=monitor,
    )
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    elif report["nothing_new"]:
        out.print(Text(f"nothing new: all {plural(report['unchanged'], 'file')} scored before"))
    else:
        out.print(
            Text(
                f"{plural(report['rows'], 'new or changed file')} scored with {report['model']} "
                f"-> {report['part']} ({plural(report['errors'], 'error')}; the table holds "
                f"{plural(report['total_rows'], 'row')})"
            )
        )
        if report.get("monitor"):
            _print_monitor(report["monitor"])


def _print_monitor(watched: dict) -> None:
    """The batch's drift verdict in one line, its reasons, and the most unusual images."""
    ood = watched.get("ood") or {}
    line = (
        f"monitor: {plural(ood.get('flagged', 0), 'image')} out of distribution "
        f"({ood.get('share', 0):.1%}, level {ood.get('level', 0):g}); embedding drift p = "
        f"{watched['embedding_drift']['p_value']:.2g}, AUC {watched['embedding_drift']['auc']:.2f}"
    )
    style = "bold red" if watched["alarm"] else "green"
    out.print(Text(("ALARM: " if watched["alarm"] else "no alarm: ") + line, style=style))
    for reason in watched["reasons"]:
        out.print(Text(f"  {reason}"))
    for f in watched.get("flagged", [])[:5]:
        out.print(Text(f"  unusual: {f['path']} (ood_score {f['ood_score']:.3f})"))


def _print_predictions(preds: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(preds, indent=2))
        return
    table = DataTable(title="predictions")
    for col in ("image", "label", "top classes"):
        table.add_column(col)
    for p in preds:
        if "error" in p:
            table.add_row(p["image"], Text("error", style="red"), p["error"])
        else:
            tops = ", ".join(f"{t['label']} {t['score']:.3f}" for t in p["top"])
            table.add_row(p["image"], p["label"], tops)
    out.print(table)


def _print_report(report: ScoreReport, as_json: bool) -> None:
    """What `predict --out` wrote: counts, where from, the first errors."""
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        return
    out.print(
        Text(
            f"{plural(report.rows, 'row')} -> {report.out} (model {report.model}): "
            f"{report.scored} scored ({report.reused} embeddings reused from a store, "
            f"{report.embedded} embedded, {report.resumed} from an interrupted run), "
            f"{plural(report.duplicates, 'duplicate')}, "
            f"{plural(report.errors, 'error')}; {report.seconds:.1f} s"
        )
    )
    for path, why in list(report.errors_by_path.items())[:5]:
        out.print(Text(f"  error: {path}: {why}", style="red"))
