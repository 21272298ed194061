"""Commands of the training stages: `demo`, `run` (the whole pipeline), `train` (heads),
`finetune` and `compare` (heads and fine-tuned networks side by side, from MLflow)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from extractors import DEFAULT_WORKSPACE
from flows.cli.app import app, out
from flows.cli.options import (
    RUN,
    Experiment,
    Group,
    JsonOpt,
    StoreOpt,
    WideOpt,
    Workspace,
    with_settings,
)
from flows.cli.render import (
    SPARE_BACKBONE,
    DataTable,
    chosen,
    heads_table,
    metric_cells,
    model_columns,
    print_finetune,
    print_mlflow,
    print_pipeline,
    print_splits,
    say,
    short_path,
    show,
    workspace_flag,
)
from flows.settings import PipelineSettings
from heads.settings import FineTuneSettings

DEMO_TARGET = 0.99  # the heads reach ~0.98 on the digits: the demo shows the escalation


@app.command()
@with_settings(
    settings=Group(
        PipelineSettings,
        only=frozenset({"embed.backbone", "target", "finetune.epochs", "finetune.image_size"}),
        # Full fine-tuning, no flips (a mirrored digit is another symbol).
        defaults={"target": DEMO_TARGET, "finetune.epochs": 12},
    )
)
def demo(
    settings: PipelineSettings,
    workspace: Workspace = DEFAULT_WORKSPACE,
    per_class: Annotated[
        int, typer.Option(help="Sample images per digit class (at most 174: all of them).")
    ] = 174,
) -> None:
    """Run the whole pipeline offline on bundled sample data (handwritten digits, 10 classes):
    embed, frozen heads, then fine-tuning where the heads fall short, on the same test split."""
    import torch

    from flows import runs
    from flows.sample_data import materialise_digits

    # Full fine-tuning, no flips (a mirrored digit is another symbol).
    finetune = settings.finetune.replace(strategy="full", backbone_lr=3e-4, flip=False)
    if finetune.image_size is None and not torch.cuda.is_available():
        # The digits are 8x8 scans: 64 px keeps CPU fine-tuning to seconds an epoch.
        finetune = finetune.replace(image_size=64)
        out.print(
            "fine-tuning (if needed) runs at 64 px on this CPU; a GPU uses the backbone's own size"
        )
    settings = settings.replace(finetune=finetune)
    root = materialise_digits(workspace / "sample" / "digits", per_class=per_class)
    out.print(f"sample data: {root} (10 classes x {per_class} images)", highlight=False)
    run = runs.for_cli(runs.pipeline, workspace)
    result = run(str(root), settings=settings, workspace=str(workspace))
    print_pipeline(result, workspace)
    example = next(root.glob("3/*.png"))
    ws = workspace_flag(workspace)  # commands print whole, one line each: they copy and paste
    say("search by image: ", f"uv run headstart search {shlex.quote(str(example))} -k 5{ws}")
    say("or in the browser: ", f"uv run headstart ui{ws}", " (gallery, map, JSON API)")


@app.command()
@with_settings(pipe=Group(PipelineSettings, only=frozenset({"heads"})))
def train(
    pipe: PipelineSettings,
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    experiment: Experiment = None,
    seed: Annotated[int, typer.Option(help="Seed of the heads' fitting.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Train the heads (logistic regression, linear and RBF SVM, k-NN) on a store, each swept
    on the validation split and scored once on the test split, tracked in MLflow."""
    from extractors.workspace import resolve_store
    from flows import runs
    from flows.steps.training import check_trainable

    st = resolve_store(store, workspace, need="labels")
    check_trainable(st)
    result = runs.for_cli(runs.train_heads, workspace)(
        str(st.path), experiment=experiment, heads=pipe.heads, workspace=str(workspace), seed=seed
    )
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    out.print(heads_table(result["heads"], f"heads on {st.path.name}"))
    out.print(Text(result["image_model"]["champion"]["line"], style="bold"))
    print_splits(result)
    print_mlflow(result, workspace)


@app.command()
@with_settings(settings=RUN)
def run(
    source: Annotated[
        str, typer.Argument(help="Labelled folder, bucket prefix or manifest (see `embed`).")
    ],
    settings: PipelineSettings,
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    experiment: Experiment = None,
    as_json: JsonOpt = False,
) -> None:
    """The whole pipeline on SOURCE: embed, train heads, and fine-tune the backbone when the
    best head's validation score is below --target (or with --finetune); all in MLflow."""
    from flows import runs
    from flows.steps.embedding import preflight

    for backbone in settings.candidates():
        preflight(source, store, backbone, workspace, need_labels=True)
    result = runs.for_cli(runs.pipeline, workspace)(
        str(source),
        settings=settings,
        store=None if store is None else str(store),
        workspace=str(workspace),
        experiment=experiment,
        progress=not as_json,
    )
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print_pipeline(result, workspace)


