"""The registered image model's code: MLflow "models from code" runs this file to build the
model (nothing is pickled). Its artifact `model` is a heads/classifier.py model folder.

Input: a DataFrame with a `path` column (image files) or an `image` column (encoded image
bytes; over `mlflow models serve`, base64 in JSON); a row with neither is an error row. Output, one
row per input row: prediction, probability, error, proba_<class> for every class, and the
out-of-distribution columns of `score`, `ood_score` and `ood` (null for an error row, or a model
folder without an OOD reference: heads/classifier.py). Param `ood_level`: the level `ood`
flags at (default: the one the folder was written with).
"""

from __future__ import annotations

import os
from typing import Any

import mlflow.models
import pandas as pd
from mlflow.pyfunc import PythonModel

from heads.classifier import ImageClassifier


class ImageModel(PythonModel):
    """A head (or a fine-tuned network) on its backbone, taking images."""

    def load_context(self, context: Any) -> None:
        device = os.environ.get("HEADSTART_DEVICE", "auto")
        self.bound = ImageClassifier.load(context.artifacts["model"], device=device)

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        if "image" in frame.columns:
            images = frame["image"]
            paths = frame["path"] if "path" in frame.columns else [None] * len(frame)
            items = [i if _given(i) else p for i, p in zip(images, paths, strict=True)]
        elif "path" in frame.columns:
            items = list(frame["path"])
        else:
            items = [None] * len(frame)
        level = (params or {}).get("ood_level")
        return pd.DataFrame(self.bound.predict_items(items, ood_level=level))


def _given(value: Any) -> bool:
    """An image's bytes (the signature's `binary` column: MLflow decodes base64 for it)."""
    return isinstance(value, bytes | bytearray | memoryview) and len(value) > 0


mlflow.models.set_model(ImageModel())
