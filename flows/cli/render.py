"""What the commands print: heads tables, embed and pipeline reports, index lines. Names of
files and classes are data: printed with markup off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from extractors import DEFAULT_WORKSPACE
from flows.cli.app import out


class DataTable(Table):
    """A table whose title and cells are data: plain text, never read as Rich markup (a file
    named `a[/b].jpg` or `[link=...]` prints as itself). Styled cells pass a `Text`."""

    def __init__(self, *args: Any, title: str | Text | None = None, **kwargs: Any):
        super().__init__(*args, title=Text(title) if isinstance(title, str) else title, **kwargs)

    def add_row(self, *cells: Any, **kwargs: Any) -> None:
        super().add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kwargs)


def index_line(entry: dict[str, Any], prefix: str = "index ") -> str:
    from extractors.common import human_bytes

    t, choice = entry.get("tuning", {}), entry.get("choice", {})
    params = ", ".join(f"{k}={v}" for k, v in t.get("params", {}).items()) or "exact"
    miss = "" if t.get("reached", True) else f" [red](target {t.get('target')} not reached)[/]"
    return (
        f"{prefix}[bold]{entry.get('type')}[/] ({choice.get('reason', 'exact')}); {params}; "
        f"recall@10 {t.get('recall', 1.0):.3f}{miss}; {human_bytes(entry.get('file_bytes', 0))}"
    )


def chosen(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in params.items()
        if k != "best_epoch" and v not in (None, "") and (k, v) != ("feature", "embedding")
    )


def num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


METRIC_COLUMNS = ("val", "test acc [95% CI]", "bal. acc", "macro-F1", "top-5", "log loss", "ECE")
NARROW = 3  # columns kept on a terminal narrower than WIDE
WIDE = 130


def columns() -> tuple[str, ...]:
    return METRIC_COLUMNS if out.width >= WIDE else METRIC_COLUMNS[:NARROW]


def metric_cells(r: dict[str, Any]) -> list[str]:
    ci = ""
    if r.get("accuracy_ci_low") is not None:
        ci = f" [{float(r['accuracy_ci_low']):.2f}-{float(r['accuracy_ci_high']):.2f}]"
    cells = [
        num(r.get("val_score")),
        num(r.get("accuracy")) + ci,
        num(r.get("balanced_accuracy")),
        num(r.get("macro_f1")),
        num(r.get("top5_accuracy")),
        num(r.get("log_loss")),
        num(r.get("ece")),
    ]
    return cells[: len(columns())]


def metric_columns(table: Table) -> None:
    """Numbers never wrap; on a narrow terminal the `chosen` column folds instead."""
    for col in columns():
        table.add_column(col, justify="right", no_wrap=col.startswith("test"), min_width=5)
    if len(columns()) < len(METRIC_COLUMNS):
        table.caption = f"macro-F1, top-5, log loss, ECE: a terminal of {WIDE}+ columns, or --json"


def heads_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = DataTable(title=title)
    table.add_column("model", no_wrap=True, min_width=max(len(r["head"]) for r in rows))
    table.add_column("chosen", overflow="fold", min_width=12)
    metric_columns(table)
    for r in rows:
        table.add_row(r["head"], chosen(r["params"]), *metric_cells(r))
    return table


def print_embed(report: dict[str, Any]) -> None:
    out.print(
        f"store [bold]{escape(report['store'])}[/]: {report['rows']} images "
        f"({report['embedded']} embedded now, {report['kept']} unchanged, "
        f"{report['removed']} removed, {report['failed']} failed"
        + (f", {report['duplicates']} duplicates" if report.get("duplicates") else "")
        + ") with "
        f"{escape(report['backbone'])}",
        highlight=False,
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
    grouped = report.get("grouping") or {}
    if grouped.get("groups") or grouped.get("joined"):
        out.print(
            f"  split: {grouped['grouped_rows']} images in {grouped['groups']} near-duplicate "
            f"groups (cosine >= {grouped['threshold']}) kept in one split each"
            + (
                f"; {grouped['joined']} new images took the split of their group in the store"
                if grouped["joined"]
                else ""
            ),
            highlight=False,
        )
    if grouped.get("note"):
        out.print(f"  {escape(grouped['note'])}", highlight=False)
    if report.get("index"):
        out.print("  " + index_line(report["index"]), highlight=False)
        changed = report["embedded"] or report["removed"]
        action = report["index"]["history"][-1]["action"] if changed else "unchanged"
        out.print(f"  ({action})", highlight=False)
    for path, reason in report["failures"][:10]:
        out.print(f"  [yellow]skipped[/] {escape(path)}: {escape(reason)}", highlight=False)
    if len(report["failures"]) > 10:  # failures list duplicates too; "failed" does not
        out.print(f"  ... and {len(report['failures']) - 10} more: see `headstart info`")


def print_mlflow(result: dict[str, Any], workspace: Path) -> None:
    """Where a training landed in MLflow: the experiment's runs page (the model-training view)
    and the command that serves it. Links and commands are never wrapped inside a token."""
    from flows.tracking.tracker import Tracker

    tracker = Tracker(workspace)
    out.print(
        Text(f"MLflow: experiment {result['experiment']}, run {result['run_id']}, store ")
        + Text(tracker.uri),
        soft_wrap=True,
    )
    out.print(
        Text("runs page: ") + Text(tracker.experiment_url(result["experiment"]), style="bold"),
        soft_wrap=True,
    )
    out.print(Text("open it with: ") + Text(tracker.ui_command(), style="bold"), soft_wrap=True)


def print_splits(result: dict[str, Any]) -> None:
    """The split sizes and the test interval of a training, and its leak warning if any."""
    if result.get("splits"):
        out.print(Text(result["splits"]), highlight=False)
    leak = result.get("leaks") or {}
    if leak.get("leaky_groups"):
        out.print(Text(leak["line"], style="yellow"))


def print_pipeline(result: dict[str, Any], workspace: Path) -> None:

    print_embed(result["embed"])
    if result.get("reused_from"):
        out.print(f"[green]nothing new[/]: {escape(result['retrain_reason'])}", highlight=False)
    metric = result["heads"][0]["selection_metric"].replace("_", " ")
    rows = list(result["heads"]) + ([result["finetune"]] if result.get("finetune") else [])
    out.print(
        heads_table(
            rows,
            f"{result['embed']['source_name']}: test split, val = validation {metric}, "
            "heads best first",
        )
    )
    if result.get("imbalanced"):
        out.print("classes are imbalanced: balanced class weights, chosen on balanced accuracy")
    for reason in (result.get("skipped") or {}).values():
        out.print(f"[yellow]skipped[/] {escape(reason)}", highlight=False)
    d = result["decision"]
    verdict = "[yellow]escalate to fine-tuning[/]" if d["escalate"] else "[green]no escalation[/]"
    out.print(f"decision: {verdict}: {escape(d['reason'])}", highlight=False)
    if result.get("audit"):
        out.print(Text(result["audit"]["line"]))
    print_splits(result)
    if result.get("finetune"):
        print_finetune(result["finetune"], workspace)
    if result.get("registered"):
        reg = result["registered"]
        out.print(
            f"registry: best head is version {reg['version']} of [bold]{escape(reg['uri'])}[/]"
        )
    if result.get("champion"):
        out.print(Text(result["champion"]["line"], style="bold"))
    print_mlflow(result, workspace)
    out.print(
        f"compare runs: [bold]uv run headstart compare --workspace {escape(str(workspace))}[/]"
    )
    from flows import runs

    if not runs.using_prefect():
        out.print(
            "ran in this process, without Prefect; to see runs in Prefect's UI, start `uv run "
            "prefect server start` and export PREFECT_API_URL=http://127.0.0.1:4200/api",
            highlight=False,
        )


def print_finetune(ft: dict[str, Any], workspace: Path) -> None:
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
    ws = "" if workspace == DEFAULT_WORKSPACE else f" --workspace {escape(str(workspace))}"
    out.print(
        f"  new backbone [bold]{ft['backbone']}[/]: "
        f"uv run headstart predict IMAGE --model {ft['backbone']}{ws}; "
        f"uv run headstart embed SOURCE --backbone {ft['backbone']}{ws}",
        highlight=False,
    )
