"""A model that takes images: a backbone reference (name, weights identity, feature column) and
a head on its features, or a fine-tuned network's own classifier.

`headstart predict`, the scheduled `score` flow and the registered MLflow image model all run
this one class, so they give the same answers. Loading never unpickles: heads are skops
files (heads/persist.py), networks safetensors (extractors/finetuned.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from sklearn.base import BaseEstimator

from extractors.backbones import Backbone
from extractors.common import HeadstartError
from extractors.layout import embedding_matrix
from heads.classical import class_scores
from heads.persist import load_head


class ClassifierError(HeadstartError, ValueError):
    """A model whose backbone or files do not fit together; the message says what to do."""


@dataclass
class ImageClassifier:
    """Class probabilities for images, through `backbone` (see the module docstring)."""

    backbone: str  # a backbone name, e.g. efficientnet_lite0 or finetuned:<id>
    weights: str  # the identity the backbone's weights must have (Backbone.weights)
    classes: list[str]
    name: str  # who scores: `<registered>/<version>`, `finetuned:<id>` or a head file
    head: BaseEstimator | None = None  # None: the fine-tuned network's own classifier
    feature: str = "embedding"  # the store column the head reads
    feature_module: str | None = None  # the layer that column pools (--layers heads)

    @classmethod
    def from_head(cls, path: str | Path, name: str | None = None) -> ImageClassifier:
        """A head saved by heads/train.py:save_heads (skops + JSON), on its backbone."""
        estimator, meta = load_head(path)
        return cls(
            backbone=meta["backbone"],
            weights=meta["weights"],
            classes=[str(c) for c in estimator.classes_],
            name=name or str(path),
            head=estimator,
            feature=meta.get("feature", "embedding"),
            feature_module=meta.get("feature_module"),
        )

    @classmethod
    def of_finetuned(cls, network: Backbone, name: str | None = None) -> ImageClassifier:
        """A fine-tuned network (`finetuned:<id>`) with its own trained classifier."""
        if network.classifier is None or not network.classes:
            raise ClassifierError(f"{network.name} has no trained classifier; use a head")
        return cls(network.name, network.weights, list(network.classes), name or network.name)

    def bind(self, backbone: Backbone) -> BoundClassifier:
        """This model on a loaded backbone, checked to be the one it was trained on."""
        if backbone.name != self.backbone or backbone.weights != self.weights:
            raise ClassifierError(
                f"model {self.name} was trained on {self.backbone} ({self.weights}), not "
                f"{backbone.name} ({backbone.weights}); load its own backbone"
            )
        if self.feature_module:
            backbone.set_layers([self.feature_module])
        return BoundClassifier(self, backbone)

    def as_dict(self) -> dict[str, Any]:
        """What the model is, as JSON (its head is a file of its own)."""
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "classes": self.classes,
            "name": self.name,
            "feature": self.feature,
            "feature_module": self.feature_module,
            "kind": "finetuned" if self.head is None else "head",
        }


@dataclass
class BoundClassifier:
    """An ImageClassifier with its backbone loaded: scores images, tensors or stored rows."""

    model: ImageClassifier
    backbone: Backbone

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    @property
    def name(self) -> str:
        return self.model.name

    def from_features(self, features: np.ndarray) -> np.ndarray:
        """Probabilities from the feature column the model reads."""
        if self.model.head is None:
            return self.backbone.proba_of_features(torch.from_numpy(features)).numpy()
        return class_scores(self.model.head, np.asarray(features, np.float32))

    def proba(self, rows: pa.Table) -> np.ndarray:
        """Probabilities of stored rows (a store's or a staging part's schema)."""
        return self.from_features(embedding_matrix(rows, self._column))

    def proba_images(self, batch: torch.Tensor) -> np.ndarray:
        """Probabilities of a preprocessed batch of images."""
        emb, extra = self.backbone.embed_all(batch)
        x = emb if self.model.feature == "embedding" else extra[self._column]
        return self.from_features(x.numpy())

    @property
    def _column(self) -> str:
        return self.model.feature

    def predict_files(
        self, paths: list[str], on_error: Callable[[str, Exception], None] | None = None
    ) -> list[np.ndarray | None]:
        """Probabilities per file (None for a file that does not decode: `on_error` says)."""
        from extractors.images import ImageError

        out: list[np.ndarray | None] = []
        for p in paths:
            try:
                out.append(self.proba_images(self.backbone.prepare(p))[0])
            except ImageError as exc:
                if on_error is not None:
                    on_error(p, exc)
                out.append(None)
        return out
