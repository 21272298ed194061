"""Tables and commands in an 80-column terminal (issue 29): every table fits, leaving columns
out (named under it; --wide shows them all), long run names are cut with "…" and times are
short, never folded onto many lines; a command a person copies stays one line."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from extractors.store.store import Store
from flows.cli import app
from flows.cli.app import out
from flows.cli.render import METRIC_COLUMNS, print_finetune

runner = CliRunner()
EXPERIMENT = "a-rather-long-experiment-name-that-no-80-column-table-holds"
LEFT, RIGHT = "┏┃┡│└", "┓┃┩│┘"  # the first and last character of a table's lines


@pytest.fixture(scope="module")
def trained(built_store: Store, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A workspace (its own MLflow store) after one `train` of three heads, printed at 80
    columns; and its output."""
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = tmp_path_factory.mktemp("columns") / "a workspace"
    shutil.copytree(built_store.path, ws / "stores" / "digits")
    args = ["train", "--store", str(ws / "stores" / "digits"), "--workspace", str(ws)]
    heads = ["--head", "logreg", "--head", "knn", "--head", "linear_svm"]
    res = runner.invoke(app, [*args, *heads, "--experiment", EXPERIMENT], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    yield {"ws": ws, "train": res.stdout}
    mp.undo()


def _run(*args: str, columns: int = 80) -> list[str]:
    res = runner.invoke(app, list(args), env={"COLUMNS": str(columns)})
    assert res.exit_code == 0, res.output
    return res.stdout.splitlines()


def _whole_tables(lines: list[str], width: int | None = 80) -> list[str]:
    """The lines of the tables in `lines`, each checked to be whole: it starts and ends with
    the table's border (a cropped line has lost its right edge), within `width`."""
    rows = [line.rstrip() for line in lines if line[:1] in LEFT]
    assert rows, lines
    for row in rows:
        assert row[-1] in RIGHT, row
        assert width is None or len(row) <= width, row
    return rows


def test_compare_fits_80_columns_and_names_what_it_leaves_out(trained) -> None:
    lines = _run("compare", "--workspace", str(trained["ws"]))
    assert all(len(line) <= 80 for line in lines), lines
    rows = _whole_tables(lines)
    header = next(r for r in rows if r.startswith("┃"))
    for kept in ("run", "model", "val", "test acc [95% CI]"):
        assert kept in header
    assert "ECE" not in header and "chosen" not in header
    assert any(line.strip().startswith("--wide adds: ") and "ECE" in line for line in lines)
    # The run's experiment, too long for the column, is cut with "…"; its name stays whole:
    # one line each, never folded.
    cells = [r.split("│")[1].strip() for r in rows if r.startswith("│")]
    named = [c for c in cells if c]
    assert len(named) == 2, cells
    assert EXPERIMENT.startswith(named[0].removesuffix("…")) and named[0].endswith("…")
    assert re.fullmatch(r"train-\d{8}-\d{6}", named[1])


def test_compare_wide_shows_every_column_whatever_the_width(trained) -> None:
    lines = _run("compare", "--workspace", str(trained["ws"]), "--wide")
    rows = _whole_tables(lines, width=None)
    header = next(r for r in rows if r.startswith("┃"))
    for col in ("run", "backbone", "model", "chosen", *METRIC_COLUMNS):
        assert col in header, col
    assert not any("--wide adds" in line for line in lines)
    assert any(EXPERIMENT in r for r in rows)  # whole: the table is as wide as it needs


def test_champion_fits_80_columns_with_short_times(trained) -> None:
    lines = _run("champion", "--workspace", str(trained["ws"]))
    assert all(len(line) <= 80 for line in lines), lines
    rows = [r for r in _whole_tables(lines) if r.startswith("│")]
    first = rows[0].split("│")[1].strip()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", first), rows
    assert not any("+00:00" in line for line in lines)


def test_a_training_table_fits_80_columns(trained) -> None:
    lines = trained["train"].splitlines()
    _whole_tables(lines)
    assert any("headstart compare --wide" in line for line in lines)
    # Only the lines a person copies from pass 80 characters (this workspace's path is long):
    # whole, one line each, quoted for the shell.
    long = [line for line in lines if len(line) > 80]
    assert long and all(line.startswith(("MLflow: ", "open it with: ")) for line in long)
    ui = next(line for line in lines if line.startswith("open it with: "))
    words = shlex.split(ui.removeprefix("open it with: "))
    assert words[:3] == ["uv", "run", "mlflow"] and str(trained["ws"]) in words[5]


def test_printed_commands_stay_one_line_at_80_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commands a fine-tuning prints to use its backbone, in a workspace whose path is
    long and has a space: each whole on its own line, quoted for the shell."""
    monkeypatch.setenv("COLUMNS", "80")
    ws = tmp_path / "a workspace with a name long enough to pass eighty columns"
    ft = {
        "reused": True,
        "head": "finetune:full",
        "image_size": 64,
        "accuracy": 0.9,
        "backbone": "finetuned:0123456789abcdef",
    }
    with out.capture() as captured:
        print_finetune(ft, ws)
    lines = captured.get().splitlines()
    commands = [line.split(": ", 1)[1] for line in lines if line.strip().startswith(("pre", "em"))]
    assert len(commands) == 2, lines
    for command in commands:
        words = shlex.split(command)
        assert words[:3] == ["uv", "run", "headstart"] and len(command) > 80
        assert words[-2:] == ["--workspace", str(ws)]
