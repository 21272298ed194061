"""The `headstart` command line: demo, embed, train, run, search, predict, info, serve."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

# Keep this module light: `--help` and bad-input errors should not wait for torch to import.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline-friendly

from extractors import DEFAULT_BACKBONE
from flows import DEFAULT_WORKSPACE


def user_errors() -> tuple[type[Exception], ...]:
    from extractors.backbones import BackboneError
    from extractors.images import ImageError
    from extractors.sources import SourceError
    from extractors.store import StoreError
    from heads.persist import HeadFileError
    from heads.train import TrainingDataError

    return (SourceError, StoreError, BackboneError, TrainingDataError, HeadFileError, ImageError)


app = typer.Typer(
    help=(
        "headstart: transfer learning for images. Embed images with a frozen pretrained CNN "
        "into Parquet + FAISS, train scikit-learn heads on them, track everything in MLflow, "
        "orchestrated by Prefect. Start with `headstart demo`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

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
BackboneOpt = Annotated[
    str | None,
    typer.Option(
        help=f"Backbone: {DEFAULT_BACKBONE} (offline default), torchvision:<model> "
        "(e.g. torchvision:resnet50) or timm:<model> (e.g. timm:convnext_tiny.fb_in1k)."
    ),
]
WeightsOpt = Annotated[
    Path | None, typer.Option(help="Local weights file for the backbone instead of a download.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
LayersOpt = Annotated[
    str | None,
    typer.Option(
        help="Also save pooled features of these layers as extra columns, comma-separated: "
        "stage indices (-1 = last stage, -2 = the one before) or module names, e.g. "
        "--layers=-2,-1. Heads then pick the best column on validation. Default: the "
        "store's own (none for a new store)."
    ),
]


def _fail_or_raise(exc: Exception) -> None:
    """Bad input: one red line and exit code 2. Anything else is a bug: re-raise it."""
    if not isinstance(exc, user_errors()):
        raise exc
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _heads_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in ("head", "chosen", "val acc", "test acc", "bal. acc", "macro-F1", "top-5"):
        table.add_column(col, justify="left" if col in ("head", "chosen") else "right")
    for r in rows:
        top5 = f"{r['top5_accuracy']:.3f}" if "top5_accuracy" in r else "-"
        chosen = ", ".join(
            f"{k}={v:g}" if isinstance(v, float | int) else f"{k}={v}"
            for k, v in r["params"].items()
        )
        table.add_row(
            r["head"],
            chosen,
            f"{r['val_accuracy']:.3f}",
            f"{r['accuracy']:.3f}",
            f"{r['balanced_accuracy']:.3f}",
            f"{r['macro_f1']:.3f}",
            top5,
        )
    return table


def _print_embed(report: dict[str, Any]) -> None:
    out.print(
        f"store [bold]{report['store']}[/]: {report['rows']} images "
        f"({report['embedded']} embedded now, {report['kept']} unchanged, "
        f"{report['removed']} removed, {report['failed']} failed) with {report['backbone']}"
    )
    if report.get("resumed"):
        out.print(f"  resumed: {report['resumed']} images reused from an interrupted run")
    stats = report.get("stats") or {}
    if report["embedded"] and stats:
        out.print(
            f"  {stats['images_per_s']:.1f} images/s; ms per image: decode "
            f"{stats['decode_ms_per_image']:.1f} (summed over threads), model "
            f"{stats['model_ms_per_image']:.1f}, write {stats['write_ms_per_image']:.1f}"
        )
    for path, reason in report["failures"][:10]:
        out.print(f"  [yellow]skipped[/] {path}: {reason}", highlight=False)
    if report["failed"] > 10:
        out.print(f"  ... and {report['failed'] - 10} more: see `headstart info`")


def _print_pipeline(result: dict[str, Any], workspace: Path) -> None:
    from flows import steps, tracking  # noqa: F401  (lazy: heavy imports)

    _print_embed(result["embed"])
    out.print(
        _heads_table(
            result["heads"],
            f"heads on {result['embed']['source_name']} (test split, best by validation first)",
        )
    )
    d = result["decision"]
    verdict = "[yellow]escalate to fine-tuning[/]" if d["escalate"] else "[green]no escalation[/]"
    out.print(f"decision: {verdict}: {d['reason']}")
    out.print(
        f"MLflow: experiment [bold]{result['experiment']}[/], run {result['run_id']}, "
        f"store {tracking.tracking_uri(workspace)}"
    )
    out.print(f"open the MLflow UI: [bold]{tracking.ui_command(workspace)}[/]")


@app.command()
def demo(
    workspace: Workspace = DEFAULT_WORKSPACE,
    per_class: Annotated[int, typer.Option(help="Sample images per digit class.")] = 40,
    backbone: BackboneOpt = None,
    target: Annotated[
        float, typer.Option(help="Validation accuracy the best head must reach.")
    ] = 0.9,
) -> None:
    """Run the whole pipeline offline on bundled sample data (handwritten digits, 10 classes)."""
    from flows.pipeline import pipeline
    from flows.sample_data import materialise_digits

    try:
        root = materialise_digits(workspace / "sample" / "digits", per_class=per_class)
        out.print(f"sample data: {root} (10 classes x {per_class} images)")
        result = pipeline(str(root), backbone=backbone, workspace=str(workspace), target=target)
    except Exception as exc:
        _fail_or_raise(exc)
    _print_pipeline(result, workspace)
    example = next(root.glob("3/*.png"))
    out.print(f"search by image: [bold]uv run headstart search {example} -k 5[/]")


@app.command()
def embed(
    source: Annotated[
        Path,
        typer.Argument(
            help="Folder (one sub-folder per class, or "
            "unlabelled images) or a CSV/Parquet manifest "
            "with path,label[,split]."
        ),
    ],
    store: StoreOpt = None,
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    workers: Annotated[
        int | None,
        typer.Option(help="Decode threads, working ahead of the model (default: cores, 2-16)."),
    ] = None,
    layers: LayersOpt = None,
    fast_decode: Annotated[
        bool,
        typer.Option(
            help="Decode large JPEGs at 1/2, 1/4 or 1/8 scale (never below the size the model "
            "resizes to); --no-fast-decode decodes every pixel first."
        ),
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed of the stratified train/val/test split.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Embed new or changed images of SOURCE into the store and refresh its FAISS index.

    Safe to interrupt: finished batches are kept in the store's staging/ folder and a re-run
    continues from them. Files that cannot be embedded are listed in failures.parquet with a
    reason (`headstart info`). Counts and images/s per stage go to an MLflow run.
    """
    from flows import steps, tracking  # noqa: F401  (lazy: heavy imports)
    from flows.pipeline import embed as embed_flow

    try:
        steps.preflight(source, store, backbone, workspace, need_labels=False)
        report = embed_flow(
            str(source),
            store=_s(store),
            backbone=backbone,
            weights=_s(weights),
            workspace=str(workspace),
            batch_size=batch_size,
            num_workers=workers,
            seed=seed,
            progress=not as_json,
            layers=_layers(layers),
            fast_decode=fast_decode,
        )
    except Exception as exc:
        _fail_or_raise(exc)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_embed(report)


