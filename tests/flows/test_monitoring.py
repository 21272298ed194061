"""Eyes on production (issue 31), on real images: a model trained on handwritten digits scores
held-out digits (no alarm), photos (alarm, most flagged) and digits with a fifth of photos
(alarm, the photos ranked most unusual); each batch is a monitoring run in MLflow, and
`headstart monitor` lists them newest first, with a plot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()
LEVEL = "0.05"  # the val split of 4 x 40 digits holds 32 images: enough for this level


def _photos(folder: Path, n: int, seed: int) -> list[Path]:
    """`n` crops of scikit-image's photographs, as 8-bit grey squares like the digits."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        y, x = rng.integers(0, img.shape[0] - 200), rng.integers(0, img.shape[1] - 200)
        crop = Image.fromarray(img[y : y + 200, x : x + 200]).convert("L").resize((32, 32))
        out.append(folder / f"photo_{i:03d}.png")
        crop.save(out[-1])
    return out


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from flows.sample_data import materialise_digits

    root = tmp_path_factory.mktemp("monitor")
    digits = materialise_digits(root / "all", per_class=60)
    train, held = root / "digits", root / "heldout"
    for c in ("0", "1", "2", "3"):
        files = sorted((digits / c).iterdir())
        (train / c).mkdir(parents=True)
        (held / c).mkdir(parents=True)
        for i, f in enumerate(files):  # interleaved: the digits come writer by writer
            shutil.copy(f, (held if i % 3 == 0 else train) / c / f.name)
    photos = _photos(root / "photos", 40, seed=1)
    mixed = root / "mixed"
    shutil.copytree(held / "0", mixed / "digits")
    shutil.copytree(held / "1", mixed / "digits", dirs_exist_ok=True)
    for p in _photos(mixed / "photos", 10, seed=2):
        assert p.exists()
    ws = root / "ws"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}"}
    args = ["run", str(train), "--workspace", str(ws), "--target", "0", "--head", "logreg"]
    res = runner.invoke(app, [*args, "--json"], env=env)
    assert res.exit_code == 0, res.output + repr(res.exception)
    batches = {}
    for name, source in (("held", held), ("photos", photos[0].parent), ("mixed", mixed)):
        args = ["score", str(source), "--experiment", "digits", "--workspace", str(ws)]
        args += ["--predictions", str(root / f"pred-{name}"), "--ood-level", LEVEL, "--json"]
        res = runner.invoke(app, args, env=env)
        assert res.exit_code == 0, res.output + repr(res.exception)
        batches[name] = json.loads(res.stdout)
    return {"ws": ws, "env": env, "batches": batches, "root": root}


def test_in_distribution_batches_do_not_alarm(watched: dict) -> None:
    held = watched["batches"]["held"]["monitor"]
    assert not held["alarm"], held["reasons"]
    assert held["ood"]["share"] <= 0.15  # the level is 0.05: 80 images, a few flagged at most


def test_a_foreign_batch_alarms_and_most_of_it_is_flagged(watched: dict) -> None:
    photos = watched["batches"]["photos"]["monitor"]
    assert photos["alarm"] and photos["ood"]["share"] >= 0.8
    assert any("out of distribution" in r for r in photos["reasons"])


def test_a_fifth_of_foreign_images_alarms_and_ranks_them_first(watched: dict) -> None:
    from sklearn.metrics import roc_auc_score

    mixed = watched["batches"]["mixed"]
    assert mixed["monitor"]["alarm"]
    table = pq.read_table(mixed["part"]).to_pydict()
    foreign = ["/photos/" in p for p in table["path"]]
    assert sum(foreign) == 10 and roc_auc_score(foreign, table["ood_score"]) >= 0.9
    flagged = [f["path"] for f in mixed["monitor"]["flagged"]]
    assert flagged and all("/photos/" in p for p in flagged[:5])


def test_monitor_lists_each_batch_newest_first_with_a_plot(watched: dict) -> None:
    ws, env = str(watched["ws"]), watched["env"]
    res = runner.invoke(app, ["monitor", "--workspace", ws, "--json"], env=env)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["alarm"] for r in rows] == [True, True, False]  # mixed, photos, held
    assert rows[0]["images"] == 50 and rows[0]["ood.share"] >= 0.15
    plot = watched["root"] / "history.png"
    res = runner.invoke(app, ["monitor", "--workspace", ws, "--plot", str(plot)], env=env)
    assert res.exit_code == 0 and "ALARM" in res.stdout
    assert Image.open(plot).size[0] > 300


