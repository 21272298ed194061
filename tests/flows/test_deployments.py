"""Deployments declared in TOML: parsed, validated against the pipeline's parameters, built."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.deployments import DeploymentError, DeploymentSpec, build, read_file
from flows.settings import PipelineSettings

REPO = Path(__file__).resolve().parents[2]
HEAD = '[[deployment]]\nname = "a"\nsource = "x"\ncron = "@daily"\n'


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deployments.toml"
    path.write_text(text)
    return path


def test_the_projects_deployments_file_is_valid() -> None:
    spec, scores = read_file(REPO / "deployments.toml")
    assert spec.name == "digits-hourly" and spec.cron == "0 * * * *"
    assert spec.source == str(REPO / "data" / "sample" / "digits")
    assert spec.locations["workspace"] == str(REPO / "data")
    assert (scores.kind, scores.name, scores.locations["experiment"]) == (
        "score",
        "digits-hourly-scores",
        "digits",
    )
    assert scores.source == spec.source
    built = build([spec, scores])
    assert [d.flow_name for d in built] == ["pipeline", "score"]
    assert built[1].parameters["experiment"] == "digits"


def test_score_deployments_take_only_what_scoring_uses(tmp_path: Path) -> None:
    head = HEAD + 'kind = "score"\n'
    (spec,) = read_file(
        _write(
            tmp_path,
            head + 'model = "models:/m@champion"\n'
            'predictions = "preds"\n[deployment.embed]\nbatch_size = 4\n',
        )
    )
    assert spec.parameters() == {
        "source": str(tmp_path / "x"),
        "embedding": spec.settings.embed.as_dict(),
        "progress": False,
        "experiment": "x",  # pinned: a schedule never scores with whatever was trained last
        "model": "models:/m@champion",
        "predictions": str(tmp_path / "preds"),
    }
    assert spec.parameters()["embedding"]["batch_size"] == 4
    for extra, where in (
        ("target = 0.9\n", "target"),
        ('[deployment.embed]\nbackbone = "x"\n', "embed.backbone"),
    ):
        with pytest.raises(DeploymentError, match=f"not \\['{where}'\\]"):
            read_file(_write(tmp_path, head + extra))
    with pytest.raises(DeploymentError, match=r"\['model'\] are for kind = \"score\""):
        read_file(_write(tmp_path, HEAD + 'model = "m"\n'))
    with pytest.raises(DeploymentError, match="kind 'nope' is not one of pipeline, score"):
        read_file(_write(tmp_path, HEAD + 'kind = "nope"\n'))


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
heads = ["logreg", "knn"]
[deployment.embed]
batch_size = 8
layers = ["-1"]
fast_decode = false
[deployment.index]
max_memory = "1GB"
[deployment.engine]
kind = "dask"
workers = 3
[deployment.finetune]
strategy = "partial"
label_smoothing = 0.0
""",
    )
    nightly, often = read_file(path)
    assert nightly.source == str(tmp_path / "photos")
    assert nightly.locations == {"store": str(tmp_path / "stores/photos")}
    assert nightly.settings == PipelineSettings(target=0.8)
    s = often.settings
    assert (s.embed.batch_size, s.embed.layers, s.embed.fast_decode) == (8, ["-1"], False)
    assert (s.index.max_memory, s.engine.kind, s.engine.workers) == ("1GB", "dask", 3)
    assert (s.finetune.strategy, s.finetune.label_smoothing, s.heads) == (
        "partial",
        0.0,
        ["logreg", "knn"],
    )
    assert often.source == "/abs/manifest.csv" and often.schedule == "every 90 s"

    built_nightly, built_often = build([nightly, often])
    assert built_nightly.name == "nightly"
    assert built_nightly.schedules[0].schedule.cron == "30 2 * * *"
    assert built_nightly.parameters["source"] == str(tmp_path / "photos")
    assert built_nightly.parameters["progress"] is False
    assert built_often.schedules[0].schedule.interval.total_seconds() == 90
    assert built_often.parameters["settings"]["engine"] == {
        "kind": "dask",
        "address": None,
        "workers": 3,
    }
    assert built_often.parameters["experiment"] == "team"
    # What Prefect stores is what the flow gets back: the same settings, validated again.
    from flows.pipeline import pipeline

    again = pipeline.validate_parameters(built_often.parameters)["settings"]
    assert again == often.settings


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[deployment]]\nname = "a"\nsource = "x"\n', "either cron or interval"),
        ('[[deployment]]\nname = "a"\nsource = "x"\ncron = "* * * * *"\ninterval = 5\n', "either"),
        ('[[deployment]]\nname = "a"\nsource = "x"\ninterval = 0\n', "> 0"),
        ('[[deployment]]\nname = "a"\nsource = "x"\ninterval = "600"\n', "number of seconds"),
        ('[[deployment]]\nname = "a"\nsource = "x"\ncron = "61 * * * *"\n', "not a valid cron"),
        (
            HEAD + '[deployment.embed]\nbatch_size = "8"\n',
            "--batch-size \\(embed.batch_size\\) must be an integer, not '8'",
        ),
        (
            HEAD + "[deployment.index]\nrecall = 2\n",
            "recall\\) must be in",
        ),
        (
            '[[deployment]]\nname = "a"\nsource = "x"\ncron = "@daily"\nbackbone = "y"\n',
            "backbone under \\[deployment.embed\\]",
        ),
        (
            '[[deployment]]\nname = "a"\nsource = "x"\ncron = "@daily"\nengine = "dask"\n',
            "must be a table",
        ),
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


def test_source_is_not_a_location() -> None:
    with pytest.raises(DeploymentError, match="unknown parameters \\['source'\\]"):
        DeploymentSpec("a", "x", cron="@daily", locations={"source": "y"})


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