@app.command(name="finetune")
@with_settings(settings=FineTuneSettings)
def finetune_cmd(
    settings: FineTuneSettings,
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    experiment: Experiment = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a store's backbone on its labelled images (its train/val/test splits).

    The result is a backbone of its own, `finetuned:<id>`, usable with `embed --backbone` and
    `predict --model`. Interrupted runs resume from their last epoch; an identical finished run
    is reused, not retrained.
    """
    from extractors.workspace import resolve_store
    from flows import runs
    from flows.steps.training import check_trainable

    st = resolve_store(store, workspace, need="labels")
    check_trainable(st)
    result = runs.for_cli(runs.finetune, workspace)(
        str(st.path),
        settings=settings,
        experiment=experiment,
        workspace=str(workspace),
        progress=not as_json,
    )
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    out.print(heads_table([result["finetune"]], f"fine-tuned on {st.path.name} (test split)"))
    print_finetune(result["finetune"], workspace)
    out.print(f"MLflow: experiment {result['experiment']}, run {result['run_id']}", highlight=False)


@app.command()
def compare(
    workspace: Workspace = DEFAULT_WORKSPACE,
    experiment: Annotated[
        str | None, typer.Option(help="Only this MLflow experiment (default: all).")
    ] = None,
    last: Annotated[
        int | None, typer.Option(help="Only the newest N pipeline/training runs.")
    ] = None,
    errors: Annotated[
        bool,
        typer.Option(
            "--errors",
            help="Instead: the test images the newest run's models disagree on, with each "
            "model's prediction (from their test_predictions tables).",
        ),
    ] = False,
    wide: WideOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Heads and fine-tuned networks side by side, read back from MLflow: one block per run
    (newest first), best validation score first, the same metrics as the MLflow UI (a narrow
    terminal shows the main ones: --wide for all)."""
    from flows.tracking.store import check

    check(workspace, write=False)  # before the imports below: a store that is down fails fast
    from flows.steps.training import compare as compare_runs

    if errors:
        _print_disagreements(workspace, experiment, wide, as_json)
        return

    rows = compare_runs(workspace, experiment=experiment, last=last)
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        out.print("no heads in MLflow yet: run `headstart demo` or `headstart run SOURCE`")
        return
    table = DataTable(
        title="heads and fine-tuned networks (test split; val = validation score)", wide=wide
    )
    # A run is its experiment over its name, each cut with "..." if too long: never folded.
    table.add_column("run", overflow="ellipsis")
    table.add_column("backbone", no_wrap=True, overflow="ellipsis", spare=SPARE_BACKBONE)
    model_columns(table, [r["model"] for r in rows])
    previous = backbone = None
    for r in rows:
        first = r["parent_run_id"] != previous
        if first and previous is not None:
            table.add_section()
        label = f"{r['experiment']}\n{r['parent_run']}" if first else ""
        table.add_row(
            label,
            r["backbone"] if first or r["backbone"] != backbone else "",
            r["model"],
            chosen(r["chosen"]),
            *metric_cells(r),
        )
        previous, backbone = r["parent_run_id"], r["backbone"]
    show(table)
    for run_rows in _runs_over_several_rungs(rows):
        show(_grid(run_rows, wide))


def _rung_of(row: dict) -> str:
    """A model's rung of the ladder: its backbone, and its feature column when not the
    `embedding` (flows/candidates.py `rung_name`)."""
    from flows.candidates import rung_name

    feature = (row["chosen"] or {}).get("feature", "embedding")
    rung = {"backbone": row["backbone"], "feature": feature}
    return row["backbone"] if feature == "embedding" else rung_name(rung)


def _runs_over_several_rungs(rows: list[dict]) -> list[list[dict]]:
    """The rows of each run whose models stand on more than one rung of the ladder (several
    backbones, or `--layers` columns chosen)."""
    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["parent_run_id"], []).append(r)
    return [g for g in runs.values() if len({_rung_of(r) for r in g}) > 1]


def _grid(rows: list[dict], wide: bool) -> DataTable:
    """One row per rung of a run (backbone, feature column) that a model chose: its best
    model on validation; the best overall marked. Every rung's verdict, chosen or not, is the
    run's `ladder` tag."""
    best: dict[str, dict] = {}
    for r in rows:
        rung = _rung_of(r)
        if rung not in best or (r.get("val_score") or 0) > (best[rung].get("val_score") or 0):
            best[rung] = r
    top = max(best.values(), key=lambda r: r.get("val_score") or 0)
    run = f"{rows[0]['experiment']}/{rows[0]['parent_run']}"
    table = DataTable(title=f"{run}: the best model of each backbone (and layer)", wide=wide)
    table.caption = "* the best overall, on validation; every rung: the run's `ladder` tag"
    table.add_column("backbone", no_wrap=True)
    model_columns(table, [r["model"] for r in best.values()])
    for name, r in best.items():
        mark = " *" if r is top else ""
        table.add_row(name + mark, r["model"], chosen(r["chosen"]), *metric_cells(r))
    return table


def _print_disagreements(
    workspace: Path, experiment: str | None, wide: bool, as_json: bool
) -> None:
    from flows.tracking.results import disagreements
    from flows.tracking.tracker import Tracker

    models, rows = disagreements(Tracker(workspace), experiment)
    if as_json:
        print(json.dumps({"models": models, "images": rows}, indent=2))
        return
    if not models:
        out.print("no test predictions in MLflow yet: run `headstart demo` or `headstart run`")
        return
    table = DataTable(title=f"test images the models disagree on ({len(rows)})", wide=wide)
    table.add_column("path", overflow="fold", max_width=None if wide else 40)
    table.add_column("label", no_wrap=True)
    for n, m in enumerate(models):  # the models after the first two give way, last first
        table.add_column(m, no_wrap=True, spare=max(n - 1, 0))
    for r in rows:
        cells = []
        for m in models:
            pred = r["predictions"].get(m)
            style = "green" if pred == r["label"] else "red"
            cells.append(Text("" if pred is None else str(pred), style=style))
        table.add_row(short_path(r["path"]), str(r["label"]), *cells)
    show(table)
