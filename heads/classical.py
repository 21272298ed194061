"""Classical heads as scikit-learn estimators, each with the hyperparameter grid it is tuned on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC

from heads.knn import FaissKNNClassifier


@dataclass(frozen=True)
class HeadSpec:
    """How to build a head and which parameter to sweep on the validation split."""

    name: str
    build: Callable[..., BaseEstimator]
    param: str
    grid: tuple[Any, ...]
    description: str
    calibrate: bool = False  # wrap the final fit for probabilities (sigmoid, cross-validated)


def _logreg(C: float = 1.0, seed: int = 0) -> Pipeline:
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(C=C, max_iter=3000, random_state=seed)),
        ]
    )


def _svm(C: float = 1.0, seed: int = 0) -> Pipeline:
    return Pipeline(
        [
            ("l2", Normalizer()),
            ("clf", SVC(C=C, kernel="rbf", gamma="scale", random_state=seed)),
        ]
    )


def _knn(k: int = 10, seed: int = 0) -> FaissKNNClassifier:
    return FaissKNNClassifier(k=k, weights="similarity")


HEADS: dict[str, HeadSpec] = {
    "logreg": HeadSpec(
        "logreg",
        _logreg,
        "C",
        tuple(float(c) for c in np.logspace(-4, 3, 8)),
        "standardised features, multinomial logistic regression (L-BFGS)",
    ),
    "svm": HeadSpec(
        "svm",
        _svm,
        "C",
        (0.1, 1.0, 10.0, 100.0, 1000.0),
        "L2-normalised features, RBF SVM, sigmoid-calibrated probabilities",
        calibrate=True,
    ),
    "knn": HeadSpec(
        "knn",
        _knn,
        "k",
        (1, 3, 5, 10, 20),
        "cosine k-NN over FAISS, similarity-weighted votes (T=0.07)",
    ),
}


def calibrated(estimator: BaseEstimator, y: np.ndarray) -> BaseEstimator:
    """Sigmoid calibration over up to 3 folds (fewer when a class is that small)."""
    from sklearn.calibration import CalibratedClassifierCV

    n_min = int(np.unique(y, return_counts=True)[1].min())
    if n_min < 2:
        return estimator  # too few to calibrate: decision scores are used for ranking
    return CalibratedClassifierCV(estimator, method="sigmoid", cv=min(3, n_min), ensemble=False)


def class_scores(estimator: BaseEstimator, X: np.ndarray) -> np.ndarray:
    """Per-class scores for ranking: probabilities when the head has them, else decisions."""
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(X)
    return estimator.decision_function(X)


def build_head(name: str, seed: int = 0, **params: Any) -> BaseEstimator:
    """A fresh, unfitted head by name."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose from {', '.join(HEADS)}")
    return HEADS[name].build(seed=seed, **params)
