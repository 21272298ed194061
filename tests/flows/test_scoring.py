"""After training, on a real MLflow store and real images: the champion moves only for a better
model (and by hand, recorded), the registered image model agrees with `predict --out` in a
clean virtual environment holding only its logged requirements and over `mlflow models
serve`, every head loads from its own requirements, and the `score` flow appends only new
files."""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from extractors.embedding.sources import read_source
from extractors.settings import MonitorSettings
from extractors.store.store import Store
from flows.cli import app
from flows.steps import training
from flows.tracking import champion
from flows.tracking.tracker import Tracker
from heads.classifier import ImageClassifier
from heads.scoring.table import PROBA

runner = CliRunner()
EXPERIMENT = "audit"
IMAGE = f"{EXPERIMENT}-image"
OOD_LEVEL = 0.1  # the store's 20 val images flag from 1/21 (the default 0.01 needs 99)


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.stdout


def _manifest(digits_dir: Path, path: Path, shuffle_train: bool) -> Path:
    """Every digit with a fixed split (so test images and labels never change between the
    runs); `shuffle_train` scrambles the train labels: a model no better than chance."""
    rows = []
    for i, f in enumerate(sorted(digits_dir.rglob("*.png"))):
        split = ("train", "train", "train", "val", "test")[i % 5]
        rows.append([str(f), f.parent.name, split])
    if shuffle_train:
        train = [r for r in rows if r[2] == "train"]
        labels = [r[1] for r in train]
        np.random.default_rng(3).shuffle(labels)
        for r, lab in zip(train, labels, strict=True):
            r[1] = lab
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label", "split"], *rows])
    return path


@pytest.fixture(scope="module")
def registry(digits_dir, backbone, tmp_path_factory):
    """A workspace whose MLflow store holds a weak champion (version 1, every head), an
    identical retrain (version 2) and a model trained on the right labels (version 3)."""
    root = tmp_path_factory.mktemp("registry")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    ws = root / "ws"
    stores, decisions = {}, []
    for run, shuffled, heads in (
        ("weak", True, None),
        ("same", True, None),
        ("good", False, ["logreg"]),
    ):
        kind = "weak" if shuffled else "good"
        if kind not in stores:
            src = _manifest(digits_dir, root / f"{kind}.csv", shuffled)
            stores[kind] = Store(ws / "stores" / kind)
            stores[kind].update(read_source(src), backbone, progress=False)
        with Tracker(ws).parent_run(EXPERIMENT, run, {}) as parent:
            summary = training.train_and_track(stores[kind].path, parent, ws, heads=heads)
        decisions.append(summary["image_model"]["champion"])
    yield {"ws": ws, "stores": stores, "decisions": decisions, "root": root}
    mp.undo()


def test_the_champion_moves_only_for_a_better_model(registry) -> None:
    first, same, good = registry["decisions"]
    assert (first["version"], first["promoted"], first["reason"]) == (1, True, "no champion yet")
    assert not same["promoted"] and same["champion"] == 1
    assert "gain +0.000" in same["reason"] and "not above the split's noise" in same["reason"]
    assert good["promoted"] and good["version"] == 3 and good["gain"]["low"] > 0
    assert good["gain"]["images"] == 20  # the same 20 test images, paired
    ws = str(registry["ws"])
    assert champion.current(IMAGE, ws) == 3
    client = MlflowClient()
    v2 = client.get_model_version(IMAGE, "2")
    assert v2.tags["champion_decision"] == "kept"
    run = client.get_run(v2.run_id)
    assert run.data.tags["headstart.champion_decision"] == "kept"
    assert "not above" in run.data.tags["headstart.champion_reason"]

    line = _ok(["promote", "1", "--reason", "audit asked", "--workspace", ws])
    assert "version 1 is now champion (promoted by hand: audit asked)" in line
    assert "version 3 is now champion (rolled back from version 1)" in _ok(
        ["rollback", "--workspace", ws]
    )
    # Walking back further: the champion before 3 was 1, the first one.
    assert "version 1 is now champion" in _ok(["rollback", "--workspace", ws])
    res = runner.invoke(app, ["rollback", "--workspace", ws])
    assert res.exit_code == 2 and "nothing to roll back to" in res.output
    _ok(["promote", "3", "--workspace", ws])
    history = json.loads(_ok(["champion", "--workspace", ws, "--json"]))
    assert history["champion"] == 3
    assert [(e["version"], e["by"]) for e in history["history"]] == [
        (1, "rule"),
        (2, "rule"),
        (3, "rule"),
        (1, "promote"),
        (3, "rollback"),
        (1, "rollback"),
        (3, "promote"),
    ]
    res = runner.invoke(app, ["promote", "9", "--workspace", ws])
    assert res.exit_code == 2 and "has no version 9" in res.output
    # What holds now is never stale: after the moves above, only version 3 says champion.
    assert client.get_registered_model(IMAGE).tags["champion"].startswith("version 3 since ")
    for version, now in (("1", "no"), ("2", "no"), ("3", "yes")):
        mv = client.get_model_version(IMAGE, version)
        assert mv.tags["champion"] == now, version
        assert client.get_run(mv.run_id).data.tags["headstart.champion"] == now, version
    assert client.get_model_version(IMAGE, "1").tags["champion_decision"] == "promoted"  # history


