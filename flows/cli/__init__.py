"""The `headstart` command line: one module per command group (embedding, training, using a
store, scoring, the model registry, scheduling), shared options in options.py, printing in
render.py, and user errors caught once, in app.py."""

from __future__ import annotations

from flows.cli import (  # noqa: F401 (register commands)
    embedding,
    models,
    monitoring,
    ranking,
    scheduling,
    scoring,
    training,
    using,
)
from flows.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
