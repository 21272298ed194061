"""Saving and loading fitted heads without pickle: skops files plus a JSON sidecar of metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import skops.io as sio
from sklearn.base import BaseEstimator

from extractors.common import HeadstartError, atomic_path, write_json_atomic

# Types our heads are made of that skops does not trust by default. Anything else found in a
# file is refused: a head file is only loaded when every type in it is on this list.
TRUSTED_TYPES = frozenset(
    {
        "heads.knn.FaissKNNClassifier",
        "heads.torch_linear.TorchLinearSVC",
        "heads.torch_linear.TorchLogisticRegression",
        "sklearn.calibration._CalibratedClassifier",
        "sklearn.calibration._SigmoidCalibration",
    }
)


class HeadFileError(HeadstartError, ValueError):
    """A head file that cannot be loaded safely."""


def save_head(estimator: BaseEstimator, meta: dict[str, Any], path: str | Path) -> Path:
    """Write `path` (.skops) and `path`.json atomically; returns the .skops path."""
    path = Path(path).with_suffix(".skops")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sio.dump(estimator, tmp)
    write_json_atomic(path.with_suffix(".json"), meta)
    return path


def load_head(path: str | Path) -> tuple[BaseEstimator, dict[str, Any]]:
    """Load a head saved by `save_head`, refusing files that contain unexpected types."""
    path = Path(path)
    if not path.is_file():
        raise HeadFileError(f"no head file at {path}; train heads first with `headstart train`")
    untrusted = set(sio.get_untrusted_types(file=path))
    unexpected = untrusted - TRUSTED_TYPES
    if unexpected:
        raise HeadFileError(
            f"{path} contains types headstart does not trust: {sorted(unexpected)}; "
            "it was not written by headstart"
        )
    estimator = sio.load(path, trusted=sorted(untrusted))
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return estimator, meta