def _clean_env(requirements: Path, where: Path) -> Path:
    """A new virtual environment holding exactly `requirements` (uv, from its cache)."""
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    env = os.environ | {"VIRTUAL_ENV": str(where)}
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(where)], check=True, env=env)
    subprocess.run([uv, "pip", "install", "-q", "-r", str(requirements)], check=True, env=env)
    return where / "bin" / "python"


def _download(uri: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))


def test_the_image_model_agrees_with_predict_alone_and_over_http(
    registry, digits_dir, tmp_path
) -> None:
    ws = str(registry["ws"])
    out = tmp_path / "preds.parquet"
    uri = f"models:/{IMAGE}@champion"
    report = json.loads(
        _ok(
            [
                "predict",
                str(digits_dir),
                "--out",
                str(out),
                "--model",
                uri,
                "--workspace",
                ws,
                "--json",
            ]
        )
    )
    assert report["model"] == f"{IMAGE}/3" and report["rows"] == 100
    assert report["reused"] == 100  # the good store's rows, same backbone and content
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    classes = sorted({r["label"] for r in rows.values()})
    assert {r["ood"] for r in rows.values()} == {None}  # 20 val images cannot flag at 1%

    model_dir = _download(f"models:/{IMAGE}/3", tmp_path / "model")
    signature = mlflow.models.get_model_info(uri).signature
    assert signature.outputs.input_names()[-2:] == ["ood_score", "ood"]
    assert [p["name"] for p in signature.params.to_dict()] == ["ood_level"]
    assert not (model_dir / "uv.lock").exists()  # only its own requirements travel
    python = _clean_env(model_dir / "requirements.txt", tmp_path / "venv-image")
    paths = sorted(rows)[::9]
    photo = _photo(tmp_path)
    probe = [*paths, *_unseen_digits(digits_dir, tmp_path), str(photo)]
    ood = _predicted_ood(probe, uri, ws, tmp_path)
    script = (
        "import json, sys, mlflow.pyfunc, pandas as pd\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "frame = pd.DataFrame({'path': json.loads(sys.argv[2])})\n"
        f"print(m.predict(frame, params={{'ood_level': {OOD_LEVEL}}}).to_json(orient='records'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(python), "-c", script, str(model_dir), json.dumps(probe)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    alone = json.loads(done.stdout.strip().splitlines()[-1])
    for p, a in zip(paths, alone[: len(paths)], strict=True):
        assert a["prediction"] == rows[p]["prediction"]
        assert max(abs(a[f"{PROBA}{c}"] - rows[p][f"{PROBA}{c}"]) for c in classes) < 1e-3
    # The out-of-distribution columns: those of `predict --out` at the same level, directly
    # (the model folder through ImageClassifier) and in the clean environment.
    direct = ImageClassifier.load(model_dir / "artifacts" / "model", device="cpu")
    for where in (direct.predict_items(probe, ood_level=OOD_LEVEL), alone):
        for p, a in zip(probe, where, strict=True):
            assert a["ood"] == ood[p]["ood"], p
            assert abs(a["ood_score"] - ood[p]["ood_score"]) <= _tie(p, paths), p
    assert not any(ood[p]["ood"] for p in paths) and ood[str(photo)]["ood"] is True

    port = _free_port()
    serve_env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=serve_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait(f"http://127.0.0.1:{port}/ping", server)
        image = base64.b64encode(Path(paths[0]).read_bytes()).decode()
        junk = base64.b64encode(b"not an image").decode()
        foreign = base64.b64encode(photo.read_bytes()).decode()
        body = {
            "dataframe_split": {"columns": ["image"], "data": [[image], [junk], [foreign]]},
            "params": {"ood_level": OOD_LEVEL},
        }
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            served = json.loads(r.read())["predictions"]
    finally:
        server.terminate()
        server.wait(30)
    assert served[0]["prediction"] == rows[paths[0]]["prediction"]
    assert abs(served[0]["probability"] - rows[paths[0]]["probability"]) < 1e-3
    assert "not an image" in served[1]["error"]  # a row that says why, not a 500
    # In distribution (a training digit): not flagged; a colour photograph: flagged; both
    # as `predict --out` scores them; the error row: null.
    for got, p in ((served[0], paths[0]), (served[2], str(photo))):
        assert got["ood"] == ood[p]["ood"], p
        assert abs(got["ood_score"] - ood[p]["ood_score"]) <= _tie(p, paths), p
    assert served[0]["ood"] is False and served[2]["ood"] is True
    # The error row: null flag; its score missing as its probability is (a float column's
    # missing value, which MLflow's JSON writes as NaN).
    assert served[1]["ood"] is None
    assert math.isnan(served[1]["ood_score"]) and math.isnan(served[1]["probability"])


def _photo(tmp_path: Path) -> Path:
    """A colour photograph (scikit-image's astronaut): nothing like a handwritten digit."""
    from PIL import Image
    from skimage import data

    path = tmp_path / "foreign" / "astronaut.png"
    path.parent.mkdir()
    Image.fromarray(data.astronaut()).save(path)
    return path


def _unseen_digits(digits_dir: Path, tmp_path: Path) -> list[str]:
    """Handwritten digits of the same classes that the store does not hold (in distribution,
    never seen)."""
    from flows.sample_data import materialise_digits

    more = materialise_digits(tmp_path / "more", per_class=28)
    held = {f.name for f in digits_dir.rglob("*.png")}
    classes = {d.name for d in digits_dir.iterdir()}
    return [
        str(f)
        for f in sorted(more.rglob("*.png"))
        if f.parent.name in classes and f.name not in held
    ]


def _tie(path: str, training: list[str]) -> float:
    """How far the served `ood_score` may be from `predict --out`'s: `predict` reuses a training
    image's stored embedding, the model embeds it again (float noise, ~1e-6), which can break
    an exact tie with a val image's calibration score (two images each other's k-th neighbour)
    by one conformal step, 1 / (20 val images + 1); an image the store does not hold has no
    such tie: equal."""
    return (1 / 21 if path in training else 0.0) + 1e-9


def _predicted_ood(paths: list[str], uri: str, ws: str, tmp_path: Path) -> dict[str, dict]:
    """`ood_score` and `ood` of `predict --out` (its step, at OOD_LEVEL: the CLI's predict
    keeps the default level, which this store's 20 val images cannot flag at), by path."""
    from flows.steps.scoring import predict_to_file

    out = tmp_path / "ood.parquet"
    monitor = MonitorSettings(ood_level=OOD_LEVEL)
    predict_to_file(paths, out, model=uri, workspace=ws, progress=False, monitor=monitor)
    return {
        r["path"]: r for r in pq.read_table(out, columns=["path", "ood_score", "ood"]).to_pylist()
    }


def test_every_head_model_loads_from_its_own_requirements(registry, tmp_path) -> None:
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    parent = client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'weak'")[0]
    heads = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    names = {r.data.tags["headstart.head"]: r for r in heads}
    assert set(names) == {"logreg", "rbf_svm", "linear_svm", "knn"}
    X = registry["stores"]["weak"].arrays()[0][:4]
    np.save(tmp_path / "x.npy", X)
    envs: dict[str, Path] = {}
    for head, run in sorted(names.items()):
        model = _download(f"runs:/{run.info.run_id}/model", tmp_path / head)
        reqs = (model / "requirements.txt").read_text()
        python = envs.get(reqs) or _clean_env(model / "requirements.txt", tmp_path / f"venv-{head}")
        envs[reqs] = python
        script = (
            "import sys, numpy as np, mlflow.pyfunc\n"
            "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
            "print(list(m.predict(np.load(sys.argv[2]))))\n"
        )
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        done = subprocess.run(
            [str(python), "-c", script, str(model), str(tmp_path / "x.npy")],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
        )
        assert done.returncode == 0, f"{head}: {done.stderr[-2000:]}"
        assert len(eval(done.stdout.strip().splitlines()[-1])) == 4, head


def test_score_appends_only_new_or_changed_files(
    prefect_server, registry, digits_dir, tmp_path, monkeypatch
) -> None:
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # through the Prefect flow
    ws = str(registry["ws"])
    incoming = tmp_path / "incoming"
    shutil.copytree(digits_dir / "1", incoming / "a")
    args = ["score", str(incoming), "--experiment", EXPERIMENT, "--workspace", ws, "--json"]
    first = json.loads(_ok(args))
    assert first["rows"] == 25 and first["model"] == f"{IMAGE}/3" and not first["nothing_new"]
    again = json.loads(_ok(args))
    assert again["nothing_new"] and again["unchanged"] == 25 and again["part"] is None
    shutil.copy(sorted((digits_dir / "2").iterdir())[0], incoming / "a" / "new.png")
    third = json.loads(_ok(args))
    assert third["rows"] == 1 and third["total_rows"] == 26
    folder = Path(first["predictions"])
    parts = sorted(folder.glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-000000.parquet", "part-000001.parquet"]
    paths = [p for part in parts for p in pq.read_table(part)["path"].to_pylist()]
    assert len(paths) == len(set(paths)) == 26


def test_a_bare_predict_and_score_use_the_same_champion_and_say_so(
    registry, digits_dir, tmp_path
) -> None:
    """Neither names a model: both use the champion of the store trained last (version 3
    here, not that store's own best head) and say which; a promotion moves both."""
    ws = str(registry["ws"])
    image = sorted((digits_dir / "3").iterdir())[0]
    incoming = tmp_path / "incoming"
    shutil.copytree(digits_dir / "3", incoming / "a")

    def bare_calls(tag: str) -> tuple[str, str, str]:
        res = runner.invoke(app, ["predict", str(image), "--workspace", ws, "--json"])
        assert res.exit_code == 0, res.output
        out = str(tmp_path / f"preds-{tag}")
        scored = _ok(["score", str(incoming), "--workspace", ws, "--predictions", out, "--json"])
        return json.loads(res.stdout)[0]["model"], json.loads(scored)["model"], res.stderr

    now = champion.current(IMAGE, ws)
    predicted, scored, said = bare_calls("now")
    assert predicted == scored == f"{IMAGE}/{now}"
    assert f"model: models:/{IMAGE}@champion, version {now} (the champion;" in said
    other = 1 if now != 1 else 3
    _ok(["promote", str(other), "--workspace", ws])
    try:
        assert bare_calls("after")[:2] == (f"{IMAGE}/{other}", f"{IMAGE}/{other}")
    finally:
        _ok(["promote", str(now), "--workspace", ws])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode()[-3000:])
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout} s")


