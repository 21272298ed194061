"""Where MLflow keeps runs and artifacts for each kind of tracking store."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.tracking.store import tracking_uri
from flows.tracking.tracker import Tracker


def test_default_store_is_sqlite_in_the_workspace(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert (
        Tracker(tmp_path).artifact_location("digits") == (tmp_path / "mlartifacts/digits").as_uri()
    )


@pytest.mark.parametrize(
    ("artifacts", "expected"),
    [
        (None, "{ws}/mlartifacts/team"),  # the workspace, not ./mlruns wherever we run
        ("{tmp}/shared", "{tmp}/shared/team"),
        ("s3://bucket/mlflow/", "s3://bucket/mlflow/team"),
    ],
)
def test_a_database_store_keeps_artifacts_where_the_team_says(
    tmp_path: Path, monkeypatch, artifacts: str | None, expected: str
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow@db.example/mlflow")
    ws = tmp_path / "ws"
    if artifacts is None:
        monkeypatch.delenv("HEADSTART_ARTIFACTS", raising=False)
    else:
        monkeypatch.setenv("HEADSTART_ARTIFACTS", artifacts.format(tmp=tmp_path))
    got = Tracker(ws).artifact_location("team")
    want = expected.format(ws=ws.resolve(), tmp=tmp_path)
    assert got == (want if "://" in want else Path(want).as_uri())


def test_a_tracking_server_decides_for_itself(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert Tracker("/nowhere").artifact_location("team") is None
