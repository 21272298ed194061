"""The `headstart` command line: demo, embed, train, run, finetune, compare, search, predict,
dedup, info, serve."""

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
    from flows.deployments import DeploymentError
    from flows.engine import EngineError
    from flows.runs import OrchestrationError
    from flows.tracking import ExperimentNotFound
    from heads.finetune import FineTuneError
    from heads.persist import HeadFileError
    from heads.train import TrainingDataError

    return (
        SourceError,
        StoreError,
        BackboneError,
        TrainingDataError,
        HeadFileError,
        ImageError,
        FineTuneError,
        ExperimentNotFound,
        DeploymentError,
        EngineError,
        OrchestrationError,
    )


app = typer.Typer(
    help=(
        "headstart: transfer learning for images. Embed images with a frozen pretrained CNN "
        "into Parquet + FAISS, train scikit-learn heads on them, track everything in MLflow, "
        "orchestrated by Prefect. Start with `headstart demo`."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal's width
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
        help=f"Backbone: {DEFAULT_BACKBONE} (offline default), `torchvision:<model>` "
        "(e.g. torchvision:resnet50) or `timm:<model>` (e.g. timm:convnext_tiny.fb_in1k)."
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

# Fine-tuning settings, shared by `run`, `finetune` and `demo` (see heads/finetune.py).
MaxMemory = Annotated[
    str | None,
    typer.Option(
        help="Memory budget of the search index, e.g. 512MB or 8GB (default: the store's, "
        "else 4GB). It picks the index: exact below 20,000 images, HNSW when it fits, "
        "else IVF, else IVF-PQ codes with exact re-ranking from disk."
    ),
]
Recall = Annotated[
    float | None,
    typer.Option(
        help="Recall@10 the index is tuned to, measured against exact search on held-out "
        "queries (default: the store's, else 0.95)."
    ),
]
IndexKind = Annotated[
    str | None,
    typer.Option(
        "--index", help="Force an index kind: auto (default), flat, hnsw, ivf_flat or ivf_pq."
    ),
]

EngineOpt = Annotated[
    str,
    typer.Option(
        help="local (this process) or dask: shard the new images over a Dask cluster, a local "
        "one of --engine-workers processes unless --address names a scheduler. Workers write "
        "their own staging parts; the commit and the index are built here after."
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        help="Dask scheduler to join (tcp://host:8786) with --engine dask. Its workers must "
        "see the images and the store at the same paths."
    ),
]
CompileOpt = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="Run the network as an ahead-of-time compiled package (weights frozen, ops "
        "fused: about 1.5x the model on CPU). By default it is used when an earlier run built "
        "it, and built when the job is large enough to repay the ~30 s it takes (3,000 "
        "images on CPU); --compile builds it now, --no-compile never uses it. Needs a C++ "
        "compiler; where compiling fails the run warns and goes on as usual.",
    ),
]
EngineWorkers = Annotated[
    int | None,
    typer.Option(help="Worker processes of the local Dask cluster (default: one per GPU, else 2)."),
]


def _index_settings(
    max_memory: str | None, recall: float | None, kind: str | None
) -> dict[str, Any] | None:
    from extractors.index import KINDS, parse_bytes

    if recall is not None and not 0 < recall <= 1:
        raise typer.BadParameter(f"--recall must be in (0, 1], not {recall}")
    if kind is not None and kind not in ("auto", *KINDS):
        raise typer.BadParameter(f"--index must be auto or one of {', '.join(KINDS)}")
    if max_memory is not None:
        try:
            parse_bytes(max_memory)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    given = {"max_memory": max_memory, "recall": recall, "kind": kind}
    return {k: v for k, v in given.items() if v is not None} or None