def test_a_fine_tuned_network_registers_an_image_model_too(registry, digits_dir) -> None:
    from flows.steps.finetuning import finetune_and_track
    from heads.settings import FineTuneSettings

    ws = registry["ws"]
    store = registry["stores"]["good"]
    cfg = FineTuneSettings(strategy="head", epochs=1, image_size=32, batch_size=16)
    with Tracker(ws).parent_run(EXPERIMENT, "tuned", {}) as parent:
        row = finetune_and_track(store.path, parent, ws, cfg, progress=False)
    image = row["image_model"]
    assert image["name"] == IMAGE and image["version"] == 4
    assert image["champion"]["line"].startswith(f"champion: {IMAGE} version")
    model = mlflow.pyfunc.load_model(f"models:/{IMAGE}/4")
    files = [str(p) for p in sorted(digits_dir.rglob("*.png"))[::20]]
    import pandas as pd

    served = model.predict(pd.DataFrame({"path": files}))
    direct = json.loads(
        _ok(
            [
                "predict",
                *files,
                "--model",
                row["backbone"],
                "--workspace",
                str(ws),
                "--json",
                "--top",
                "4",
            ]
        )
    )
    for s, d in zip(served.to_dict("records"), direct, strict=True):
        assert s["prediction"] == d["label"]
        assert abs(s["probability"] - d["top"][0]["score"]) < 1e-3


def test_rollback_to_a_deleted_version_is_one_line_naming_it(tmp_path: Path, mlflow_tmp) -> None:
    """Version 1, then version 2 champion; version 1 deleted from the registry since: the
    rollback is refused in one line naming version 1 (exit 2), and version 2 stays."""
    ws = str(tmp_path / "ws")
    mlflow.set_tracking_uri(mlflow_tmp)
    client = MlflowClient()
    client.create_registered_model("pets-image")
    for _ in range(2):
        client.create_model_version("pets-image", (tmp_path / "model").as_uri())
    _ok(["promote", "1", "--model", "pets-image", "--workspace", ws])
    _ok(["promote", "2", "--model", "pets-image", "--workspace", ws])
    client.delete_model_version("pets-image", "1")
    res = runner.invoke(app, ["rollback", "--model", "pets-image", "--workspace", ws])
    assert res.exit_code == 2, res.output + repr(res.exception)
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and "pets-image version 1" in line, res.output
    assert "Traceback" not in res.output
    assert int(client.get_model_version_by_alias("pets-image", "champion").version) == 2
