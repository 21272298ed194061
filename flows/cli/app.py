"""The `headstart` Typer app, its consoles, and the one place user errors are caught: any
HeadstartError (every module's error type extends it), and any known failure outside headstart
(a full disk, a read-only file, an MLflow store that stopped answering:
flows/tracking/store.py `outside_error`), becomes one red line and exit code 2; anything else
is a bug and keeps its traceback."""

from __future__ import annotations

import logging
import os
from typing import Any

import click
import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from extractors.common import HeadstartError

# Keep the CLI light: `--help` and bad-input errors should not wait for torch to import.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline-friendly

out = Console()
err = Console(stderr=True)


class _Said(logging.Handler):
    """What a command chose for the user (extractors/workspace.py `defaults`), one dim line on
    stderr: stdout stays the command's own output (and --json stays JSON)."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(Text(record.getMessage(), style="dim"), highlight=False, soft_wrap=True)


_said = logging.getLogger("headstart.defaults")
_said.addHandler(_Said())
_said.setLevel(logging.INFO)
_said.propagate = False


def fail(exc: HeadstartError) -> typer.Exit:
    """Print a user error as one line (its text is data: never read as markup); the exit
    (code 2) to raise."""
    err.print(Text.assemble(("error:", "bold red"), " ", str(exc)), highlight=False, soft_wrap=True)
    return typer.Exit(2)


class Commands(TyperGroup):
    """Typer's command group, with user errors turned into one line and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HeadstartError as exc:
            raise fail(exc) from None
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            from flows.tracking.store import outside_error

            known = outside_error(exc)
            if known is None:
                raise
            raise fail(known) from None


app = typer.Typer(
    cls=Commands,
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