def _index_line(entry: dict[str, Any], prefix: str = "index ") -> str:
    from extractors.index import human_bytes

    t, choice = entry.get("tuning", {}), entry.get("choice", {})
    params = ", ".join(f"{k}={v}" for k, v in t.get("params", {}).items()) or "exact"
    miss = "" if t.get("reached", True) else f" [red](target {t.get('target')} not reached)[/]"
    return (
        f"{prefix}[bold]{entry.get('type')}[/] ({choice.get('reason', 'exact')}); {params}; "
        f"recall@10 {t.get('recall', 1.0):.3f}{miss}; {human_bytes(entry.get('file_bytes', 0))}"
    )


Strategy = Annotated[
    str,
    typer.Option(
        help="head: only a new linear layer trains; partial: also the top --blocks groups of "
        "layers; full: every layer (lower learning rates deeper down)."
    ),
]
Blocks = Annotated[int, typer.Option(help="With --strategy partial: layer groups that train.")]
Epochs = Annotated[int, typer.Option(help="Most epochs (early stopping on validation).")]
ImageSize = Annotated[
    int | None,
    typer.Option(
        help="Input size for fine-tuning (default: the backbone's own on a GPU, at most 128 "
        "px on a CPU)."
    ),
]
BackboneLr = Annotated[
    float, typer.Option(help="Learning rate of the top pretrained layers (x0.8 per group below).")
]
HeadLr = Annotated[float, typer.Option(help="Learning rate of the new classifier layer.")]
Bn = Annotated[str, typer.Option(help="BatchNorm: frozen (keep pretrained statistics) or train.")]
Gradual = Annotated[bool, typer.Option(help="Unfreeze one more layer group per epoch.")]
Flip = Annotated[
    bool, typer.Option(help="Random horizontal flips (turn off for digits, text, etc.).")
]


def _ft_settings(
    strategy: str,
    blocks: int,
    epochs: int,
    image_size: int | None,
    backbone_lr: float,
    head_lr: float,
    bn: str,
    gradual: bool,
    flip: bool,
    seed: int,
) -> dict[str, Any]:
    return {
        "strategy": strategy,
        "blocks": blocks,
        "epochs": epochs,
        "image_size": image_size,
        "backbone_lr": backbone_lr,
        "head_lr": head_lr,
        "bn": bn,
        "gradual": gradual,
        "flip": flip,
        "seed": seed,
    }


def _flow(name: str) -> Any:
    """The run `name` of flows/runs.py: as a Prefect flow when a Prefect server is set up
    (PREFECT_API_URL or the Prefect profile; its UI then shows the run), else in this process,
    without Prefect. Either way the same steps, and MLflow records the run."""
    from flows import runs

    if not runs.using_prefect():
        return getattr(runs, name)
    runs.check_prefect_server()
    from flows import pipeline

    return getattr(pipeline, name)


def _fail_or_raise(exc: Exception) -> None:
    """Bad input: one red line and exit code 2. Anything else is a bug: re-raise it."""
    if not isinstance(exc, user_errors()):
        raise exc
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _chosen(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in params.items()
        if k != "best_epoch" and v not in (None, "") and (k, v) != ("feature", "embedding")
    )


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


METRIC_COLUMNS = ("val", "test acc [95% CI]", "bal. acc", "macro-F1", "top-5", "log loss", "ECE")
NARROW = 3  # columns kept on a terminal narrower than WIDE
WIDE = 130


def _columns() -> tuple[str, ...]:
    return METRIC_COLUMNS if out.width >= WIDE else METRIC_COLUMNS[:NARROW]


def _metric_cells(r: dict[str, Any]) -> list[str]:
    ci = ""
    if r.get("accuracy_ci_low") is not None:
        ci = f" [{float(r['accuracy_ci_low']):.2f}-{float(r['accuracy_ci_high']):.2f}]"
    cells = [
        _num(r.get("val_score")),
        _num(r.get("accuracy")) + ci,
        _num(r.get("balanced_accuracy")),
        _num(r.get("macro_f1")),
        _num(r.get("top5_accuracy")),
        _num(r.get("log_loss")),
        _num(r.get("ece")),
    ]
    return cells[: len(_columns())]


