"""The `headstart` Typer app, its consoles, and the one place user errors are caught: any
HeadstartError (every module's error type extends it), and any known failure outside headstart
(a full disk, a read-only file, an MLflow store that stopped answering:
flows/tracking/store.py `outside_error`), becomes one red line and exit code 2; anything else
is a bug and keeps its traceback."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from extractors.common import HeadstartError

# Keep the CLI light: `--help` and bad-input errors should not wait for torch to import.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline-friendly
# The libraries' loggers whose INFO lines are theirs, not ours (MLflow's database creation and
# "Successfully registered model", alembic's migrations): shown with --verbose only.
LIBRARY_LOGGERS = {
    "mlflow": "ERROR",
    "alembic": "WARNING",
    "httpx": "WARNING",
    "distributed": "CRITICAL",  # a Dask cluster's shutdown chatter; its failures raise here
}
OWN_MODULES = r"(extractors|heads|flows)(\.|$)"

out = Console()
err = Console(stderr=True)


class _Said(logging.Handler):
    """One line on stderr (stdout stays the command's own output, and --json stays JSON):
    what a command chose for the user (extractors/workspace.py `defaults`), dim, and which step
    of a run starts (flows/runs.py `Runner.step`), bold."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style

    def emit(self, record: logging.LogRecord) -> None:
        err.print(Text(record.getMessage(), style=self.style), highlight=False, soft_wrap=True)


for _name, _style in (("headstart.defaults", "dim"), ("headstart.steps", "bold")):
    _log = logging.getLogger(_name)
    _log.addHandler(_Said(_style))
    _log.setLevel(logging.INFO)
    _log.propagate = False


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


def quiet_libraries(verbose: bool) -> None:
    """Only headstart's own lines unless --verbose: the libraries' log lines and warnings off,
    and their usage telemetry off (on a machine without network it logs an error each run;
    `DO_NOT_TRACK` set by the user wins)."""
    if verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO")
        return
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", LIBRARY_LOGGERS["mlflow"])
    # Dask's worker processes read their logging level from the environment they inherit.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", LIBRARY_LOGGERS["distributed"].lower())
    for name, level in LIBRARY_LOGGERS.items():  # already imported, or configured later
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=OWN_MODULES)


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


@app.callback()
def _options(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="Also print the libraries' own log lines and warnings (MLflow, PyTorch, "
            "alembic), which headstart keeps quiet by default.",
        ),
    ] = False,
) -> None:
    """headstart: transfer learning for images."""
    quiet_libraries(verbose)