@app.command()
def train(
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    experiment: Annotated[
        str | None, typer.Option(help="MLflow experiment (default: the source's name).")
    ] = None,
    heads: Annotated[
        list[str] | None,
        typer.Option("--head", help="Head to train (repeatable): logreg, svm, knn."),
    ] = None,
    seed: int = 0,
    as_json: JsonOpt = False,
) -> None:
    """Train logistic-regression, SVM and k-NN heads on a store, tracked in MLflow."""
    from flows import steps, tracking
    from flows.pipeline import train_heads

    try:
        st = steps.resolve_store(store, workspace)
        steps.check_trainable(st)
        result = train_heads(
            str(st.path), experiment=experiment, heads=heads, workspace=str(workspace), seed=seed
        )
    except Exception as exc:
        _fail_or_raise(exc)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    out.print(_heads_table(result["heads"], f"heads on {st.path.name}"))
    out.print(
        f"MLflow: experiment {result['experiment']}, run {result['run_id']}; "
        f"UI: {tracking.ui_command(workspace)}"
    )


@app.command()
def run(
    source: Annotated[Path, typer.Argument(help="Labelled folder or manifest (see `embed`).")],
    store: StoreOpt = None,
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment.")] = None,
    target: Annotated[
        float,
        typer.Option(help="Validation accuracy below which the run escalates to fine-tuning."),
    ] = 0.9,
    finetune: Annotated[bool, typer.Option(help="Escalate to fine-tuning regardless.")] = False,
    batch_size: int = 32,
    layers: LayersOpt = None,
    seed: int = 0,
    as_json: JsonOpt = False,
) -> None:
    """The whole pipeline on SOURCE: embed, train heads, decide on escalation, track it all."""
    from flows import steps, tracking  # noqa: F401  (lazy: heavy imports)
    from flows.pipeline import pipeline

    try:
        steps.preflight(source, store, backbone, workspace, need_labels=True)
        result = pipeline(
            str(source),
            store=_s(store),
            backbone=backbone,
            weights=_s(weights),
            experiment=experiment,
            target=target,
            finetune=finetune,
            workspace=str(workspace),
            batch_size=batch_size,
            seed=seed,
            progress=not as_json,
            layers=_layers(layers),
        )
    except Exception as exc:
        _fail_or_raise(exc)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_pipeline(result, workspace)