def _metric_columns(table: Table) -> None:
    """Numbers never wrap; on a narrow terminal the `chosen` column folds instead."""
    for col in _columns():
        table.add_column(col, justify="right", no_wrap=col.startswith("test"), min_width=5)
    if len(_columns()) < len(METRIC_COLUMNS):
        table.caption = f"macro-F1, top-5, log loss, ECE: a terminal of {WIDE}+ columns, or --json"


def _heads_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("model", no_wrap=True, min_width=max(len(r["head"]) for r in rows))
    table.add_column("chosen", overflow="fold", min_width=12)
    _metric_columns(table)
    for r in rows:
        table.add_row(r["head"], _chosen(r["params"]), *_metric_cells(r))
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
    if report["embedded"] and report.get("model_path"):
        out.print(f"  network: {report['model_path']}", highlight=False)
    if report.get("index"):
        out.print("  " + _index_line(report["index"]), highlight=False)
        changed = report["embedded"] or report["removed"]
        action = report["index"]["history"][-1]["action"] if changed else "unchanged"
        out.print(f"  ({action})", highlight=False)
    for path, reason in report["failures"][:10]:
        out.print(f"  [yellow]skipped[/] {path}: {reason}", highlight=False)
    if report["failed"] > 10:
        out.print(f"  ... and {report['failed'] - 10} more: see `headstart info`")


def _print_pipeline(result: dict[str, Any], workspace: Path) -> None:
    from flows import tracking

    _print_embed(result["embed"])
    if result.get("reused_from"):
        out.print(f"[green]nothing new[/]: {result['retrain_reason']}")
    metric = result["heads"][0]["selection_metric"].replace("_", " ")
    rows = list(result["heads"]) + ([result["finetune"]] if result.get("finetune") else [])
    out.print(
        _heads_table(
            rows,
            f"{result['embed']['source_name']}: test split, val = validation {metric}, "
            "heads best first",
        )
    )
    if result.get("imbalanced"):
        out.print("classes are imbalanced: balanced class weights, chosen on balanced accuracy")
    for reason in (result.get("skipped") or {}).values():
        out.print(f"[yellow]skipped[/] {reason}")
    d = result["decision"]
    verdict = "[yellow]escalate to fine-tuning[/]" if d["escalate"] else "[green]no escalation[/]"
    out.print(f"decision: {verdict}: {d['reason']}")
    if result.get("finetune"):
        _print_finetune(result["finetune"], workspace)
    if result.get("registered"):
        reg = result["registered"]
        out.print(f"registry: best head is version {reg['version']} of [bold]{reg['uri']}[/]")
    out.print(
        f"MLflow: experiment [bold]{result['experiment']}[/], run {result['run_id']}, "
        f"store {tracking.tracking_uri(workspace)}"
    )
    out.print(f"open the MLflow UI: [bold]{tracking.ui_command(workspace)}[/]")
    out.print(f"compare runs: [bold]uv run headstart compare --workspace {workspace}[/]")
    from flows import runs

    if not runs.using_prefect():
        out.print(
            "ran in this process, without Prefect; to see runs in Prefect's UI, start `uv run "
            "prefect server start` and export PREFECT_API_URL=http://127.0.0.1:4200/api",
            highlight=False,
        )


def _print_finetune(ft: dict[str, Any], workspace: Path) -> None:
    how = (
        "reused a finished identical run"
        if ft["reused"]
        else (
            f"{ft['epochs_run']} epochs, best epoch {ft['best_epoch']}, "
            f"{ft['seconds_per_epoch']:.1f} s/epoch"
        )
    )
    if ft.get("resumed_from_epoch"):
        how += f", resumed at epoch {ft['resumed_from_epoch']}"
    out.print(
        f"fine-tuned {ft['head']} at {ft['image_size']} px ({how}): test accuracy "
        f"{ft['accuracy']:.3f}",
        highlight=False,
    )
    vs = ft.get("vs_best_head")
    if vs:
        gain = vs["test_accuracy_gain"]
        word = "[green]beats[/]" if gain > 0 else "[yellow]does not beat[/]"
        out.print(f"  {word} the best head {vs['head']} on the same test split by {gain:+.3f}")
    ws = "" if workspace == DEFAULT_WORKSPACE else f" --workspace {workspace}"
    out.print(
        f"  new backbone [bold]{ft['backbone']}[/]: "
        f"uv run headstart predict IMAGE --model {ft['backbone']}{ws}; "
        f"uv run headstart embed SOURCE --backbone {ft['backbone']}{ws}",
        highlight=False,
    )


