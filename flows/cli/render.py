"""What the commands print: heads tables, embed and pipeline reports, index lines. Names of
files and classes are data: printed with markup off."""

from __future__ import annotations

import copy
import datetime as dt
import shlex
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from extractors import DEFAULT_WORKSPACE
from extractors.common import human_bytes, plural
from flows.cli.app import out


class DataTable(Table):
    """A table whose title and cells are data: plain text, never read as Rich markup (a file
    named `a[/b].jpg` or `[link=...]` prints as itself). Styled cells pass a `Text`.

    It fits the terminal: a column added with `spare=N` gives way when the table would not fit
    without cutting a word (the highest N first), and the caption names what `more` shows
    (default: the command's `--wide`, which keeps every column)."""

    def __init__(
        self,
        *args: Any,
        title: str | Text | None = None,
        wide: bool = False,
        more: str = "--wide adds: {names}",
        **kwargs: Any,
    ):
        super().__init__(*args, title=Text(title) if isinstance(title, str) else title, **kwargs)
        self.wide, self.more = wide, more
        self.spare: dict[int, int] = {}  # column index -> the order it gives way in

    def add_column(self, header: str = "", *args: Any, spare: int = 0, **kwargs: Any) -> None:
        if spare:
            self.spare[len(self.columns)] = spare
        super().add_column(header, *args, **kwargs)

    def add_row(self, *cells: Any, **kwargs: Any) -> None:
        super().add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kwargs)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        keep = list(range(len(self.columns)))
        if self.wide:  # every column at its full width: lines may pass the terminal's edge
            full = self._needs(console, keep, natural=True)
            options = options.update_width(max(options.max_width, full))
        for index in sorted(self.spare, key=lambda i: -self.spare[i]):
            if self.wide or self._needs(console, keep) <= options.max_width:
                break
            keep.remove(index)
        table = self if len(keep) == len(self.columns) else self._only(keep)
        yield from Table.__rich_console__(table, console, options)

    def _needs(self, console: Console, keep: list[int], natural: bool = False) -> int:
        """The narrowest these columns print without cutting a word: a column that wraps as
        wide as its longest word, one that does not (no_wrap) as its longest line; or, with
        `natural`, the width where nothing wraps."""
        options = console.options.update_width(10_000)
        widths = [self._measure_column(console, options, self.columns[i]) for i in keep]
        borders = (2 if self.box and self.show_edge else 0) + (len(keep) - 1 if self.box else 0)
        return borders + sum(
            m.maximum if natural or self.columns[i].no_wrap else m.minimum
            for i, m in zip(keep, widths, strict=True)
        )

    def _only(self, keep: list[int]) -> Table:
        """A copy with these columns, its caption naming the others."""
        table = copy.copy(self)
        table.columns = []
        for new, old in enumerate(keep):
            column = copy.copy(self.columns[old])
            column._index = new
            table.columns.append(column)
        left = [str(c.header) for i, c in enumerate(self.columns) if i not in keep]
        note = Text(self.more.format(names=", ".join(left)))
        caption = self.caption
        table.caption = note if not caption else Text.assemble(caption, "; ", note)
        return table


def when(stamp: str) -> str:
    """An ISO timestamp as a person reads it in a table: local time to the minute
    (`2026-12-06 11:04`); --json keeps the stamp."""
    try:
        moment = dt.datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    return (moment.astimezone() if moment.tzinfo else moment).strftime("%Y-%m-%d %H:%M")


def short_path(path: str) -> str:
    """A file's path as short as it still opens from here: relative to the working folder when
    inside it, else under `~` when in the home folder, else as it is."""
    p = Path(path)
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        if p.is_absolute() and p.is_relative_to(base) and p != base:
            return prefix + str(p.relative_to(base))
    return path


def workspace_flag(workspace: Path, always: bool = False) -> str:
    """` --workspace PATH` for a printed command, quoted for the shell (none for the default
    workspace unless `always`)."""
    if workspace == DEFAULT_WORKSPACE and not always:
        return ""
    return f" --workspace {shlex.quote(str(workspace))}"


def show(table: Table) -> None:
    """Print a table; one made `wide` keeps its full width past the terminal's edge (the
    terminal wraps those lines, `| less -S` scrolls them)."""
    out.print(table, crop=False)


def say(*parts: str | Text, style: str = "") -> None:
    """Print a line a person copies from (a command, a link): never wrapped by Rich, so a
    command stays one line whatever the terminal's width; its text is data, never markup.
    Parts alternate: plain text, then the command (in bold), then plain text, and so on."""
    line = Text(style=style)
    for n, part in enumerate(parts):
        line.append(part if isinstance(part, Text) else Text(part, style="bold" if n % 2 else ""))
    out.print(line, soft_wrap=True, highlight=False)


def index_line(entry: dict[str, Any], prefix: str = "index ") -> str:
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


# The metric columns, and the order they give way in on a narrow terminal (0: always shown);
# `chosen` and `backbone` give way between bal. acc and the rest.
METRIC_COLUMNS = {
    "val": 0,
    "test acc [95% CI]": 0,
    "bal. acc": 1,
    "macro-F1": 4,
    "top-5": 5,
    "log loss": 6,
    "ECE": 7,
}
SPARE_BACKBONE, SPARE_CHOSEN = 2, 3


def metric_cells(r: dict[str, Any]) -> list[str]:
    ci = ""
    if r.get("accuracy_ci_low") is not None:
        ci = f" [{float(r['accuracy_ci_low']):.2f}-{float(r['accuracy_ci_high']):.2f}]"
    return [
        num(r.get("val_score")),
        num(r.get("accuracy")) + ci,
        num(r.get("balanced_accuracy")),
        num(r.get("macro_f1")),
        num(r.get("top5_accuracy")),
        num(r.get("log_loss")),
        num(r.get("ece")),
    ]


