"""deployments.toml is checked against one typed schema: every wrong shape or type is one line
naming the key and the deployment (exit 2 from `serve`), never a traceback or a bad value
passed on to a flow's parameters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.deployments import read_file

HEAD = '[[deployment]]\nname = "a"\nsource = "x"\n'
CRON = HEAD + 'cron = "@daily"\n'

BAD = [
    ('[deployment]\nname = "a"\nsource = "x"\ncron = "@daily"\n', "as \\[\\[deployment\\]\\]"),
    ("deployment = 5\n", "deployment must be \\[\\[deployment\\]\\] tables, not 5"),
    ("deployment = [5]\n", "deployment #1 is 5, not a table"),
    ("deployment = []\n", "declares no \\[\\[deployment\\]\\]"),
    ('[[deployments]]\nname = "a"\n', "unknown top-level key 'deployments'"),
    ('[[deployment]]\nname = 5\nsource = "x"\ncron = "@daily"\n', "deployment #1: name 5"),
    ('[[deployment]]\nname = ""\nsource = "x"\ncron = "@daily"\n', "name '' is not a non-empty"),
    ('[[deployment]]\nname = "a"\nsource = 3\ncron = "@daily"\n', "deployment 'a': source 3"),
    (HEAD + "interval = nan\n", "deployment 'a': interval nan is not a finite number"),
    (HEAD + "interval = inf\n", "deployment 'a': interval inf is not a finite number"),
    (HEAD + "interval = -inf\n", "deployment 'a': interval -inf is not a finite number"),
    (HEAD + "interval = true\n", "deployment 'a': interval True is not a finite number"),
    (HEAD + "cron = 5\n", "deployment 'a': cron 5 is not a non-empty string"),
    (CRON + "experiment = 7\n", "deployment 'a': experiment 7 is not a non-empty string"),
    (CRON + 'workspace = ["w"]\n', "deployment 'a': workspace \\['w'\\] is not"),
    (CRON + 'kind = "score"\nmodel = 5\n', "deployment 'a': model 5 is not a non-empty string"),
    (CRON + 'kind = "score"\npredictions = 1.5\n', "deployment 'a': predictions 1.5 is not"),
    (CRON + "kind = 1\n", "deployment 'a': kind 1 is not one of pipeline, score"),
    (CRON + "targett = 1\n", "deployment 'a': unknown key 'targett'"),
    (CRON + "target = nan\n", "deployment 'a'"),
    (CRON + 'kind = "score"\non_drift = "b"\n', "on_drift 'b' is not a pipeline deployment"),
    (CRON + 'kind = "score"\n[deployment.monitor]\nood_levl = 0.1\n', "unknown setting.*ood_levl"),
    (CRON + 'kind = "score"\n[deployment.monitor]\nood_level = 0.9\n', r"monitor\].*ood_level"),
    (CRON + "[deployment.monitor]\nood_level = 0.1\n", 'are for kind = "score"'),
    (
        CRON + '[[deployment]]\nname = "s"\nsource = "y"\ncron = "@daily"\nkind = "score"\n'
        'on_drift = "a"\n',
        "on_drift 'a' trains experiment 'x', but this deployment scores with 'y'",
    ),
    (CRON + 'backbones = ["b", "b"]\n', "names each backbone once"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_a_bad_file_is_one_line_naming_key_and_deployment(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "deployments.toml"
    path.write_text(text)
    res = CliRunner().invoke(app, ["serve", "--file", str(path)], env={"COLUMNS": "400"})
    assert res.exit_code == 2, res.output + repr(res.exception)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert re.search(message, lines[0]), lines[0]


def test_typed_values_reach_the_flow_as_given(tmp_path: Path) -> None:
    path = tmp_path / "deployments.toml"
    path.write_text(
        HEAD + "interval = 90\n"
        '[[deployment]]\nname = "s"\nsource = "x"\ncron = "@daily"\nkind = "score"\n'
        'experiment = "e"\nmodel = "models:/m@champion"\n'
        "[deployment.monitor]\nood_level = 0.05\ndrift_alpha = 0.01\n"
    )
    spec, score = read_file(path)
    assert spec.interval == 90.0 and spec.schedule == "every 90 s"
    params = score.parameters()
    assert params["experiment"] == "e" and params["model"] == "models:/m@champion"
    assert params["monitor"]["ood_level"] == 0.05 and params["monitor"]["drift_alpha"] == 0.01
    assert params["monitor"]["ood_k"] == 10  # the rest at their defaults


def test_a_bucket_source_stays_a_url_and_names_the_experiment(tmp_path: Path) -> None:
    path = tmp_path / "deployments.toml"
    path.write_text(
        '[[deployment]]\nname = "train"\nsource = "s3://team/photos/"\ncron = "@daily"\n'
        '[[deployment]]\nname = "score"\nsource = "s3://team/incoming/photos"\n'
        'cron = "@hourly"\nkind = "score"\non_drift = "train"\nexperiment = "photos"\n'
        '[[deployment]]\nname = "local"\nsource = "photos"\ncron = "@daily"\n'
    )
    train, score, local = read_file(path)
    assert train.source == "s3://team/photos/" and train.parameters()["source"] == train.source
    assert score.source == "s3://team/incoming/photos"
    assert local.source == str((tmp_path / "photos").resolve())


@pytest.mark.parametrize("interval", ["nan", "inf", "-inf"])
def test_serve_source_refuses_an_interval_that_is_not_finite(tmp_path: Path, interval: str) -> None:
    res = CliRunner().invoke(
        app, ["serve", str(tmp_path), "--interval", interval], env={"COLUMNS": "400"}
    )
    assert res.exit_code == 2, res.output + repr(res.exception)
    assert "interval must be a finite number of seconds > 0" in res.output
