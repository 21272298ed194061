"""The torch L-BFGS logistic regression (used on GPUs) agrees with scikit-learn's, on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from heads.torch_linear import TorchLinearSVC, TorchLogisticRegression


def _data(n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1.0, (n_classes, 12))
    X = np.concatenate([rng.normal(c, 1.5, (40, 12)) for c in centers])
    y = np.repeat([f"k{i}" for i in range(n_classes)], 40)
    return X, y


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0])
def test_same_probabilities_as_scikit_learn(n_classes: int, C: float) -> None:
    X, y = _data(n_classes)
    ref = LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(X, y)
    ours = TorchLogisticRegression(C=C, tol=1e-9, device="cpu").fit(X, y)
    assert ours.coef_.shape == ref.coef_.shape  # binary: one weight vector, like scikit-learn
    assert np.abs(ours.predict_proba(X) - ref.predict_proba(X)).max() < 2e-3
    assert (ours.predict(X) == ref.predict(X)).all()


def test_balanced_class_weights_match_scikit_learn() -> None:
    X, y = _data(3)
    keep = np.r_[0:40, 40:50, 80:90]
    X, y = X[keep], y[keep]
    ref = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000, tol=1e-10).fit(X, y)
    ours = TorchLogisticRegression(C=1.0, class_weight="balanced", tol=1e-9, device="cpu")
    assert np.abs(ours.fit(X, y).predict_proba(X) - ref.predict_proba(X)).max() < 2e-3


def test_warm_start_reaches_the_same_solution() -> None:
    X, y = _data(4)
    cold = TorchLogisticRegression(C=1.0, tol=1e-9, device="cpu").fit(X, y)
    warm = TorchLogisticRegression(C=0.01, tol=1e-9, warm_start=True, device="cpu").fit(X, y)
    warm.set_params(C=1.0).fit(X, y)
    assert np.abs(warm.predict_proba(X) - cold.predict_proba(X)).max() < 1e-3


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0])
def test_linear_svc_matches_liblinear(n_classes: int, C: float) -> None:
    from sklearn.svm import LinearSVC

    X, y = _data(n_classes)
    ref = LinearSVC(C=C, tol=1e-10, max_iter=200000).fit(X, y)
    ours = TorchLinearSVC(C=C, tol=1e-9, device="cpu").fit(X, y)
    assert ours.coef_.shape == ref.coef_.shape
    d_ref, d_ours = ref.decision_function(X), ours.decision_function(X)
    assert np.abs(d_ours - d_ref).max() < 2e-3 * max(1.0, np.abs(d_ref).max())
    assert (ours.predict(X) == ref.predict(X)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fit_agrees_with_scikit_learn() -> None:
    X, y = _data(4)
    ref = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(X, y)
    ours = TorchLogisticRegression(C=1.0, device="cuda").fit(X, y)
    assert np.abs(ours.predict_proba(X) - ref.predict_proba(X)).max() < 5e-3


def test_saved_with_skops_and_loaded_as_a_trusted_head(tmp_path) -> None:
    from heads.persist import load_head, save_head

    X, y = _data(3)
    model = TorchLogisticRegression(C=1.0, device="cpu").fit(X, y)
    est, _ = load_head(save_head(model, {}, tmp_path / "torch_logreg.skops"))
    assert (est.predict(X) == model.predict(X)).all()
