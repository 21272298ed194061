"""A new user's first commands: the real `headstart` executable in subprocesses, with a fresh
HOME (no ~/.prefect, no PREFECT_HOME or PREFECT_API_URL, no MLflow store yet)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _fresh_env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "MLFLOW_", "HEADSTART_", "XDG_"))
    }
    home.mkdir(parents=True, exist_ok=True)
    return env | {"HOME": str(home)}


def _headstart(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("headstart")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    return subprocess.run(
        [*cmd, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900
    )


def test_first_commands_succeed_on_a_fresh_home(tmp_path: Path) -> None:
    home, ws = tmp_path / "home", tmp_path / "ws"
    env = _fresh_env(home)
    demo = _headstart(
        ["demo", "--workspace", str(ws), "--per-class", "5", "--target", "0"], env, tmp_path
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "Traceback" not in demo.stderr and "no escalation" in demo.stdout
    assert (ws / "mlflow.db").is_file()  # the run is in MLflow
    assert not (home / ".prefect").exists()  # and no Prefect server was started for it

    digits = ws / "sample" / "digits"
    again = _headstart(["embed", str(digits), "--workspace", str(ws), "--json"], env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads(again.stdout)
    assert report["embedded"] == 0 and report["rows"] == 50 and report["run_id"] is None

    query = sorted((digits / "3").iterdir())[0]
    hits = _headstart(["search", str(query), "--workspace", str(ws), "--json"], env, tmp_path)
    assert hits.returncode == 0, hits.stderr[-3000:]
    assert json.loads(hits.stdout)["hits"][0]["path"] == str(query.resolve())

    preds = _headstart(["predict", str(query), "--workspace", str(ws), "--json"], env, tmp_path)
    assert preds.returncode == 0, preds.stderr[-3000:]
    assert json.loads(preds.stdout)[0]["label"] in {str(d) for d in range(10)}


def test_an_absent_prefect_server_is_one_clear_line(tmp_path: Path, digits_dir: Path) -> None:
    env = _fresh_env(tmp_path / "home") | {"PREFECT_API_URL": "http://127.0.0.1:9/api"}
    res = _headstart(["embed", str(digits_dir), "--workspace", str(tmp_path)], env, tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "no Prefect server answers at http://127.0.0.1:9/api" in res.stderr
    assert "prefect server start" in res.stderr