def model_columns(table: DataTable, names: list[str]) -> None:
    """The model, what its sweep chose, then the metrics: numbers never wrap, `chosen` wraps
    between its settings (never inside one) and gives way on a narrow terminal."""
    table.add_column("model", no_wrap=True, min_width=max(map(len, names)))
    table.add_column("chosen", spare=SPARE_CHOSEN)
    for col, spare in METRIC_COLUMNS.items():
        table.add_column(col, justify="right", no_wrap=True, spare=spare)


def heads_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Heads (and a fine-tuned network) as a training prints them; the columns a narrow terminal
    leaves out are all in `headstart compare --wide`, read back from MLflow."""
    table = DataTable(title=title, more="`headstart compare --wide` adds: {names}")
    model_columns(table, [r["head"] for r in rows])
    for r in rows:
        table.add_row(r["head"], chosen(r["params"]), *metric_cells(r))
    return table


def print_embed(report: dict[str, Any]) -> None:
    out.print(
        f"store [bold]{escape(short_path(report['store']))}[/]: {plural(report['rows'], 'image')} "
        f"({report['embedded']} embedded now, {report['kept']} unchanged, "
        f"{report['removed']} removed, {report['failed']} failed"
        + (f", {plural(report['duplicates'], 'duplicate')}" if report.get("duplicates") else "")
        + ") with "
        f"{escape(report['backbone'])}",
        highlight=False,
    )
    if report.get("resumed"):
        out.print(f"  resumed: {plural(report['resumed'], 'image')} reused from an interrupted run")
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
            f"  split: {plural(grouped['grouped_rows'], 'image')} in "
            f"{plural(grouped['groups'], 'near-duplicate group')} "
            f"(cosine >= {grouped['threshold']}) kept in one split each"
            + (
                f"; {plural(grouped['joined'], 'new image')} took the split of their group"
                " in the store"
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
    from extractors.store.layout import DUPLICATE

    # Duplicates are counted above, not listed: they are not failures (`headstart info`).
    failed = [(p, why) for p, why in report["failures"] if not why.startswith(DUPLICATE)]
    for path, reason in failed[:10]:
        out.print(f"  [yellow]skipped[/] {escape(path)}: {escape(reason)}", highlight=False)
    if len(failed) > 10:
        out.print(f"  ... and {len(failed) - 10} more: see `headstart info`")


def print_mlflow(result: dict[str, Any], workspace: Path) -> None:
    """Where a training landed in MLflow: the experiment's runs page (the model-training view)
    and the command that serves it. Links and commands are never wrapped inside a token."""
    from flows.tracking.tracker import Tracker

    tracker = Tracker(workspace)
    say(f"MLflow: experiment {result['experiment']}, run {result['run_id']}, store ", tracker.uri)
    say("runs page: ", tracker.experiment_url(result["experiment"]))
    say("open it with: ", tracker.ui_command())


def print_splits(result: dict[str, Any]) -> None:
    """The split sizes and the test interval of a training, and its leak warning if any."""
    if result.get("splits"):
        out.print(Text(result["splits"]), highlight=False)
    leak = result.get("leaks") or {}
    if leak.get("leaky_groups"):
        out.print(Text(leak["line"], style="yellow"))


def print_grid(result: dict[str, Any]) -> None:
    """The ladder: one row per rung (backbone in the order given, then feature column:
    `embedding`, then the `--layers` ones), its best head and verdict against the target; the
    best frozen candidate marked, the rung that stopped the ladder too."""
    d = result["decision"]
    table = DataTable(title="the ladder: frozen candidates on one split, cheapest first")
    for col in ("rung", "backbone", "feature", "best head", "val", "test acc", "vs target"):
        left = col in ("backbone", "feature", "best head", "vs target")
        table.add_column(col, justify="left" if left else "right")
    for i, r in enumerate(d["rungs"]):
        verdict = {True: ">=", False: "<", None: ""}[r["reaches"]]
        verdict += ", stop" if i == d["reached"] and not d["escalate"] else ""
        table.add_row(
            f"{i + 1}{' *' if i == d['best'] else ''}",
            r["backbone"] or result["embed"]["backbone"],
            r["feature"],
            r["best_head"],
            num(r["val_score"]),
            num(r["accuracy"]),
            verdict,
        )
    table.caption = "* the best frozen candidate: its heads follow; stop: the first to reach"
    out.print(table)


def print_pipeline(result: dict[str, Any], workspace: Path) -> None:
    if result["decision"].get("rungs"):
        print_grid(result)

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
    say("compare runs: ", f"uv run headstart compare{workspace_flag(workspace, always=True)}")
    from flows import orchestration

    if not orchestration.using_prefect():
        say(
            "ran in this process, without Prefect; to see runs in Prefect's UI, start ",
            "uv run prefect server start",
            " and export ",
            "PREFECT_API_URL=http://127.0.0.1:4200/api",
        )


def print_finetune(ft: dict[str, Any], workspace: Path) -> None:
    how = (
        "reused a finished identical run"
        if ft["reused"]
        else (
            f"{plural(ft['epochs_run'], 'epoch')}, best epoch {ft['best_epoch']}, "
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
    ws = workspace_flag(workspace)
    say("  new backbone ", ft["backbone"])
    say("    predict with: ", f"uv run headstart predict IMAGE --model {ft['backbone']}{ws}")
    say("    embed with: ", f"uv run headstart embed SOURCE --backbone {ft['backbone']}{ws}")
