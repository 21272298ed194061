"""extractors: images in, vectors out, kept and searched; runs on a bare GPU machine (no
Prefect, no MLflow). By job: embedding/ (sources, decoding, backbones, the embed loop and its
engines), store/ (the store on disk: layout, plans, staging, commits, grouping), index/ (its
FAISS index), search/ (queries over it); settings.py, common.py and workspace.py serve all."""

import os
import re
import sys
from pathlib import Path

DEFAULT_BACKBONE = "efficientnet_lite0"  # offline default; see extractors.embedding.backbones
DEFAULT_WORKSPACE = Path(os.environ.get("HEADSTART_HOME", "data"))  # stores, finetuned/, MLflow


def _keep_bytecode_in_project_env() -> None:
    """Let Python keep the bytecode it compiles where PYTHONDONTWRITEBYTECODE is set (many
    containers), in a uv environment such as this project's `.venv`: else every process
    compiles torch, MLflow, Prefect and headstart from source again (about 2x the start-up,
    bench/startup.py). Python then writes each module's .pyc on its first import, into the
    environment's and these packages' (git-ignored) __pycache__ folders, as it does by
    default; a folder it cannot write stays as it is, and any other interpreter keeps the
    setting. uv's own `compile-bytecode` would write them at install, but prints "Bytecode
    compiled N files" on every `uv run` (uv issue #12202)."""
    if not sys.dont_write_bytecode or sys.prefix == sys.base_prefix:
        return
    try:
        config = (Path(sys.prefix) / "pyvenv.cfg").read_text()
    except OSError:
        return
    if re.search(r"^uv\s*=", config, re.MULTILINE):
        sys.dont_write_bytecode = False


_keep_bytecode_in_project_env()
