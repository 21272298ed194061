"""The `headstart` command line: one module per command group (embedding, training, using a
store, scheduling), shared options in options.py, printing in render.py, and user errors
caught once, in app.py."""

from __future__ import annotations

from flows.cli import embedding, scheduling, training, using  # noqa: F401 (register commands)
from flows.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
