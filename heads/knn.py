"""k-NN classifier over L2-normalised embeddings, searched with FAISS (cosine similarity)."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted


class FaissKNNClassifier(ClassifierMixin, BaseEstimator):
    """Majority (or similarity-weighted) vote of the k most cosine-similar training embeddings.

    weights="uniform" counts neighbours; weights="similarity" weights each by
    exp(similarity / temperature), as in DINOv2's k-NN evaluation. class_weight="balanced"
    divides each vote by its class's share of the training set, so a large class does not
    outvote a small one just by being large.
    """

    def __init__(
        self,
        k: int = 10,
        weights: str = "uniform",
        temperature: float = 0.07,
        class_weight: str | None = None,
    ):
        self.k = k
        self.weights = weights
        self.temperature = temperature
        self.class_weight = class_weight

    def fit(self, X: np.ndarray, y: np.ndarray) -> FaissKNNClassifier:
        from extractors.common import normalize

        if self.weights not in ("uniform", "similarity"):
            raise ValueError(f"weights must be 'uniform' or 'similarity', not {self.weights!r}")
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced', not {self.class_weight!r}")
        self.classes_, y_idx, counts = np.unique(
            np.asarray(y), return_inverse=True, return_counts=True
        )
        balanced = len(y_idx) / (len(counts) * counts)
        self.class_weight_ = balanced if self.class_weight else np.ones(len(counts))
        self.X_ = normalize(np.asarray(X, dtype=np.float32))
        self.y_ = y_idx.astype(np.int64)
        self.n_features_in_ = self.X_.shape[1]
        return self

    def _index(self):
        import faiss

        # Built on demand (FAISS objects are not serialisable with skops); cached per instance.
        index = getattr(self, "_faiss", None)
        if index is None or index.ntotal != len(self.X_):
            index = faiss.IndexFlatIP(self.X_.shape[1])
            index.add(self.X_)
            self._faiss = index
        return index

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        from extractors.common import normalize

        check_is_fitted(self, "X_")
        k = max(1, min(self.k, len(self.X_)))
        sims, nn = self._index().search(normalize(np.asarray(X, dtype=np.float32)), k)
        if self.weights == "uniform":
            votes = np.ones_like(sims, dtype=np.float64)
        else:  # shifted by the row max: exp(s/T) overflows nothing, the ratios are unchanged
            votes = np.exp((sims - sims[:, :1]) / self.temperature)
        votes = votes * self.class_weight_[self.y_[nn]]
        proba = np.zeros((len(X), len(self.classes_)), dtype=np.float64)
        np.add.at(proba, (np.arange(len(X))[:, None], self.y_[nn]), votes)
        return proba / proba.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_faiss", None)
        return state