@app.command()
def demo(
    workspace: Workspace = DEFAULT_WORKSPACE,
    per_class: Annotated[
        int, typer.Option(help="Sample images per digit class (at most 174: all of them).")
    ] = 174,
    backbone: BackboneOpt = None,
    target: Annotated[
        float,
        typer.Option(help="Validation accuracy the best head must reach, else fine-tune."),
    ] = 0.99,
    epochs: Epochs = 12,
    image_size: ImageSize = None,
) -> None:
    """Run the whole pipeline offline on bundled sample data (handwritten digits, 10 classes):
    embed, frozen heads, then fine-tuning where the heads fall short, on the same test split."""
    import torch

    from flows.sample_data import materialise_digits

    if image_size is None and not torch.cuda.is_available():
        image_size = 64  # the digits are 8x8 scans: 64 px keeps CPU fine-tuning to seconds/epoch
        out.print(
            "fine-tuning (if needed) runs at 64 px on this CPU; a GPU uses the backbone's own size"
        )
    # Full fine-tuning, no flips (a mirrored digit is another symbol).
    settings = _ft_settings("full", 2, epochs, image_size, 3e-4, 1e-3, "frozen", False, False, 0)
    try:
        root = materialise_digits(workspace / "sample" / "digits", per_class=per_class)
        out.print(f"sample data: {root} (10 classes x {per_class} images)")
        result = _flow("pipeline")(
            str(root),
            backbone=backbone,
            workspace=str(workspace),
            target=target,
            finetune_settings=settings,
        )
    except Exception as exc:
        _fail_or_raise(exc)
    _print_pipeline(result, workspace)
    example = next(root.glob("3/*.png"))
    out.print(f"search by image: [bold]uv run headstart search {example} -k 5[/]")
    ws = "" if workspace == DEFAULT_WORKSPACE else f" --workspace {workspace}"
    out.print(f"or in the browser: [bold]uv run headstart ui{ws}[/] (gallery, map, JSON API)")


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
    max_memory: MaxMemory = None,
    recall: Recall = None,
    index: IndexKind = None,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
    engine_workers: EngineWorkers = None,
    compile_model: CompileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Embed new or changed images of SOURCE into the store and refresh its FAISS index.

    Safe to interrupt: finished batches are kept in the store's staging/ folder and a re-run
    continues from them. Files that cannot be embedded are listed in failures.parquet with a
    reason (`headstart info`). Counts and images/s per stage go to an MLflow run.
    """
    from flows.steps.embedding import preflight

    try:
        preflight(source, store, backbone, workspace, need_labels=False)
        report = _flow("embed")(
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
            index_settings=_index_settings(max_memory, recall, index),
            engine=engine,
            address=address,
            engine_workers=engine_workers,
            compile_model=compile_model,
        )
    except Exception as exc:
        _fail_or_raise(exc)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_embed(report)


@app.command(name="index")
def index_cmd(
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    max_memory: MaxMemory = None,
    recall: Recall = None,
    index: IndexKind = None,
    rebuild: Annotated[
        bool, typer.Option(help="Retrain and re-tune from scratch instead of updating.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Choose, build and tune a store's search index (`embed` does this after each update).

    Use it to change the memory budget or recall target of an existing store. The choice,
    the reason, the tuned parameters and the recall/latency curve go to the manifest
    (`headstart info`)."""
    from flows.workspace import resolve_store

    try:
        settings = _index_settings(max_memory, recall, index)
        st = resolve_store(store, workspace)
        with st.lock():
            entry = st.reindex(settings, rebuild=rebuild or settings is not None)
    except Exception as exc:
        _fail_or_raise(exc)
    if as_json:
        print(json.dumps(entry, indent=2))
        return
    out.print(_index_line(entry), highlight=False)
    curve = Table(title="tuning on held-out queries (recall@10 vs exact search)")
    keys = [k for k in entry["tuning"]["curve"][0] if k not in ("recall", "ms_per_query")]
    for col in (*keys, "recall@10", "ms/query"):
        curve.add_column(col, justify="right")
    for row in entry["tuning"]["curve"]:
        chosen = all(row.get(k) == v for k, v in entry["tuning"]["params"].items())
        cells = [str(row[k]) for k in keys] + [f"{row['recall']:.3f}", f"{row['ms_per_query']:.3f}"]
        curve.add_row(*cells, style="bold green" if chosen and keys else None)
    if keys:
        out.print(curve)


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
    from flows import tracking
    from flows.steps.training import check_trainable
    from flows.workspace import resolve_store

    try:
        st = resolve_store(store, workspace)
        check_trainable(st)
        result = _flow("train_heads")(
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
        typer.Option(help="Validation score below which the run escalates to fine-tuning."),
    ] = 0.9,
    finetune: Annotated[bool, typer.Option(help="Escalate to fine-tuning regardless.")] = False,
    strategy: Strategy = "full",
    blocks: Blocks = 2,
    epochs: Epochs = 10,
    image_size: ImageSize = None,
    backbone_lr: BackboneLr = 1e-4,
    head_lr: HeadLr = 1e-3,
    bn: Bn = "frozen",
    gradual: Gradual = False,
    flip: Flip = True,
    batch_size: int = 32,
    layers: LayersOpt = None,
    seed: int = 0,
    max_memory: MaxMemory = None,
    recall: Recall = None,
    index: IndexKind = None,
    retrain: Annotated[
        bool,
        typer.Option(
            help="Train the heads even when the data, heads and seed are those of the last "
            "training (by default that training's heads are reused)."
        ),
    ] = False,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
    engine_workers: EngineWorkers = None,
    compile_model: CompileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The whole pipeline on SOURCE: embed, train heads, and fine-tune the backbone when the
    best head's validation score is below --target (or with --finetune); all in MLflow."""
    from flows.steps.embedding import preflight

    settings = _ft_settings(
        strategy, blocks, epochs, image_size, backbone_lr, head_lr, bn, gradual, flip, seed
    )
    try:
        preflight(source, store, backbone, workspace, need_labels=True)
        _check_settings(settings)
        result = _flow("pipeline")(
            str(source),
            store=_s(store),
            backbone=backbone,
            weights=_s(weights),
            experiment=experiment,
            target=target,
            finetune=finetune,
            finetune_settings=settings,
            workspace=str(workspace),
            batch_size=batch_size,
            seed=seed,
            progress=not as_json,
            layers=_layers(layers),
            index_settings=_index_settings(max_memory, recall, index),
            retrain=retrain,
            engine=engine,
            address=address,
            engine_workers=engine_workers,
            compile_model=compile_model,
        )
    except Exception as exc:
        _fail_or_raise(exc)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_pipeline(result, workspace)