def test_a_drift_alarm_under_prefect_starts_the_training_deployment(
    prefect_server, watched: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deployments.toml's `on_drift` is an automation on a real Prefect server: the scoring
    flow's alarm emits the event, and the automation creates a run of the training deployment."""
    import asyncio
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL

    from extractors.settings import MonitorSettings
    from flows import deployments, pipeline
    from flows.automations import drift_automations

    root, ws = watched["root"], watched["ws"]
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", watched["env"]["MLFLOW_TRACKING_URI"])
    toml = root / "deployments.toml"
    toml.write_text(
        f'[[deployment]]\nname = "digits-train"\nsource = "{root / "digits"}"\n'
        f'cron = "0 0 1 1 *"\nworkspace = "{ws}"\n\n'
        f'[[deployment]]\nname = "digits-watch"\nkind = "score"\nsource = "{root / "photos"}"\n'
        f'cron = "0 0 1 1 *"\nworkspace = "{ws}"\nexperiment = "digits"\n'
        'on_drift = "digits-train"\n'
    )
    specs = deployments.read_file(toml)
    built = deployments.build(specs)
    (made,) = drift_automations(specs, built)
    target = next(b for b in built if b.name == "digits-train").apply()
    result = pipeline.score(
        str(root / "photos"),
        predictions=str(root / "pred-prefect"),
        experiment="digits",
        workspace=str(ws),
        progress=False,
        monitor=MonitorSettings(ood_level=0.05),
    )
    assert result["monitor"]["alarm"]

    async def runs_of_target() -> list:
        async with get_client() as client:
            wanted = DeploymentFilter(id=DeploymentFilterId(any_=[target]))
            return await client.read_flow_runs(deployment_filter=wanted)

    deadline, found = time.monotonic() + 90, []
    while not found and time.monotonic() < deadline:
        time.sleep(2)
        found = asyncio.run(runs_of_target())
    assert found, f"the automation {made.name!r} started no run of digits-train"

    # on_drift taken out of the file: serving it again removes the automation
    from flows.automations import stale

    toml.write_text(toml.read_text().replace('on_drift = "digits-train"\n', ""))
    assert stale(deployments.read_file(toml)) == [made.name]
    assert stale(deployments.read_file(toml)) == []


def test_a_batch_whose_figures_mlflow_refused_is_logged_by_the_next_run(watched: dict) -> None:
    """MLflow's database is locked for writing (another writer holds it) while a batch is
    scored: the part is written, the run fails naming MLflow, and the figures wait on disk;
    the next run (nothing new) logs them, at the batch's own time."""
    import sqlite3

    ws, env, root = str(watched["ws"]), watched["env"], watched["root"]
    before = json.loads(
        runner.invoke(app, ["monitor", "--workspace", ws, "--json"], env=env).stdout
    )
    batch = root / "late"
    shutil.copytree(root / "heldout" / "2", batch / "2")
    pred = root / "pred-late"
    args = ["score", str(batch), "--experiment", "digits", "--workspace", ws]
    args += ["--predictions", str(pred), "--ood-level", LEVEL]
    writer = sqlite3.connect(watched["ws"] / "mlflow.db", timeout=1)
    writer.execute("BEGIN IMMEDIATE")  # readers go on; any other writer waits, then fails
    try:
        res = runner.invoke(app, args, env=env)
    finally:
        writer.rollback()
        writer.close()
    assert res.exit_code == 2 and "locked" in res.output, res.output  # one line, named
    assert list(pred.glob("part-*.parquet")), "the batch was not written"
    pending = list((pred / ".monitoring-pending").glob("*.json"))
    assert len(pending) == 1
    res = runner.invoke(app, args, env=env)
    assert res.exit_code == 0, res.output
    assert "nothing new" in res.output
    assert not list((pred / ".monitoring-pending").glob("*.json"))
    after = json.loads(runner.invoke(app, ["monitor", "--workspace", ws, "--json"], env=env).stdout)
    assert len(after) == len(before) + 1
    assert after[0]["images"] == len(list((batch / "2").iterdir()))
