"""Shared fixtures: real sample images, the real offline backbone, a real store, MLflow in tmp."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Persisted task results (the embed step's cache) stay out of the user's ~/.prefect/storage.
os.environ.setdefault(
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH", tempfile.mkdtemp(prefix="headstart-prefect-results-")
)
# Compiled network packages the tests build stay out of the user's ~/.cache/headstart.
os.environ.setdefault("HEADSTART_COMPILE_CACHE", tempfile.mkdtemp(prefix="headstart-compiled-"))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 25 real handwritten digits as PNG files (100 > one batch, so workers run)."""
    from flows.sample_data import materialise_digits

    root = materialise_digits(tmp_path_factory.mktemp("digits") / "digits", per_class=25)
    for extra in ("4", "5", "6", "7", "8", "9"):
        for f in (root / extra).iterdir():
            f.unlink()
        (root / extra).rmdir()
    return root


@pytest.fixture(scope="session")
def backbone():
    """The default network on the CPU, built once: every test that embeds with it shares it."""
    from extractors.embedding.backbones import create_backbone

    return create_backbone("efficientnet_lite0", device="cpu")


@pytest.fixture
def borrowed_backbone(backbone):
    """The shared `backbone` for a test that sets extra layers on it (`set_layers`): lent
    without any and handed back without any, whatever the test did."""
    assert not backbone.layers, "a test left extra layers on the shared backbone"
    try:
        yield backbone
    finally:
        backbone.set_layers([])


@pytest.fixture(scope="session")
def built_store(digits_dir: Path, backbone, tmp_path_factory: pytest.TempPathFactory):
    """A store built once from `digits_dir` with the default backbone."""
    from extractors.embedding.sources import read_source
    from extractors.store.store import Store

    store = Store(tmp_path_factory.mktemp("store") / "digits")
    store.update(read_source(digits_dir), backbone, progress=False)
    return store


@pytest.fixture
def mlflow_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store for one test, via MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (API + SQLite) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def layered_store(digits_dir: Path, backbone, tmp_path_factory: pytest.TempPathFactory):
    """A store with the last two stages saved as extra columns (`--layers=-2,-1`), embedded by
    the shared `backbone`, handed back without the layers."""
    from extractors.embedding.sources import read_source
    from extractors.store.store import Store

    store = Store(tmp_path_factory.mktemp("layered") / "digits")
    backbone.set_layers(["-2", "-1"])
    try:
        store.update(read_source(digits_dir), backbone, progress=False)
    finally:
        backbone.set_layers([])
    return store


@pytest.fixture(scope="session")
def planted(backbone, tmp_path_factory: pytest.TempPathFactory):
    """Six distinct photos; three of them with a near-duplicate (resized to 3/4, JPEG q90)."""
    from PIL import Image
    from skimage import data

    from extractors.embedding.sources import read_source
    from extractors.store.store import Store

    root = tmp_path_factory.mktemp("photos")
    copies = {}
    for name in ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "camera"):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        img.save(root / f"{name}.png")
        if name in ("chelsea", "coffee", "rocket"):
            w, h = img.size
            img.resize((w * 3 // 4, h * 3 // 4)).save(root / f"{name}_copy.jpg", quality=90)
            copies[str((root / f"{name}_copy.jpg").resolve())] = str(
                (root / f"{name}.png").resolve()
            )
    store = Store(tmp_path_factory.mktemp("store") / "photos")
    store.update(read_source(root), backbone, progress=False)
    return store, copies


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """One S3-compatible server for the session, found by the code under test the way users'
    set-ups are: AWS_ENDPOINT_URL and the AWS_* credentials in the environment."""
    from tests.s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.close()