@app.command()
def search(
    image: Annotated[Path, typer.Argument(help="Query image.")],
    k: Annotated[int, typer.Option("-k", help="Number of neighbours.")] = 5,
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: JsonOpt = False,
) -> None:
    """Find the images in a store most similar to IMAGE (cosine similarity of embeddings)."""
    from flows import steps, tracking  # noqa: F401  (lazy: heavy imports)

    try:
        hits = steps.search_image(image, store=store, k=k, workspace=workspace)
    except Exception as exc:
        _fail_or_raise(exc)
    if as_json:
        print(json.dumps(hits, indent=2))
        return
    table = Table(title=f"nearest to {image}")
    for col in ("rank", "score", "label", "split", "id", "path"):
        table.add_column(col)
    for n, h in enumerate(hits, 1):
        table.add_row(
            str(n), f"{h['score']:.4f}", str(h["label"]), h["split"], str(h["id"]), h["path"]
        )
    out.print(table)


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Images to label.")],
    head: Annotated[
        Path | None,
        typer.Option(
            help="A saved head (.skops); default: the best head of the store's latest run."
        ),
    ] = None,
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    top: Annotated[int, typer.Option(help="Classes to show per image.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Label new images with a trained head, with class probabilities."""
    from flows import steps, tracking  # noqa: F401  (lazy: heavy imports)

    try:
        preds = steps.predict_images(images, head=head, store=store, workspace=workspace, top=top)
    except Exception as exc:
        _fail_or_raise(exc)
    if as_json:
        print(json.dumps(preds, indent=2))
        return
    table = Table(title="predictions")
    for col in ("image", "label", "top classes"):
        table.add_column(col)
    for p in preds:
        if "error" in p:
            table.add_row(p["image"], "[red]error[/]", p["error"])
        else:
            tops = ", ".join(f"{t['label']} {t['score']:.3f}" for t in p["top"])
            table.add_row(p["image"], p["label"], tops)
    out.print(table)


@app.command()
def info(
    store: StoreOpt = None, workspace: Workspace = DEFAULT_WORKSPACE, as_json: JsonOpt = False
) -> None:
    """Show what a store holds: backbone, rows, splits, classes, failures, index, heads."""
    from flows import steps, tracking  # noqa: F401  (lazy: heavy imports)

    try:
        data = steps.store_info(store, workspace)
    except Exception as exc:
        _fail_or_raise(exc)
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    table = Table(title=f"store {data['store']}", show_header=False)
    for key in (
        "backbone",
        "weights",
        "dim",
        "rows",
        "labelled_rows",
        "splits",
        "classes",
        "failures",
        "fingerprint",
        "index",
        "index_consistent",
        "created",
        "updated",
    ):
        table.add_row(key, str(data.get(key)))
    table.add_row("source", f"{data['source']['root']} ({data['source']['kind']})")
    if "heads" in data:
        table.add_row("best head", f"{data['heads']['best']} ({data['heads']['best_path']})")
    out.print(table)
    for f in data["failures_table"][:20]:
        out.print(f"  [yellow]failed[/] {f['path']}: {f['reason']}", highlight=False)


@app.command()
def serve(
    source: Annotated[Path, typer.Argument(help="Folder or manifest to re-process.")],
    cron: Annotated[str, typer.Option(help="Cron schedule (default: hourly).")] = "0 * * * *",
    name: Annotated[str | None, typer.Option(help="Deployment name.")] = None,
    store: StoreOpt = None,
    backbone: BackboneOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment.")] = None,
    target: float = 0.9,
) -> None:
    """Serve the pipeline as a Prefect deployment on a cron schedule (only new images embed)."""
    from prefect import serve as prefect_serve

    from flows import steps, tracking  # noqa: F401  (lazy: heavy imports)
    from flows.pipeline import pipeline

    try:
        steps.preflight(source, store, backbone, workspace, need_labels=True)
    except Exception as exc:
        _fail_or_raise(exc)
    params = {
        "source": str(source.resolve()),
        "store": _s(store and store.resolve()),
        "backbone": backbone,
        "experiment": experiment,
        "target": target,
        "workspace": str(workspace.resolve()),
        "progress": False,
    }
    dep_name = name or f"pipeline-{source.resolve().name}"
    deployment = pipeline.to_deployment(name=dep_name, cron=cron, parameters=params)
    out.print(f"serving deployment [bold]pipeline/{dep_name}[/] on '{cron}'; Ctrl-C stops it")
    prefect_serve(deployment)


def _s(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _layers(spec: str | None) -> list[str] | None:
    return None if spec is None else [x.strip() for x in spec.split(",") if x.strip()]


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
