"""Auditing a labelled image set through its embeddings: wrong labels, outliers, near-duplicates.

The protocol:

- **label issues** come from out-of-sample class probabilities only: K-fold cross-validated
  probabilities (stratified, seeded) of the store's best head kind refitted with its chosen
  settings on the other folds, never a head's in-sample ones. cleanlab's confident learning
  (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels",
  JAIR 70, 2021: `cleanlab.filter.find_label_issues`) decides which rows are issues; each is
  scored 1 - cleanlab's self-confidence label quality (higher = more suspect) and suggests the
  most probable class. cleanlab's `estimate_noise_matrices` gives the estimated label-noise
  rate. Logistic regression on the raw embeddings is fitted on them centred (the training
  fold's mean taken off): the same model, since its intercept is not penalised
  (x.w + b = (x - m).w + (b + m.w)), found in about a tenth of L-BFGS's iterations (embeddings
  are far from zero mean; bench/audit.py).
- **outliers**: the mean cosine distance of a row to its k nearest other rows in the store's
  FAISS index (score in [0, 2], higher = further from everything); reported for the rows above
  the 99th percentile of that distance (at least one), with the nearest neighbour as `related`.
- **near-duplicates**: the `dedup` groups (extractors/store/dedup.py); every member but the first,
  scored by its similarity to the first (`related`).

Scores are comparable within an issue kind, not across kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from extractors.common import HeadstartError
from heads.classical import HEADS, build_head, calibrated, class_scores

FOLDS = 5
OUTLIER_QUANTILE = 0.99
OUTLIER_K = 10


class AuditError(HeadstartError, ValueError):
    """Data an audit cannot run on; the message says what to do."""


@dataclass
class LabelAudit:
    """Out-of-sample label issues of labelled rows (indices into them, most suspect first)."""

    rows: np.ndarray  # indices of the rows that are issues, most suspect first
    scores: np.ndarray  # 1 - label quality, per issue row
    suggested: list[str]  # the most probable class, per issue row
    noise_rate: float  # cleanlab's estimated fraction of wrong labels
    proba: np.ndarray  # out-of-sample probabilities of every labelled row
    classes: list[str]


def folds_for(y: np.ndarray) -> int:
    """The number of folds for `y`: FOLDS, fewer when the smallest class is smaller."""
    counts = np.unique(y, return_counts=True)[1]
    if counts.min() < 2:
        raise AuditError(
            "every class needs at least 2 labelled images for out-of-sample probabilities; "
            f"the smallest has {counts.min()}"
        )
    return int(min(FOLDS, counts.min()))


CENTRED = ("logreg", "linear_svm")  # linear heads: centring speeds their solver


def audit_head(head: str, params: dict[str, Any], y: np.ndarray, seed: int = 0) -> BaseEstimator:
    """The unfitted estimator each fold fits: `head` with its chosen settings (calibrated when
    the head is). A linear head on raw embeddings is fitted on them centred: L-BFGS then
    converges in about a tenth of the iterations. For logistic regression that is the same
    model (its intercept is not penalised); for the linear SVM nearly (its intercept is, as in
    liblinear): on the demo's digits, the same accuracy at a fifth of the time."""
    params = {k: v for k, v in params.items() if k not in ("feature", "best_epoch")}
    est = build_head(head, seed=seed, **params)
    if head in CENTRED and isinstance(est.named_steps["pre"], FunctionTransformer):
        est.steps[0] = ("pre", StandardScaler(with_std=False))  # centring only
    return calibrated(est, y) if HEADS[head].calibrate else est


def out_of_sample_proba(
    X: np.ndarray,
    y: np.ndarray,
    head: str,
    params: dict[str, Any],
    seed: int = 0,
    tick: Callable[[], None] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """K-fold cross-validated probabilities of `head` with `params` (its chosen settings):
    each row scored by a head that never saw it. `tick` is called after each fold."""
    folds = folds_for(y)
    est = audit_head(head, params, y, seed)
    classes = sorted(np.unique(y).tolist())
    proba = np.zeros((len(y), len(classes)))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        fitted = clone(est).fit(X[train], y[train])
        # probabilities, or decision scores softmaxed (class_scores), in `classes` order
        columns = np.searchsorted(classes, fitted.classes_)
        proba[np.ix_(test, columns)] = class_scores(fitted, X[test])
        if tick is not None:
            tick()
    return proba, [str(c) for c in classes]


def label_issues(y: np.ndarray, proba: np.ndarray, classes: list[str]) -> LabelAudit:
    """cleanlab's confident-learning issues among labelled rows, most suspect first."""
    from cleanlab.count import estimate_py_and_noise_matrices_from_probabilities
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[str(v)] for v in y])
    quality = get_label_quality_scores(labels, proba, method="self_confidence")
    rows = find_label_issues(labels, proba, return_indices_ranked_by="self_confidence")
    # noise[i, j] = P(given label i | true label j); the wrong-label rate is what is off the
    # diagonal, weighted by the estimated true-class prior.
    py, noise, _, _ = estimate_py_and_noise_matrices_from_probabilities(labels, proba)
    noise_rate = float(1 - np.sum(py * np.diag(noise)))
    return LabelAudit(
        rows=np.asarray(rows, np.int64),
        scores=1 - quality[rows],
        suggested=[classes[int(j)] for j in proba[rows].argmax(axis=1)],
        noise_rate=noise_rate,
        proba=proba,
        classes=classes,
    )


def outliers(distances: np.ndarray, quantile: float = OUTLIER_QUANTILE) -> tuple[np.ndarray, float]:
    """Rows whose mean distance to their nearest neighbours is above `quantile` of all (at
    least the single furthest one), furthest first; and the threshold used."""
    if not len(distances):
        return np.zeros(0, np.int64), 0.0
    cut = float(np.quantile(distances, quantile))
    rows = np.flatnonzero(distances > cut)
    if not len(rows):
        rows = np.array([int(np.argmax(distances))])
    return rows[np.argsort(-distances[rows], kind="stable")], cut
