"""Deployments declared in TOML: parsed, validated against the pipeline's parameters, built."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.deployments import DeploymentError, DeploymentSpec, build, read_file

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deployments.toml"
    path.write_text(text)
    return path


def test_the_projects_deployments_file_is_valid() -> None:
    (spec,) = read_file(REPO / "deployments.toml")
    assert spec.name == "digits-hourly" and spec.cron == "0 * * * *"
    assert spec.source == str(REPO / "data" / "sample" / "digits")
    assert spec.parameters["workspace"] == str(REPO / "data")


def test_relative_paths_resolve_against_the_file_and_build_schedules(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
[[deployment]]
name = "nightly"
source = "photos"
cron = "30 2 * * *"
store = "stores/photos"
target = 0.8

[[deployment]]
name = "often"
source = "/abs/manifest.csv"
interval = 90
experiment = "team"
engine = "dask"
""",
    )
    nightly, often = read_file(path)
    assert nightly.source == str(tmp_path / "photos")
    assert nightly.parameters == {"store": str(tmp_path / "stores/photos"), "target": 0.8}
    assert often.source == "/abs/manifest.csv" and often.schedule == "every 90 s"

    built_nightly, built_often = build([nightly, often])
    assert built_nightly.name == "nightly"
    assert built_nightly.schedules[0].schedule.cron == "30 2 * * *"
    assert built_nightly.parameters["source"] == str(tmp_path / "photos")
    assert built_nightly.parameters["progress"] is False
    assert built_often.schedules[0].schedule.interval.total_seconds() == 90
    assert built_often.parameters["engine"] == "dask"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[deployment]]\nname = "a"\nsource = "x"\n', "either cron or interval"),
        ('[[deployment]]\nname = "a"\nsource = "x"\ncron = "* * * * *"\ninterval = 5\n', "either"),
        ('[[deployment]]\nname = "a"\nsource = "x"\ninterval = 0\n', "> 0"),
        ('[[deployment]]\nname = "a"\nsource = "x"\ncron = "@daily"\ntargett = 1\n', "targett"),
        ('[[deployment]]\nsource = "x"\ncron = "@daily"\n', "no 'name'"),
        ("[[deployment]\n", "not valid TOML"),
        ("# nothing\n", "declares no"),
        ('[[deployment]]\nname = "a"\nsource = "x"\ncron = "@daily"\n' * 2, "unique"),
    ],
)
def test_bad_files_say_what_to_fix(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DeploymentError, match=message):
        read_file(_write(tmp_path, text))


def test_source_is_a_reserved_parameter() -> None:
    with pytest.raises(DeploymentError, match="unknown parameters \\['source'\\]"):
        DeploymentSpec("a", "x", cron="@daily", parameters={"source": "y"})


def test_serve_reports_bad_input_before_serving(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["serve", "--file", str(tmp_path / "missing.toml")])
    assert res.exit_code == 2 and "give a SOURCE to serve" in res.output
    res = runner.invoke(app, ["serve", "--interval", "5"])
    assert res.exit_code == 2 and "apply to a SOURCE" in res.output
    res = runner.invoke(app, ["serve", str(tmp_path), "--interval", "5", "--cron", "@daily"])
    assert res.exit_code == 2 and "either cron or interval" in res.output
    res = runner.invoke(app, ["serve", str(tmp_path / "nope"), "--interval", "5"])
    assert res.exit_code == 2 and "does not exist" in res.output
    bad = _write(tmp_path, '[[deployment]]\nname = "a"\nsource = "gone"\ncron = "@daily"\n')
    res = runner.invoke(app, ["serve", "--file", str(bad)])
    assert res.exit_code == 2 and "does not exist" in res.output
