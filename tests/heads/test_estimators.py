"""Our estimators against scikit-learn's own conformance suite (`parametrize_with_checks`):
input validation (NaN, inf, lengths, sparse), fitted state, class weights, pickling,
idempotent fits, no state changed by predict."""

from __future__ import annotations

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from heads.knn import FaissKNNClassifier
from heads.torch_linear import TorchLinearSVC, TorchLogisticRegression

ESTIMATORS = [
    FaissKNNClassifier(k=5),
    TorchLogisticRegression(device="cpu"),
    TorchLinearSVC(device="cpu"),
]


@parametrize_with_checks(ESTIMATORS)
def test_estimator_conforms_to_scikit_learn(estimator, check) -> None:
    check(estimator)


def test_nan_embeddings_are_refused_not_trained_on() -> None:
    import numpy as np

    X = np.random.default_rng(0).standard_normal((20, 4))
    X[3, 1] = np.nan
    for est in ESTIMATORS:
        with pytest.raises(ValueError, match="NaN"):
            est.fit(X, np.arange(20) % 2)
