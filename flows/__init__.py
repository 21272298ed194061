"""flows: the runs behind each command, their steps, Prefect flows, MLflow tracking, the CLI."""

import sys
from pathlib import Path


def _compile_own_bytecode() -> None:
    """Write the .pyc of headstart's own modules where PYTHONDONTWRITEBYTECODE is set.

    uv compiles the bytecode of everything it installs, but this project is installed
    editable, so its own modules stay out: every process would compile them from source
    again (0.2-0.4 s a command). Only these packages' files are written, into their
    git-ignored __pycache__ folders, and only when missing or stale."""
    if not sys.dont_write_bytecode:
        return
    import importlib.util
    import py_compile

    root = Path(__file__).resolve().parent.parent
    for package in ("flows", "extractors", "heads"):
        for src in (root / package).rglob("*.py"):
            pyc = Path(importlib.util.cache_from_source(str(src)))
            try:
                if pyc.stat().st_mtime_ns >= src.stat().st_mtime_ns:
                    continue
            except FileNotFoundError:
                pass
            try:
                py_compile.compile(str(src), cfile=str(pyc), doraise=True)
            except (OSError, py_compile.PyCompileError):
                return  # a read-only checkout: Python compiles in memory, as before


_compile_own_bytecode()
