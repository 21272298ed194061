"""Evaluation protocol for heads on frozen embeddings, and the metrics every model is scored by.

Protocol (the linear-probe protocol of Kornblith et al. 2019, CLIP and DINOv2's eval code):

1. For each head, sweep its grid (`HEADS[name].grid`) times the preprocessing options (`PRE`):
   fit on the **train** split, score on the **validation** split. Logistic regression walks C
   upwards reusing the previous solution (warm start), so the 12-point sweep costs little more
   than a few fits.
2. Take the best validation score: accuracy, or balanced accuracy when the classes are
   imbalanced (largest class more than 1.5x the smallest; then every head also gets balanced
   class weights). Ties go to the lower validation log loss, so the head with the better
   calibrated probabilities wins among equals, then to the earlier grid point.
3. Refit that configuration on **train + validation** (heads without probabilities of their own
   are sigmoid-calibrated here) and score it **once** on the **test** split.

The test split is never used for a choice. `score` gives the same metric names for every head
and for fine-tuned networks, so runs compare side by side.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from heads.classical import HEADS, PRE, build_head, calibrated, class_scores, preprocessing

METRICS = (
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "balanced_accuracy",
    "macro_f1",
    "top5_accuracy",
    "log_loss",
    "ece",
)
IMBALANCE_RATIO = 1.5
BOOTSTRAP = 1000
ECE_BINS = 15


class HeadSkipped(Exception):
    """A head that does not apply to this data (the message says why)."""


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
    """A fitted head (or fine-tuned network) with its sweep, choice and test metrics."""

    name: str
    estimator: BaseEstimator | None
    params: dict[str, Any]
    sweep: list[dict[str, Any]]  # one row per grid point: params, val_score, val_log_loss
    val_score: float  # the selection score of the chosen configuration
    selection_metric: str  # "accuracy" or "balanced_accuracy"
    metrics: dict[str, float]  # test metrics, names as in METRICS
    per_class: dict[str, dict[str, float]]
    confusion: np.ndarray
    classes: list[str]
    report: str
    fit_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    test_proba: np.ndarray | None = None  # rows of the test split, columns `classes`


def is_imbalanced(y: np.ndarray) -> bool:
    """Largest class more than IMBALANCE_RATIO times the smallest."""
    counts = np.unique(y, return_counts=True)[1]
    return bool(counts.max() > IMBALANCE_RATIO * counts.min())


def expected_calibration_error(y_idx: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: |accuracy - confidence| over equal-width confidence bins, weighted."""
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_idx
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def bootstrap_ci(
    correct: np.ndarray, n: int = BOOTSTRAP, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of a 0/1 vector (test accuracy)."""
    if len(correct) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(n, len(correct)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def score(
    y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray, seed: int = 0
) -> dict[str, float]:
    """Test metrics from class probabilities, with the same names for every model.

    top5_accuracy only with more than 5 classes. log_loss and ece use the probabilities as
    given (heads are calibrated, fine-tuned networks temperature-scaled on validation).
    """
    classes = np.asarray(classes)
    y_true = np.asarray(y_true)
    pred = classes[proba.argmax(axis=1)]
    y_idx = np.searchsorted(classes, y_true)
    lo, hi = bootstrap_ci((pred == y_true).astype(np.float64), seed=seed)
    out = {
        "accuracy": float(accuracy_score(y_true, pred)),
        "accuracy_ci_low": lo,
        "accuracy_ci_high": hi,
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "macro_f1": float(f1_score(y_true, pred, average="macro", zero_division=0)),
        "log_loss": _log_loss(y_true, proba, classes),
        "ece": expected_calibration_error(y_idx, proba),
    }
    if len(classes) > 5:
        out["top5_accuracy"] = float(top_k_accuracy_score(y_true, proba, k=5, labels=classes))
    return out


def per_class(y_true: np.ndarray, pred: np.ndarray, classes: np.ndarray) -> dict[str, dict]:
    """Precision, recall, F1 and support per class."""
    p, r, f, s = precision_recall_fscore_support(y_true, pred, labels=classes, zero_division=0)
    return {
        str(c): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "n": int(s[i])}
        for i, c in enumerate(classes)
    }


def scored_on_test(
    proba: np.ndarray,
    classes: np.ndarray,
    y_test: np.ndarray,
    seed: int = 0,
) -> dict[str, Any]:
    """The test-split part of a HeadResult: metrics, per-class table, confusion, report."""
    classes = np.asarray(classes)
    pred = classes[proba.argmax(axis=1)]
    return {
        "metrics": score(y_test, proba, classes, seed=seed),
        "per_class": per_class(y_test, pred, classes),
        "confusion": confusion_matrix(y_test, pred, labels=classes),
        "classes": [str(c) for c in classes],
        "report": classification_report(y_test, pred, labels=classes, zero_division=0),
        "test_proba": np.asarray(proba, dtype=np.float64),
    }


def paired_gain(
    new_correct: np.ndarray,
    old_correct: np.ndarray,
    seed: int = 0,
    rounds: int = 2000,
    level: float = 0.95,
) -> dict[str, float]:
    """Accuracy of a new model minus an old one's on the same test images, with a paired
    bootstrap interval: the images are resampled together, so each image's two outcomes stay
    paired and the interval is that test split's noise, not the two models' separately."""
    d = np.asarray(new_correct, float) - np.asarray(old_correct, float)
    n = len(d)
    if n == 0:
        raise ValueError("no test images in common")
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [
            d[rng.integers(0, n, (min(200, rounds - r), n))].mean(axis=1)
            for r in range(0, rounds, 200)
        ]
    )
    low, high = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {
        "images": float(n),
        "new_accuracy": float(np.mean(new_correct)),
        "old_accuracy": float(np.mean(old_correct)),
        "gain": float(d.mean()),
        "low": float(low),
        "high": float(high),
    }


def _grid(name: str) -> list[dict[str, Any]]:
    grid = HEADS[name].grid
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def _log_loss(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Log loss with probabilities floored at 1e-7 (k-NN gives exact zeros), renormalised."""
    p = np.clip(proba, 1e-7, 1)
    return float(log_loss(y, p / p.sum(axis=1, keepdims=True), labels=classes))


def _val_log_loss(est: BaseEstimator, X: np.ndarray, y: np.ndarray) -> float:
    return _log_loss(y, class_scores(est, X), est.classes_)


def sweep(
    name: str,
    splits: Splits,
    class_weight: str | None = None,
    selection: str = "accuracy",
    seed: int = 0,
    pre_options: tuple[str, ...] = PRE,
    tick: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Step 1 of the protocol: every (pre, grid point) fitted on train, scored on val."""
    spec = HEADS[name]
    metric = balanced_accuracy_score if selection == "balanced_accuracy" else accuracy_score
    rows = []
    for pre in pre_options:
        step = preprocessing(pre, seed).fit(splits.X_train)
        Xtr, Xva = step.transform(splits.X_train), step.transform(splits.X_val)
        clf = None
        for point in _grid(name):
            if clf is not None and spec.warm_start:
                clf.set_params(**point)
            else:
                clf = spec.build(class_weight=class_weight, seed=seed, **point)
                if spec.warm_start:
                    clf.set_params(warm_start=True)
            with warnings.catch_warnings():  # extreme grid points may stop early: expected
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(Xtr, splits.y_train)
            rows.append(
                {
                    "pre": pre,
                    **point,
                    "val_score": float(metric(splits.y_val, clf.predict(Xva))),
                    "val_log_loss": _val_log_loss(clf, Xva, splits.y_val),
                }
            )
            if tick is not None:
                tick()
    return rows


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Step 2: best val score; ties to lower val log loss, then the earlier grid point."""
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_score"], -rows[i]["val_log_loss"], -i))
    return rows[best]


def sweep_size(name: str) -> int:
    """Grid points a head's sweep fits (for progress bars)."""
    return len(_grid(name)) * len(PRE)


def fit_head(
    name: str,
    splits: Splits,
    seed: int = 0,
    balanced: bool | None = None,
    tick: Callable[[], None] | None = None,
) -> HeadResult:
    """Run the protocol above for one head. Raises HeadSkipped when it does not apply."""
    spec = HEADS[name]
    n_train = len(splits.y_train)
    if spec.max_train_rows is not None and n_train > spec.max_train_rows:
        raise HeadSkipped(
            f"{name} skipped: {n_train} training rows > {spec.max_train_rows} "
            "(its cost grows with the square of the rows); the linear heads cover this size"
        )
    if balanced is None:
        balanced = is_imbalanced(np.concatenate([splits.y_train, splits.y_val]))
    class_weight = "balanced" if balanced else None
    selection = "balanced_accuracy" if balanced else "accuracy"
    t0 = time.perf_counter()
    rows = sweep(name, splits, class_weight, selection, seed, tick=tick)
    best = choose(rows)
    params = {k: v for k, v in best.items() if k not in ("val_score", "val_log_loss")}
    X_fit = np.concatenate([splits.X_train, splits.X_val])
    y_fit = np.concatenate([splits.y_train, splits.y_val])
    final: BaseEstimator = build_head(name, class_weight=class_weight, seed=seed, **params)
    if spec.calibrate:
        final = calibrated(final, y_fit)
    final.fit(X_fit, y_fit)
    seconds = time.perf_counter() - t0
    test = scored_on_test(class_scores(final, splits.X_test), final.classes_, splits.y_test, seed)
    return HeadResult(
        name=name,
        estimator=final,
        params=params,
        sweep=rows,
        val_score=best["val_score"],
        selection_metric=selection,
        fit_seconds=seconds,
        extra={"class_weight": class_weight},
        **test,
    )
