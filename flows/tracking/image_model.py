"""The image model in MLflow: logged beside a head (or a fine-tuned network) as a pyfunc that
takes images (flows/tracking/pyfunc_image.py), registered as `<experiment>-image`, and loaded back
by `predict --model models:/...` with the same classifier class."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from extractors import DEFAULT_WORKSPACE
from extractors.common import HeadstartError
from extractors.embedding.backbones._builders import OFFLINE_PACKAGES
from flows.tracking.models import (
    explicit_requirements,
    model_code_paths,
    pinned,
    quiet,
    register_newest,
)
from flows.tracking.store import connect, tracking_uri
from flows.tracking.tracker import Tracker
from heads.classifier import BoundClassifier, ImageClassifier

CODE = Path(__file__).with_name("pyfunc_image.py")
# What heads/ and extractors/ import on the way to a prediction.
REQUIREMENTS = (
    "torch",
    "torchvision",
    "timm",
    "huggingface-hub",
    "safetensors",
    *(p.distribution for p in OFFLINE_PACKAGES.values()),  # the offline backbones' weights
    "numpy",
    "pillow",
    "pyarrow",
    "pandas",
    "scikit-learn",
    "scipy",
    "skops",
    "faiss-cpu",
    "tqdm",
)


class RegistryError(HeadstartError, ValueError):
    """A registered model, version or alias that the tracking store does not hold."""


def image_name(experiment: str) -> str:
    """The registered image model of an experiment."""
    return f"{experiment}-image"


def log_image_model(clf: ImageClassifier, network: Path | None = None) -> str:
    """Log `clf` as the active run's `image_model` (a pyfunc from code); return its URI.
    Its folder carries the OOD reference of the head's store (heads/scoring/reference.py);
    the param `ood_level` overrides the level written there, as `score --ood-level` does."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from heads.scoring.table import PROBA

    inputs = Schema(
        [ColSpec("string", "path", required=False), ColSpec("binary", "image", required=False)]
    )
    outputs = Schema(
        [
            ColSpec("string", "prediction", required=False),
            ColSpec("double", "probability", required=False),
            ColSpec("string", "error", required=False),
            *[ColSpec("double", f"{PROBA}{c}", required=False) for c in clf.classes],
            ColSpec("double", "ood_score", required=False),
            ColSpec("boolean", "ood", required=False),
        ]
    )
    params = ParamSchema([ParamSpec("ood_level", "double", None)])
    with tempfile.TemporaryDirectory() as tmp:
        folder = clf.save(Path(tmp) / "model", network=network)
        with explicit_requirements(), quiet("mlflow.models.model"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = mlflow.pyfunc.log_model(
                name="image_model",
                python_model=str(CODE),
                artifacts={"model": str(folder)},
                code_paths=model_code_paths(),
                pip_requirements=pinned(REQUIREMENTS),
                signature=ModelSignature(inputs=inputs, outputs=outputs, params=params),
            )
    return info.model_uri


def register(model_uri: str, experiment: str, workspace: str | Path) -> dict[str, Any]:
    """A new version of `<experiment>-image` with the alias `newest`."""
    return register_newest(Tracker(workspace), model_uri, image_name(experiment))


def latest_image_model(workspace: str | Path = DEFAULT_WORKSPACE, write: bool = False) -> str:
    """The registered image model updated last (what `promote` and `rollback` act on when
    no --model is given); `write`: for a command that writes (the store is opened as such)."""
    connect(workspace, write=write)
    found = [
        m
        for m in MlflowClient().search_registered_models(order_by=["last_updated_timestamp DESC"])
        if m.name.endswith("-image")
    ]
    if not found:
        raise RegistryError(
            f"no registered image model in {tracking_uri(workspace)}; train first "
            "(`headstart run` or `headstart train`)"
        )
    return found[0].name


def resolve(uri: str, workspace: str | Path = DEFAULT_WORKSPACE) -> tuple[str, int]:
    """(name, version) of `models:/<name>@<alias>` or `models:/<name>/<version>`."""
    from mlflow.exceptions import MlflowException

    connect(workspace, write=False)
    spec = uri.removeprefix("models:/")
    client = MlflowClient()
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            return name, int(client.get_model_version_by_alias(name, alias).version)
        name, _, version = spec.rpartition("/")
        if not name or not version.isdigit():
            raise RegistryError(f"{uri}: give models:/<name>@<alias> or models:/<name>/<version>")
        client.get_model_version(name, version)
        return name, int(version)
    except MlflowException as exc:
        raise RegistryError(
            f"{uri} is not in the model registry at {tracking_uri(workspace)} "
            f"({exc.message.splitlines()[0]}); list models in the MLflow UI"
        ) from None


def load_registered(
    uri: str, workspace: str | Path = DEFAULT_WORKSPACE, device: str = "auto"
) -> tuple[BoundClassifier, Path | None]:
    """A registered image model as the classifier `predict` runs, named `<name>/<version>`,
    and the store its head was trained on (None for a fine-tuned network)."""
    from mlflow.exceptions import MlflowException

    name, version = resolve(uri, workspace)
    # The head and the network are read into memory on load: the download is then spent.
    with tempfile.TemporaryDirectory(prefix="headstart-model-") as local:
        try:
            path = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=local)
            why = "nothing there"
        except MlflowException as exc:
            path, why = local, exc.message.splitlines()[0]
        folder = Path(path) / "artifacts" / "model"
        if not folder.is_dir():  # MLflow returns an empty folder when the files are gone
            raise RegistryError(
                f"the files of {name} version {version} are not in its artifact store ({why}): "
                "restore the store's artifacts folder (mlartifacts/), or use another version"
            )
        bound = ImageClassifier.load(folder, device=device, name=f"{name}/{version}")
    store = bound.model.store
    return bound, Path(store) if store else None
