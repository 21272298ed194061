"""Production set-up for real: a standing Prefect server (`prefect server start`, not the test
harness) on PostgreSQL, MLflow on PostgreSQL, `headstart serve` firing a short schedule, and
two pipeline runs at once against the same tracking store.

PostgreSQL comes from HEADSTART_TEST_POSTGRES (an admin URL; `.ci/run` starts a server with
`.ci/postgres`). Locally: `export HEADSTART_TEST_POSTGRES=$(bash .ci/postgres)`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extractors.store.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres() -> str:
    url = os.environ.get("HEADSTART_TEST_POSTGRES")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must provide PostgreSQL: HEADSTART_TEST_POSTGRES=$(bash .ci/postgres)")
        pytest.skip("no PostgreSQL: export HEADSTART_TEST_POSTGRES=$(bash .ci/postgres)")
    return url


def _database(admin: str, prefix: str) -> Iterator[str]:
    """A fresh database on the server, dropped afterwards; yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    _admin(admin, f"CREATE DATABASE {name}")
    try:
        yield admin.rsplit("/", 1)[0] + f"/{name}"
    finally:
        _admin(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _admin(url: str, sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(url)
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    try:
        conn.cursor().execute(sql)
    finally:
        conn.close()


def _query(url: str, sql: str) -> list[tuple]:
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        cur = conn.cursor()
        cur.execute(sql)
        return cur.fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def mlflow_pg(postgres: str) -> Iterator[str]:
    """MLflow's tracking database on PostgreSQL, initialised once (as a team would)."""
    from mlflow.tracking import MlflowClient

    for url in _database(postgres, "mlflow"):
        MlflowClient(tracking_uri=url).search_experiments()  # creates the tables
        yield url


@pytest.fixture(scope="module")
def standing_server(postgres: str, tmp_path_factory) -> Iterator[dict[str, str]]:
    """`prefect server start` in its own process, its database on PostgreSQL."""
    for db in _database(postgres, "prefect"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        home = tmp_path_factory.mktemp("prefect-home")
        env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": db.replace(
                "postgresql://", "postgresql+asyncpg://"
            ),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        env.pop("PREFECT_API_URL", None)
        log = open(home / "server.log", "w")  # noqa: SIM115 (closed below)
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port), "--no-ui"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        api = f"http://127.0.0.1:{port}/api"
        try:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, (home / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "Prefect server did not start in 120 s"
                try:
                    if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            yield {"api": api, "db": db, "home": str(home)}
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()


def _client_env(server: dict[str, str], mlflow_url: str, home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": server["api"],
        "PREFECT_HOME": str(home),
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "MLFLOW_TRACKING_URI": mlflow_url,
    }


def _copy_images(digits_dir: Path, dest: Path, classes: list[str], start: int, n: int) -> None:
    for c in classes:
        (dest / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((digits_dir / c).iterdir())[start : start + n]:
            shutil.copy2(f, dest / c / f.name)


def _flow_runs(api: str, deployment_id: str) -> list[dict]:
    body = {"deployments": {"id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json()


def _wait_for_completed_run(api: str, deployment_id: str, after: float, proc, timeout: float):
    """The first flow run of the deployment that started after `after` and completed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        for run in _flow_runs(api, deployment_id):
            state = run["state"]["type"]
            started = run.get("start_time")
            if started and _epoch(started) > after:
                assert state not in ("FAILED", "CRASHED"), run["state"]
                if state == "COMPLETED":
                    return run
        time.sleep(2)
    raise AssertionError(f"no completed run of the deployment in {timeout:.0f} s")


def _epoch(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_scheduled_deployment_fires_and_embeds_only_new_images(
    standing_server, mlflow_pg, digits_dir, tmp_path
) -> None:
    import mlflow

    src, workspace = tmp_path / "photos", tmp_path / "ws"
    classes = ["0", "1", "2"]
    _copy_images(digits_dir, src, classes, 0, 8)
    env = _client_env(standing_server, mlflow_pg, tmp_path / "client-home")
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", str(src), "--interval", "20",
         "--name", "every-20s", "--target", "0", "--experiment", "scheduled",
         "--workspace", str(workspace)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    api = standing_server["api"]
    try:
        deadline = time.monotonic() + 120
        while True:
            assert serve.poll() is None, serve.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the deployment was not registered"
            r = httpx.get(f"{api}/deployments/name/pipeline/every-20s", timeout=5)
            if r.status_code == 200:
                deployment = r.json()
                break
            time.sleep(1)
        assert deployment["schedules"][0]["schedule"]["interval"] == 20
        first = _wait_for_completed_run(api, deployment["id"], 0, serve, timeout=300)
        assert first["parameters"]["source"] == str(src.resolve())
        (store_dir,) = (workspace / "stores").iterdir()
        assert Store(store_dir).manifest()["rows"] == 24

        grown_at = time.time()
        _copy_images(digits_dir, src, classes, 8, 2)  # 6 new images
        second = _wait_for_completed_run(api, deployment["id"], grown_at, serve, timeout=300)
    finally:
        serve.terminate()
        serve.wait(timeout=60)
    assert second["id"] != first["id"]
    store = Store(store_dir)
    assert store.manifest()["rows"] == 30 and store.verify() == []

    # MLflow on PostgreSQL: the grown folder's run embedded only the 6 new images and says
    # why the heads were retrained.
    mlflow.set_tracking_uri(mlflow_pg)
    runs = mlflow.search_runs(
        experiment_names=["scheduled"],
        filter_string="tags.mlflow.runName LIKE 'pipeline-%'",
        order_by=["attributes.start_time DESC"],
    )
    grown = runs[runs["start_time"].map(lambda t: t.timestamp()) > grown_at].iloc[-1]
    assert grown["metrics.images_embedded"] == 6 and grown["metrics.images_kept"] == 24
    assert grown["tags.retrain_reason"].startswith("data changed")
    assert grown["status"] == "FINISHED"
    # Both stores are the PostgreSQL databases: the rows are there.
    (n_runs,) = _query(mlflow_pg, "SELECT count(*) FROM runs WHERE status = 'FINISHED'")[0]
    assert n_runs >= 2 * 5  # two parent runs and their four head runs
    done = _query(
        standing_server["db"],
        "SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED' AND deployment_id = "
        f"'{deployment['id']}'",
    )[0][0]
    assert done >= 2
    # Each run published its heads table as a Prefect artifact.
    body = {"artifacts": {"key": {"any_": ["heads-scheduled"]}}}
    tables = httpx.post(f"{api}/artifacts/filter", json=body, timeout=10).json()
    assert {t["flow_run_id"] for t in tables} >= {first["id"], second["id"]}


def test_two_pipeline_runs_at_once_against_one_tracking_store(
    standing_server, mlflow_pg, digits_dir, tmp_path
) -> None:
    from mlflow.tracking import MlflowClient

    env = _client_env(standing_server, mlflow_pg, tmp_path / "client-home")
    procs = []
    for name, classes in (("left", ["0", "1"]), ("right", ["2", "3"])):
        _copy_images(digits_dir, tmp_path / name, classes, 0, 12)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flows.cli",
                    "run",
                    str(tmp_path / name),
                    "--target",
                    "0",
                    "--experiment",
                    "team",
                    "--workspace",
                    str(tmp_path / "ws"),
                    "--json",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=420)[0] for p in procs]
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output[-3000:]
    client = MlflowClient(tracking_uri=mlflow_pg)
    exp = client.get_experiment_by_name("team")
    parents = client.search_runs([exp.experiment_id], "tags.mlflow.runName LIKE 'pipeline-%'")
    assert len(parents) == 2 and {r.info.status for r in parents} == {"FINISHED"}
    for parent in parents:
        children = client.search_runs(
            [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
        assert parent.data.metrics["images_embedded"] == 24
    versions = client.search_model_versions("name = 'team-head'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    stores = sorted((tmp_path / "ws" / "stores").iterdir())
    assert len(stores) == 2
    for st in stores:
        assert Store(st).verify() == [] and Store(st).manifest()["rows"] == 24
