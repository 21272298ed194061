"""Classical heads as scikit-learn estimators, each with the hyperparameter grid it is tuned on.

Every head is `Pipeline([("pre", <preprocessing>), ("clf", <classifier>)])`, so `get_params()`
tells MLflow everything. The preprocessing is itself a hyperparameter (`pre`):

  none        the embedding as extracted
  standardize zero mean, unit variance per dimension
  pca_whiten  PCA keeping 99% of the variance, whitened (decorrelated, unit variance)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import SVC

from heads.knn import FaissKNNClassifier
from heads.settings import HEAD_NAMES

PRE = ("standardize", "pca_whiten", "none")
RBF_MAX_TRAIN_ROWS = 5000  # an RBF SVM costs O(n^2) memory and O(n^2..n^3) time


def preprocessing(name: str, seed: int = 0) -> BaseEstimator:
    """The `pre` step by name."""
    if name == "standardize":
        return StandardScaler()
    if name == "pca_whiten":
        # A variance fraction rather than a count: valid on any number of rows (calibration
        # folds fit on fewer), and the noisiest directions are not blown up by whitening.
        return PCA(n_components=0.99, whiten=True, svd_solver="full", random_state=seed)
    if name == "none":
        return FunctionTransformer()  # identity, and serialisable by skops
    raise ValueError(f"unknown preprocessing {name!r}; choose from {', '.join(PRE)}")


def _logreg(C: float = 1.0, class_weight: str | None = None, seed: int = 0) -> BaseEstimator:
    # Multinomial (softmax) with L-BFGS, as in the linear-probe papers; warm-started in sweeps.
    # On a GPU the same model and objective in torch (checked against scikit-learn in tests).
    if gpu_available():
        from heads.torch_linear import TorchLogisticRegression

        return TorchLogisticRegression(C=C, max_iter=1000, class_weight=class_weight)
    return LogisticRegression(
        C=C, max_iter=1000, tol=1e-4, class_weight=class_weight, random_state=seed
    )


def _linear_svm(C: float = 1.0, class_weight: str | None = None, seed: int = 0) -> BaseEstimator:
    # LinearSVC's model and objective solved by L-BFGS for all classes at once (liblinear fits
    # the one-vs-rest problems one by one on one core: ~50 s a fit at 12k x 1280 x 20 classes).
    from heads.torch_linear import TorchLinearSVC

    return TorchLinearSVC(C=C, class_weight=class_weight)


def _rbf_svm(
    C: float = 1.0, gamma: float = 1.0, class_weight: str | None = None, seed: int = 0
) -> BaseEstimator:
    # On L2-normalised vectors ||a-b||^2 = 2 - 2 cos(a, b), so gamma has the same meaning for
    # every backbone and dimension.
    return make_pipeline(
        Normalizer(),
        SVC(C=C, kernel="rbf", gamma=gamma, class_weight=class_weight, random_state=seed),
    )


def _knn(
    k: int = 10, weights: str = "similarity", class_weight: str | None = None, seed: int = 0
) -> BaseEstimator:
    return FaissKNNClassifier(k=k, weights=weights, class_weight=class_weight)


def gpu_available() -> bool:
    """CUDA present (torch is imported only to ask)."""
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class HeadSpec:
    """How to build a head's classifier and the grid it is swept over on validation.

    `grid` maps each classifier parameter to its values; every combination is tried for every
    `pre`. `warm_start` heads are swept in grid order reusing the previous solution.
    """

    name: str
    build: Callable[..., BaseEstimator]
    grid: dict[str, tuple[Any, ...]]
    description: str
    calibrate: bool = False  # no predict_proba of its own: sigmoid-calibrated in the final fit
    warm_start: bool = False
    max_train_rows: int | None = None


def _in_declared_order(specs: tuple[HeadSpec, ...]) -> dict[str, HeadSpec]:
    """The heads by name, in the order of heads.settings.HEAD_NAMES (the one list of names)."""
    by_name = {spec.name: spec for spec in specs}
    if set(by_name) != set(HEAD_NAMES):
        raise ImportError(
            f"heads.settings.HEAD_NAMES {HEAD_NAMES} and the heads specified here "
            f"{tuple(by_name)} differ: declare each head in both"
        )
    return {name: by_name[name] for name in HEAD_NAMES}


HEADS: dict[str, HeadSpec] = _in_declared_order(
    (
        HeadSpec(
            "logreg",
            _logreg,
            {"C": tuple(float(c) for c in np.logspace(-6, 5, 12))},
            "multinomial logistic regression (L-BFGS), C swept 1e-6..1e5 with warm starts",
            warm_start=True,
        ),
        HeadSpec(
            "linear_svm",
            _linear_svm,
            {"C": tuple(float(c) for c in np.logspace(-4, 1, 6))},
            "linear SVM (LinearSVC's squared-hinge objective, L-BFGS over all classes at once), "
            "C swept with warm starts, sigmoid-calibrated probabilities",
            calibrate=True,
            warm_start=True,
        ),
        HeadSpec(
            "rbf_svm",
            _rbf_svm,
            {"C": (0.1, 1.0, 10.0, 100.0), "gamma": (0.5, 1.0, 2.0, 5.0)},
            f"RBF SVM on L2-normalised features, C x gamma; only up to {RBF_MAX_TRAIN_ROWS} "
            "training rows",
            calibrate=True,
            max_train_rows=RBF_MAX_TRAIN_ROWS,
        ),
        HeadSpec(
            "knn",
            _knn,
            {"k": (1, 3, 5, 10, 20, 50), "weights": ("uniform", "similarity")},
            "cosine k-NN over FAISS, plain or similarity-weighted votes (T=0.07, as DINOv2)",
        ),
    )
)


def build_head(
    name: str,
    pre: str = "standardize",
    class_weight: str | None = None,
    seed: int = 0,
    **params: Any,
) -> Pipeline:
    """A fresh, unfitted head by name: `Pipeline(pre -> clf)`."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose from {', '.join(HEADS)}")
    clf = HEADS[name].build(class_weight=class_weight, seed=seed, **params)
    return Pipeline([("pre", preprocessing(pre, seed)), ("clf", clf)])


def calibrated(estimator: BaseEstimator, y: np.ndarray) -> BaseEstimator:
    """Sigmoid calibration over up to 3 folds (fewer when a class is that small)."""
    n_min = int(np.unique(y, return_counts=True)[1].min())
    if n_min < 2:
        return estimator  # too few to calibrate: decision scores are used for ranking
    return CalibratedClassifierCV(estimator, method="sigmoid", cv=min(3, n_min), ensemble=False)


def class_scores(estimator: BaseEstimator, X: np.ndarray) -> np.ndarray:
    """Per-class scores: probabilities when the head has them, else a softmax of decisions."""
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(X)
    d = estimator.decision_function(X)
    if d.ndim == 1:  # binary: one margin for the second class
        d = np.stack([-d, d], axis=1)
    e = np.exp(d - d.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
