"""k-NN classifier over L2-normalised embeddings, searched with FAISS (cosine similarity)."""

from __future__ import annotations

from numbers import Integral, Real
from typing import ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from extractors.common import normalize


class FaissKNNClassifier(ClassifierMixin, BaseEstimator):
    """Majority (or similarity-weighted) vote of the k most cosine-similar training embeddings.

    weights="uniform" counts neighbours; weights="similarity" weights each by
    exp(similarity / temperature), as in DINOv2's k-NN evaluation. class_weight="balanced"
    (or a {class: weight} dict) scales each vote by its class's weight, so a large class does
    not outvote a small one just by being large.
    """

    _parameter_constraints: ClassVar[dict] = {
        "k": [Interval(Integral, 1, None, closed="left")],
        "weights": [StrOptions({"uniform", "similarity"})],
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "class_weight": [StrOptions({"balanced"}), dict, None],
    }

    def __init__(
        self,
        k: int = 10,
        weights: str = "uniform",
        temperature: float = 0.07,
        class_weight: str | dict | None = None,
    ):
        self.k = k
        self.weights = weights
        self.temperature = temperature
        self.class_weight = class_weight

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: np.ndarray, y: np.ndarray) -> FaissKNNClassifier:
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        self.class_weight_ = compute_class_weight(self.class_weight, classes=self.classes_, y=y)
        self.X_ = normalize(X)
        self.y_ = y_idx.astype(np.int64)
        self._build_index()
        return self

    def _build_index(self) -> None:
        """The FAISS index over the training rows: built at fit and on load, never at predict
        (FAISS objects are not serialisable with skops, so they are not saved)."""
        import faiss

        self._faiss = faiss.IndexFlatIP(self.X_.shape[1])
        self._faiss.add(self.X_)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "X_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        k = max(1, min(self.k, len(self.X_)))
        sims, nn = self._faiss.search(normalize(X), k)
        if self.weights == "uniform":
            votes = np.ones_like(sims, dtype=np.float64)
        else:  # shifted by the row max: exp(s/T) overflows nothing, the ratios are unchanged
            votes = np.exp((sims - sims[:, :1]) / self.temperature)
        votes = votes * self.class_weight_[self.y_[nn]]
        proba = np.zeros((len(X), len(self.classes_)), dtype=np.float64)
        np.add.at(proba, (np.arange(len(X))[:, None], self.y_[nn]), votes)
        total = proba.sum(axis=1, keepdims=True)
        return np.divide(proba, total, out=np.full_like(proba, 1 / proba.shape[1]), where=total > 0)

    def predict(self, X: np.ndarray) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(axis=1)]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_faiss", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "X_" in state:
            self._build_index()
