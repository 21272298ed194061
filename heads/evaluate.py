"""Evaluation protocol for heads on frozen embeddings.

Protocol (as in linear-probe evaluations): for each head, sweep its hyperparameter over a grid,
fitting on the train split and scoring accuracy on the validation split; take the best value
(ties go to the first, i.e. the strongest regularisation), refit on train+val with it, and
score once on the test split. The test split is never used for a choice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    top_k_accuracy_score,
)

from heads.classical import HEADS, build_head, calibrated, class_scores

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy")


@dataclass
class Splits:
    """Embeddings and labels per split."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray

    @property
    def classes(self) -> np.ndarray:
        return np.unique(np.concatenate([self.y_train, self.y_val, self.y_test]))


@dataclass
class HeadResult:
    """A fitted head with its sweep, chosen parameters and test metrics."""

    name: str
    estimator: BaseEstimator
    params: dict[str, Any]
    val_scores: dict[str, float]
    val_accuracy: float
    metrics: dict[str, float]
    confusion: np.ndarray
    classes: list[str]
    report: str
    fit_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def score(estimator: BaseEstimator, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Test metrics with the same names for every head (top-5 only with more than 5 classes)."""
    pred = estimator.predict(X)
    out = {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
    }
    classes = estimator.classes_
    if len(classes) > 5:
        scores = class_scores(estimator, X)
        out["top5_accuracy"] = float(top_k_accuracy_score(y, scores, k=5, labels=classes))
    return out


def fit_head(name: str, splits: Splits, seed: int = 0) -> HeadResult:
    """Run the protocol above for one head."""
    spec = HEADS[name]
    t0 = time.perf_counter()
    val_scores: dict[str, float] = {}
    best_value, best = None, -1.0
    for value in spec.grid:
        est = build_head(name, seed=seed, **{spec.param: value})
        est.fit(splits.X_train, splits.y_train)
        acc = float(accuracy_score(splits.y_val, est.predict(splits.X_val)))
        val_scores[str(value)] = acc
        if acc > best:
            best_value, best = value, acc
    X_fit = np.concatenate([splits.X_train, splits.X_val])
    y_fit = np.concatenate([splits.y_train, splits.y_val])
    final = build_head(name, seed=seed, **{spec.param: best_value})
    if spec.calibrate:
        final = calibrated(final, y_fit)
    final.fit(X_fit, y_fit)
    seconds = time.perf_counter() - t0
    classes = [str(c) for c in final.classes_]
    pred = final.predict(splits.X_test)
    return HeadResult(
        name=name,
        estimator=final,
        params={spec.param: best_value},
        val_scores=val_scores,
        val_accuracy=best,
        metrics=score(final, splits.X_test, splits.y_test),
        confusion=confusion_matrix(splits.y_test, pred, labels=final.classes_),
        classes=classes,
        report=classification_report(splits.y_test, pred, zero_division=0),
        fit_seconds=seconds,
    )
