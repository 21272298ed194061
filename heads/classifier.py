"""A model that takes images: a backbone reference (name, weights identity, feature column) and
a head on its features, or a fine-tuned network's own classifier.

`headstart predict`, the scheduled `score` flow and the registered MLflow image model all run
this one class, so they give the same answers. Loading never unpickles: heads are skops
files (heads/persist.py), networks safetensors (extractors/embedding/finetuned.py).

Saved as a folder (`save`, `load`; what the MLflow image model ships as its artifact):

    model.json        backbone name and weights identity, classes, feature column, name
    head.skops        the head (+ head.json), when it is a head
    network/          a fine-tuned network's files, when the backbone is one (its classifier,
                      or the body a head reads)
    ood/              the out-of-distribution reference of a head trained on a store: a
                      capped sample of its embeddings and calibration scores, .npy and JSON
                      (heads/scoring/reference.py); `predict_items` then gives each image
                      `ood_score` and `ood`, as `score` does. A folder without it (written
                      before it existed, a fine-tuned network, a --layers head, a store that
                      is not here) loads and predicts all the same, with both columns null.

A pretrained backbone is a reference: its weights come from the bundled package or the
model hub when loaded, and are checked against the identity recorded here.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from sklearn.base import BaseEstimator

from extractors.common import HeadstartError, write_json_atomic
from extractors.embedding.backbones import Backbone, create_backbone
from extractors.embedding.images import ImageError, open_rgb
from extractors.settings import MonitorSettings
from extractors.store.layout import embedding_matrix
from heads.classical import class_scores
from heads.persist import load_head, save_head
from heads.scoring.reference import COLUMNS as OOD_COLUMNS
from heads.scoring.reference import OODReference, unusable
from heads.scoring.table import PROBA

MODEL_JSON, HEAD_FILE, NETWORK = "model.json", "head.skops", "network"


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
    store: str | None = None  # the store its head was trained on (its embeddings are reused)
    ood: OODReference | None = None  # the folder's OOD reference (None: columns null)

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
            store=meta.get("store"),
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

    def save(
        self,
        folder: str | Path,
        network: str | Path | None = None,
        monitor: MonitorSettings = MonitorSettings(),
    ) -> Path:
        """Write the model folder (see the module docstring); `network` is the fine-tuned
        network's folder when the backbone is `finetuned:<id>`; `monitor`: k, level and seed
        of the OOD reference taken from the head's store."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.backbone.startswith("finetuned:"):
            if network is None:
                raise ClassifierError(f"{self.backbone}: give the fine-tuned network's folder")
            shutil.copytree(network, folder / NETWORK, dirs_exist_ok=True)
        if self.head is not None:
            save_head(
                self.head,
                {
                    "backbone": self.backbone,
                    "weights": self.weights,
                    "feature": self.feature,
                    "feature_module": self.feature_module,
                    "store": self.store,  # reused for its embeddings, and the OOD reference
                },
                folder / HEAD_FILE,
            )
        reference = self.ood or self._reference(monitor)
        if reference is not None:
            reference.save(folder)
        write_json_atomic(folder / MODEL_JSON, self.as_dict())
        return folder

    def _reference(self, monitor: MonitorSettings) -> OODReference | None:
        """The OOD reference from the head's training store, where it can serve as `score`'s
        (flows/steps/monitoring.py): here, same backbone and weights, the model reading its
        `embedding` column."""
        from extractors.store.store import Store

        if self.head is None or unusable(
            self.store or None, self.backbone, self.weights, self.feature
        ):
            return None
        return OODReference.from_store(Store(self.store), monitor)

    @classmethod
    def load(
        cls, folder: str | Path, device: str = "auto", name: str | None = None
    ) -> BoundClassifier:
        """A saved model folder, bound to its backbone (loaded here)."""
        folder = Path(folder)
        meta = json.loads((folder / MODEL_JSON).read_text())
        weights = folder / NETWORK if (folder / NETWORK).is_dir() else None
        backbone = create_backbone(meta["backbone"], weights=weights, device=device)
        if meta["kind"] == "finetuned":
            clf = cls.of_finetuned(backbone, name=name or meta["name"])
        else:
            clf = cls.from_head(folder / HEAD_FILE, name=name or meta["name"])
        clf.ood = OODReference.load(folder)
        return clf.bind(backbone)

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
            # A copy: stored features are read-only Arrow memory (torch warns on those).
            features = np.array(features, dtype=np.float32)
            return self.backbone.proba_of_features(torch.from_numpy(features)).numpy()
        return class_scores(self.model.head, np.asarray(features, np.float32))

    def proba(self, rows: pa.Table) -> np.ndarray:
        """Probabilities of stored rows (a store's or a staging part's schema)."""
        return self.from_features(embedding_matrix(rows, self._column))

    def proba_images(self, batch: torch.Tensor) -> np.ndarray:
        """Probabilities of a preprocessed batch of images."""
        return self._proba_and_embedding(batch)[0]

    def _proba_and_embedding(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        emb, extra = self.backbone.embed_all(batch)
        x = emb if self.model.feature == "embedding" else extra[self._column]
        return self.from_features(x.numpy()), emb.numpy()

    @property
    def _column(self) -> str:
        return self.model.feature

    def predict_files(
        self, paths: list[str], on_error: Callable[[str, Exception], None] | None = None
    ) -> list[np.ndarray | None]:
        """Probabilities per file (None for a file that does not decode: `on_error` says)."""
        out: list[np.ndarray | None] = []
        for p in paths:
            try:
                out.append(self.proba_images(self.backbone.prepare(p))[0])
            except ImageError as exc:
                if on_error is not None:
                    on_error(p, exc)
                out.append(None)
        return out

    def predict_items(
        self,
        items: Sequence[str | bytes | None],
        batch_size: int = 32,
        ood_level: float | None = None,
    ) -> list[dict[str, Any]]:
        """One row per item (a file path, or an encoded image's bytes): prediction,
        probability, error (None when it decoded), proba_<class> for every class, and
        ood_score and ood (at `ood_level`, default the folder's; None for an error row or a
        model without an OOD reference: see the module docstring)."""
        rows: list[dict[str, Any]] = [{} for _ in items]
        ready: list[tuple[int, torch.Tensor]] = []
        nulls = dict.fromkeys(OOD_COLUMNS)
        for i, item in enumerate(items):
            try:
                ready.append((i, self._prepare(item)))
            except ImageError as exc:
                rows[i] = self._row(None, str(exc)) | nulls
            if len(ready) == batch_size or (i == len(items) - 1 and ready):
                proba, emb = self._proba_and_embedding(torch.cat([t for _, t in ready]))
                ood = self.model.ood
                cols = ood.columns(emb, ood_level) if ood else {c: [None] * len(emb) for c in nulls}
                for n, ((j, _), p) in enumerate(zip(ready, proba, strict=True)):
                    rows[j] = self._row(p, None) | {c: cols[c][n] for c in OOD_COLUMNS}
                ready = []
        return rows

    def _prepare(self, item: str | bytes | None) -> torch.Tensor:
        if isinstance(item, bytes | bytearray | memoryview):
            image = open_rgb(io.BytesIO(bytes(item)), self.backbone.decode_side)[0]
            return self.backbone.prepare(image)
        if not item:
            raise ImageError("no image: give a path or the image's bytes")
        return self.backbone.prepare(str(item))

    def _row(self, proba: np.ndarray | None, error: str | None) -> dict[str, Any]:
        if proba is None:
            return {"prediction": None, "probability": None, "error": error} | {
                f"{PROBA}{c}": None for c in self.classes
            }
        best = int(np.argmax(proba))
        return {
            "prediction": self.classes[best],
            "probability": float(proba[best]),
            "error": None,
        } | {f"{PROBA}{c}": float(v) for c, v in zip(self.classes, proba, strict=True)}