@app.command(name="finetune")
def finetune_cmd(
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    experiment: Annotated[
        str | None, typer.Option(help="MLflow experiment (default: the source's name).")
    ] = None,
    strategy: Strategy = "full",
    blocks: Blocks = 2,
    epochs: Epochs = 10,
    image_size: ImageSize = None,
    backbone_lr: BackboneLr = 1e-4,
    head_lr: HeadLr = 1e-3,
    bn: Bn = "frozen",
    gradual: Gradual = False,
    flip: Flip = True,
    seed: int = 0,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a store's backbone on its labelled images (its train/val/test splits).

    The result is a backbone of its own, `finetuned:<id>`, usable with `embed --backbone` and
    `predict --model`. Interrupted runs resume from their last epoch; an identical finished run
    is reused, not retrained.
    """
    from flows.steps.training import check_trainable
    from flows.workspace import resolve_store

    settings = _ft_settings(
        strategy, blocks, epochs, image_size, backbone_lr, head_lr, bn, gradual, flip, seed
    )
    try:
        st = resolve_store(store, workspace)
        check_trainable(st)
        _check_settings(settings)
        result = _flow("finetune")(
            str(st.path),
            experiment=experiment,
            settings=settings,
            workspace=str(workspace),
            progress=not as_json,
        )
    except Exception as exc:
        _fail_or_raise(exc)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    out.print(_heads_table([result["finetune"]], f"fine-tuned on {st.path.name} (test split)"))
    _print_finetune(result["finetune"], workspace)
    out.print(f"MLflow: experiment {result['experiment']}, run {result['run_id']}")


@app.command()
def compare(
    workspace: Workspace = DEFAULT_WORKSPACE,
    experiment: Annotated[
        str | None, typer.Option(help="Only this MLflow experiment (default: all).")
    ] = None,
    last: Annotated[
        int | None, typer.Option(help="Only the newest N pipeline/training runs.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Heads and fine-tuned networks side by side, read back from MLflow: one block per run
    (newest first), best validation score first, the same metrics as the MLflow UI."""
    from flows.steps.training import compare as compare_runs

    try:
        rows = compare_runs(workspace, experiment=experiment, last=last)
    except Exception as exc:
        _fail_or_raise(exc)
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        out.print("no heads in MLflow yet: run `headstart demo` or `headstart run SOURCE`")
        return
    table = Table(title="heads and fine-tuned networks (test split; val = validation score)")
    for col in ("run", "backbone"):
        table.add_column(col, overflow="fold")
    table.add_column("model", no_wrap=True, min_width=max(len(r["model"]) for r in rows))
    table.add_column("chosen", overflow="fold", min_width=12)
    _metric_columns(table)
    previous = None
    for r in rows:
        first = r["parent_run_id"] != previous
        if first and previous is not None:
            table.add_section()
        previous = r["parent_run_id"]
        label = f"{r['experiment']}/{r['parent_run']}" if first else ""
        table.add_row(
            label,
            r["backbone"] if first else "",
            r["model"],
            _chosen(r["chosen"]),
            *_metric_cells(r),
        )
    out.print(table)


def _check_settings(settings: dict[str, Any]) -> None:
    from heads.finetune import FineTuneConfig

    FineTuneConfig(**settings).check()


@app.command()
def search(
    image: Annotated[Path, typer.Argument(help="Query image.")],
    k: Annotated[int, typer.Option("-k", help="Number of neighbours.")] = 5,
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: JsonOpt = False,
) -> None:
    """Find the images in a store most similar to IMAGE (cosine similarity of embeddings)."""
    from flows.steps.inference import search_image

    try:
        hits = search_image(image, store=store, k=k, workspace=workspace)
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
    model: Annotated[
        str | None,
        typer.Option(
            help="A fine-tuned network, `finetuned:<id>`, instead of a head (its own classifier)."
        ),
    ] = None,
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    top: Annotated[int, typer.Option(help="Classes to show per image.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Label new images with a trained head or a fine-tuned network, with probabilities."""
    from flows.steps.inference import predict_images

    try:
        preds = predict_images(
            images, head=head, store=store, workspace=workspace, top=top, model=model
        )
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
def dedup(
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    threshold: Annotated[
        float,
        typer.Option(
            help="Cosine similarity at or above which two images count as near-duplicates: "
            "0.95 catches re-saved, resized and re-encoded copies of one photo; lower values "
            "also group crops and edits."
        ),
    ] = 0.95,
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="Write the groups to this .parquet or .csv file."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Find groups of near-duplicate images in a store (before training: duplicates leak
    between train and test splits). Exact duplicates are already in `headstart info`."""
    from extractors.dedup import near_duplicate_groups, write_groups
    from flows.workspace import resolve_store

    try:
        st = resolve_store(store, workspace)
        groups = near_duplicate_groups(st, threshold=threshold)
        written = write_groups(groups, out_file) if out_file is not None else None
    except Exception as exc:
        _fail_or_raise(exc)
    rows = groups.to_pylist()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    n_groups = len({r["group"] for r in rows})
    table = Table(title=f"near-duplicates in {st.path.name} (cosine >= {threshold})")
    for col in ("group", "similarity", "label", "split", "path"):
        table.add_column(col, overflow="fold")
    for r in rows[:60]:
        table.add_row(
            str(r["group"]), f"{r['similarity']:.3f}", str(r["label"]), str(r["split"]), r["path"]
        )
    if rows:
        out.print(table)
    leaks = sum(len({r["split"] for r in rows if r["group"] == g}) > 1 for g in range(n_groups))
    out.print(
        f"{n_groups} group(s), {len(rows)} images; {leaks} group(s) span more than one split"
        + (f"; written to {written}" if written else "")
    )


@app.command()
def info(
    store: StoreOpt = None, workspace: Workspace = DEFAULT_WORKSPACE, as_json: JsonOpt = False
) -> None:
    """Show what a store holds: backbone, rows, splits, classes, failures, index, heads."""
    from flows.steps.inference import store_info

    try:
        data = store_info(store, workspace)
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
        "index_consistent",
        "created",
        "updated",
    ):
        table.add_row(key, str(data.get(key)))
    table.add_row("source", f"{data['source']['root']} ({data['source']['kind']})")
    if data.get("index"):
        from rich.text import Text

        table.add_row("index", Text.from_markup(_index_line(data["index"], "")))
        table.add_row("index history", data["index"]["history"][-1]["action"])
    if "heads" in data:
        table.add_row("best head", f"{data['heads']['best']} ({data['heads']['best_path']})")
    out.print(table)
    for f in data["failures_table"][:20]:
        out.print(f"  [yellow]failed[/] {f['path']}: {f['reason']}", highlight=False)


@app.command()
def ui(
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    mlflow_url: Annotated[
        str | None, typer.Option(help="MLflow UI address, to link rows to their runs.")
    ] = None,
) -> None:
    """Search a store in the browser: drop an image, see its neighbours; plus an embedding map
    and a JSON API (/api/docs). Read-only: the index is memory-mapped, shared by processes."""
    import uvicorn

    from flows.webapp import create_app
    from flows.workspace import resolve_store

    try:
        st = resolve_store(store, workspace)
        application = create_app(st.path, workspace, mlflow_url)
    except Exception as exc:
        _fail_or_raise(exc)
    out.print(f"search page for [bold]{st.path}[/] on http://{host}:{port}/ (Ctrl-C stops it)")
    uvicorn.run(application, host=host, port=port, log_level="warning")


@app.command(name="map")
def map_cmd(
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    out_file: Annotated[
        Path,
        typer.Option(
            "--out", help="Where to write: NAME.png (plot) and NAME.html (interactive page)."
        ),
    ] = Path("embedding-map.png"),
    points: Annotated[int, typer.Option(help="Rows to sample for the map.")] = 3000,
    seed: int = 0,
) -> None:
    """Draw a 2-D map (t-SNE) of a store's embeddings, coloured by label: well-separated
    clusters mean the heads have an easy job; mixed ones show which classes get confused."""
    from flows.embedding_map import project, write_html, write_png
    from flows.workspace import resolve_store

    try:
        st = resolve_store(store, workspace)
        data = project(st, max_points=points, seed=seed)
        png = write_png(data, out_file.with_suffix(".png"))
        html = write_html(data, out_file.with_suffix(".html"))
    except Exception as exc:
        _fail_or_raise(exc)
    out.print(f"{data['method']} map of {len(data['points'])} rows: {png} and {html}")


@app.command()
def serve(
    source: Annotated[
        Path | None,
        typer.Argument(help="Folder or manifest to re-process; omit to serve --file."),
    ] = None,
    cron: Annotated[
        str | None, typer.Option(help="Cron schedule for SOURCE (default: hourly).")
    ] = None,
    interval: Annotated[
        float | None, typer.Option(help="Run SOURCE every this many seconds instead of cron.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Deployment name for SOURCE.")] = None,
    file: Annotated[
        Path,
        typer.Option(
            help="Deployments to serve when no SOURCE is given: one `deployment` table per "
            "source with name, source, cron or interval, and any pipeline parameter (target, "
            "experiment, engine, ...)."
        ),
    ] = Path("deployments.toml"),
    limit: Annotated[
        int, typer.Option(help="Flow runs at once; a due run waits while one is running.")
    ] = 1,
    store: StoreOpt = None,
    backbone: BackboneOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment.")] = None,
    target: float = 0.9,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
    engine_workers: EngineWorkers = None,
) -> None:
    """Serve the pipeline as scheduled Prefect deployments until Ctrl-C.

    Each due run embeds only new or changed images, updates the index, retrains the heads only
    when the data changed, and publishes its heads table as a Prefect artifact. Runs go to the
    Prefect API in PREFECT_API_URL (a standing `prefect server start`, see the README) and
    MLflow in MLFLOW_TRACKING_URI.
    """
    from flows import deployments, runs
    from flows.steps.embedding import preflight

    try:
        if source is None:
            if cron or interval or name:
                raise deployments.DeploymentError(
                    "--cron, --interval and --name apply to a SOURCE; with --file each "
                    "deployment sets its own"
                )
            specs = deployments.read_file(file)
        else:
            params = {
                "store": _s(store and store.resolve()),
                "backbone": backbone,
                "experiment": experiment,
                "target": target,
                "workspace": str(workspace.resolve()),
                "engine": engine,
                "address": address,
                "engine_workers": engine_workers,
            }
            specs = [
                deployments.DeploymentSpec(
                    name or f"pipeline-{source.resolve().name}",
                    str(source.resolve()),
                    cron or (None if interval else "0 * * * *"),  # both given: an error
                    interval,
                    {k: v for k, v in params.items() if v is not None},
                )
            ]
        for spec in specs:
            p = spec.parameters
            preflight(
                Path(spec.source),
                p.get("store") and Path(p["store"]),
                p.get("backbone"),
                Path(p.get("workspace", DEFAULT_WORKSPACE)),
                need_labels=True,
            )
        if runs.using_prefect():
            runs.check_prefect_server()
        else:
            # Prefect's own 20 s is too short for a first start on a small, busy machine.
            os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
            err.print(
                "no Prefect server set up (PREFECT_API_URL): starting a temporary one, which "
                "can take a minute the first time; its runs vanish when serve stops. To keep "
                "them, run `uv run prefect server start` and export "
                "PREFECT_API_URL=http://127.0.0.1:4200/api first.",
                highlight=False,
            )
        built = deployments.build(specs)
    except Exception as exc:
        _fail_or_raise(exc)
    from prefect import serve as prefect_serve

    for spec in specs:
        out.print(f"serving [bold]pipeline/{spec.name}[/] over {spec.source}, {spec.schedule}")
    out.print(f"at most {limit} run(s) at once; Ctrl-C stops")
    try:
        prefect_serve(*built, limit=limit, print_starting_message=False)
    except RuntimeError as exc:
        if "ephemeral Prefect API" not in str(exc):
            raise
        _fail_or_raise(
            runs.OrchestrationError(
                "the temporary Prefect server did not start in time; start one with `uv run "
                "prefect server start`, export PREFECT_API_URL=http://127.0.0.1:4200/api and "
                "run serve again"
            )
        )


def _s(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _layers(spec: str | None) -> list[str] | None:
    return None if spec is None else [x.strip() for x in spec.split(",") if x.strip()]


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
