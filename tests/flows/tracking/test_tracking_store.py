"""The MLflow tracking store under outside trouble: several commands first touching a new
database at once, a server that does not answer, a read-only database, a half-migrated one, a
full disk; and `promote` of a model that is not an image model."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.tracking.store import TrackingError, check, connect, outside_error, registry_lock

ROOT = Path(__file__).resolve().parents[3]
DOWN = "http://127.0.0.1:1"  # nothing listens on port 1
runner = CliRunner()


def _env(tmp_path: Path, tracking: str | None) -> dict[str, str]:
    """A command's environment: no Prefect server (runs stay in the process), this store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    if tracking is not None:
        env["MLFLOW_TRACKING_URI"] = tracking
    return env


def _headstart(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> tuple[int, str, float]:
    """Run `headstart ARGS` as its own process: (exit code, stderr, seconds)."""
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return res.returncode, res.stderr, time.monotonic() - start


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


LOG_A_RUN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from flows.tracking.tracker import Tracker
    ws, n = Path(sys.argv[1]), sys.argv[2]
    (ws / f"ready-{n}").touch()
    while not (ws / "go").exists():
        time.sleep(0.005)
    tracker = Tracker(ws)
    run = tracker.start_parent_run("race", f"run-{n}", {"n": n})
    tracker.log_to_run(run, metrics={"m": 1.0})
    tracker.end_run(run)
    print(run)
    """
)


def test_commands_first_touching_a_new_database_at_once_all_succeed(tmp_path: Path) -> None:
    """Four processes create and migrate the same new mlflow.db at the same moment (each
    waits, imported, for the others): all log their run, and the database works after."""
    ws = tmp_path / "ws"
    ws.mkdir()
    env = _env(tmp_path, None)  # the workspace's own mlflow.db
    n = 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOG_A_RUN, str(ws), str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    try:
        deadline = time.monotonic() + 300
        while len(list(ws.glob("ready-*"))) < n:
            assert time.monotonic() < deadline, "the processes did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        (ws / "go").touch()
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [err[-3000:] for p, (_, err) in zip(procs, results, strict=True) if p.returncode]
    assert not failed, failed
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ws.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("race")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"run-{i}" for i in range(n)]
    assert all(r.info.status == "FINISHED" for r in runs)
    code, err, _ = _headstart(["compare", "--workspace", str(ws)], env)
    assert code == 0, err


def test_a_half_migrated_database_is_one_line_saying_how_to_repair(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    db = ws / "mlflow.db"
    env = _env(tmp_path, f"sqlite:///{db}")
    code, err, _ = _headstart(["compare", "--workspace", str(ws)], env)
    assert code == 2 and "no MLflow database" in _one_line(err), err  # a reader creates none
    assert not db.exists()
    code, err, _ = _headstart(["promote", "1", "--workspace", str(ws)], env)
    assert code == 2 and db.exists(), err  # a writer made a good database
    with sqlite3.connect(db) as con:  # what a migration stopped half-way leaves behind
        con.execute("create table _alembic_tmp_params (key text, value text)")
    for args in (["compare"], ["champion"], ["promote", "1"]):
        code, err, _ = _headstart([*args, "--workspace", str(ws)], env)
        line = _one_line(err)
        assert code == 2 and "half-migrated" in line and str(db) in line, err
        assert "mlflow db upgrade" in line and "_alembic_tmp_params" in line


@pytest.mark.parametrize("command", [["compare"], ["champion"], ["compare", "--errors"]])
def test_a_tracking_server_that_does_not_answer_is_one_line_within_seconds(
    tmp_path: Path, command: list[str]
) -> None:
    code, err, seconds = _headstart([*command, "--workspace", str(tmp_path)], _env(tmp_path, DOWN))
    line = _one_line(err)
    assert code == 2 and DOWN in line and "no MLflow tracking server answers" in line, err
    # Python start-up and imports on a loaded 2-core CI take tens of seconds; what this proves
    # is "within seconds of the probe", not MLflow's retries for minutes (about 4).
    assert seconds < 60


def test_run_checks_the_tracking_store_before_embedding(tmp_path: Path, digits_dir: Path) -> None:
    ws = tmp_path / "ws"
    code, err, seconds = _headstart(
        ["run", str(digits_dir), "--workspace", str(ws)], _env(tmp_path, DOWN)
    )
    line = _one_line(err)
    assert code == 2 and DOWN in line, err
    assert not (ws / "stores").exists()  # nothing embedded, nothing half-written
    assert seconds < 60  # a loaded CI's start-up, not MLflow's minutes of retries


def test_a_server_reached_with_credentials_in_the_url_answers(tmp_path: Path, monkeypatch) -> None:
    """`http://user:token@host` (how teams pass a token) reaches a real server on 127.0.0.1."""
    import http.server
    import threading

    seen: list[str] = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://user:pw@127.0.0.1:{server.server_port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert check(tmp_path) == uri
        assert seen and seen[0].startswith("Basic ")
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DOWN)
    with pytest.raises(TrackingError, match="no MLflow tracking server answers"):
        check(tmp_path)


def test_the_registry_lock_is_held_per_thread(tmp_path: Path, monkeypatch) -> None:
    """A second thread waits for the first to let go (re-entry is only within one thread)."""
    import threading

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    inside = threading.Event()
    events: list[str] = []
    errors: list[BaseException] = []

    def second() -> None:
        try:
            inside.wait(10)
            with registry_lock(tmp_path):
                events.append("second in")
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    thread = threading.Thread(target=second)
    thread.start()
    with registry_lock(tmp_path), registry_lock(tmp_path):  # re-entry here does not wait
        inside.set()
        time.sleep(0.5)
        events.append("first out")
    thread.join(30)
    assert not errors, errors
    assert events == ["first out", "second in"]


def _read_only(path: Path) -> bool:
    """Make `path` read-only even for root (immutable), where this system allows it."""
    if os.geteuid() != 0:
        path.chmod(0o444)
    elif shutil.which("chattr") is None:
        return False
    else:
        subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    return not os.access(path, os.W_OK)


def _writable(path: Path) -> None:
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o644)


def test_promote_on_a_read_only_database_names_it(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    db = ws / "mlflow.db"
    env = _env(tmp_path, f"sqlite:///{db}")
    code, err, _ = _headstart(["promote", "1", "--workspace", str(ws)], env)  # creates it
    assert code == 2 and db.exists(), err  # (nothing to promote yet)
    if not _read_only(db):
        pytest.skip("cannot make a file read-only here")
    try:
        code, err, _ = _headstart(["promote", "1", "--workspace", str(ws)], env)
        line = _one_line(err)
        assert code == 2 and "read-only" in line and str(db) in line, err
        code, err, _ = _headstart(["compare", "--workspace", str(ws)], env)
        assert code == 0, err  # a reader still reads it
    finally:
        _writable(db)


def test_promote_takes_only_image_models(tmp_path: Path, mlflow_tmp: str) -> None:
    """A `<experiment>-head` model takes embeddings: `score` could not use it as champion."""
    from mlflow.tracking import MlflowClient

    connect(tmp_path)
    client = MlflowClient()
    client.create_registered_model("digits-head")
    client.create_model_version("digits-head", (tmp_path / "model").as_uri())
    res = runner.invoke(
        app, ["promote", "1", "--model", "digits-head", "--workspace", str(tmp_path)]
    )
    assert res.exit_code == 2, res.output
    assert "digits-head is not an image model" in res.output and "digits-image" in res.output
    assert not client.get_registered_model("digits-head").aliases


def test_outside_failures_become_one_line(tmp_path: Path, monkeypatch) -> None:
    """Real failures of the disk, of SQLite and of a tracking server that stopped answering,
    raised through layers, are recognised; anything else is not."""
    try:
        with open("/dev/full", "w") as fh:
            fh.write("x" * 65536)
            fh.flush()
    except OSError as exc:
        try:
            raise RuntimeError("logging an artifact failed") from exc
        except RuntimeError as outer:
            full = outside_error(outer)
    assert full is not None and "no space left" in str(full)
    db = tmp_path / "m.db"
    with sqlite3.connect(db) as con:
        con.execute("create table t (x int)")
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as raised:
        con.execute("insert into t values (1)")
    con.close()
    assert isinstance(outside_error(raised.value), TrackingError)
    assert "read-only" in str(outside_error(raised.value))
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException) as gone:
        MlflowClient(DOWN).search_experiments()
    assert f"the MLflow tracking server at {DOWN} did not answer" in str(outside_error(gone.value))
    assert outside_error(ValueError("a bug")) is None
    assert outside_error(OSError(errno.ENOENT, "No such file", "x")) is None


def test_the_cli_puts_an_outside_failure_as_one_line_and_exit_2() -> None:
    """The CLI's one catching place (flows/cli/app.py) turns a real ENOSPC into one line."""
    import typer

    from flows.cli.app import Commands

    cli = typer.Typer(cls=Commands)

    @cli.command()
    def fill() -> None:
        with open("/dev/full", "w") as fh:
            fh.write("x" * 65536)

    @cli.command()
    def bug() -> None:
        raise ValueError("a bug")

    res = runner.invoke(cli, ["fill"])
    assert res.exit_code == 2 and "no space left on the device" in res.output, res.output
    res = runner.invoke(cli, ["bug"])
    assert isinstance(res.exception, ValueError)  # a bug keeps its traceback


def test_a_model_whose_files_are_gone_is_one_line(tmp_path: Path, mlflow_tmp: str) -> None:
    """A registered image model whose artifact store was moved or deleted: `predict` says so."""
    from mlflow.tracking import MlflowClient

    connect(tmp_path)
    client = MlflowClient()
    client.create_registered_model("digits-image")
    client.create_model_version("digits-image", (tmp_path / "mlartifacts" / "gone").as_uri())
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    args = ["predict", str(image), "--model", "models:/digits-image/1"]
    res = runner.invoke(app, [*args, "--workspace", str(tmp_path)])
    assert res.exit_code == 2, res.output + repr(res.exception)
    assert "digits-image version 1 are not in its artifact store" in res.output
