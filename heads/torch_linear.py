"""Linear heads fitted with torch's L-BFGS: scikit-learn's models and objectives, all classes in
one matrix product (fast on a GPU, and on many CPU cores where liblinear uses one).

TorchLogisticRegression, as `LogisticRegression(penalty="l2", solver="lbfgs")`:

    min_W,b  C * sum_i s_i * loss(x_i W + b, y_i)  +  ||W||^2 / 2        (b not penalised)

with the softmax cross-entropy for 3 or more classes, and for 2 classes scikit-learn's binary
form (one weight vector, logistic loss), which is not the same as a 2-class softmax.

TorchLinearSVC, as `LinearSVC()` (liblinear's primal: squared hinge, one-vs-rest, the intercept
a feature of value 1 and penalised like the weights):

    min_W,b  C * sum_i s_i * sum_k max(0, 1 - t_ik (x_i w_k + b_k))^2  +  (||W||^2 + ||b||^2) / 2

with t_ik = +1 for the true class and -1 for the others (one column for 2 classes). Squared
hinge is differentiable, so L-BFGS solves it exactly as it does the logistic loss.

`s_i` are class weights ("balanced": n / (n_classes * count)). Fitted state and predictions are
NumPy, so a head fitted on a GPU is saved with skops and used on any machine.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

FLOAT64_MAX_ELEMENTS = 2_000_000  # inputs up to this many numbers are fitted in float64 on CPU


class _TorchLinear(ClassifierMixin, BaseEstimator):
    """Shared L-BFGS fit of a linear model W, b; subclasses give the loss."""

    penalise_intercept = False
    _parameter_constraints: ClassVar[dict] = {
        "C": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "class_weight": [StrOptions({"balanced"}), dict, None],
        "warm_start": ["boolean"],
        "device": [str],
    }

    def __init__(
        self,
        C: float = 1.0,
        max_iter: int = 500,
        tol: float = 1e-5,
        class_weight: str | dict | None = None,
        warm_start: bool = False,
        device: str = "auto",
    ):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight
        self.warm_start = warm_start
        self.device = device

    def _loss(self, z: torch.Tensor, y: torch.Tensor, binary: bool) -> torch.Tensor:
        raise NotImplementedError

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: np.ndarray, y: np.ndarray) -> _TorchLinear:
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        if self.device == "auto":
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            dev = torch.device(self.device)
        classes, y_idx = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes in the data, but "
                f"the data contain only one class: {classes[0]!r}"
            )
        # float64 matches scikit-learn to the last digits on small data; float32 is twice as
        # fast and what a GPU is built for.
        small = X.size <= FLOAT64_MAX_ELEMENTS
        dtype = torch.float64 if dev.type == "cpu" and small else torch.float32
        Xt = torch.tensor(X, dtype=dtype, device=dev)  # a copy: X may be a read-only memmap
        yt = torch.as_tensor(y_idx, device=dev)
        cw = compute_class_weight(self.class_weight, classes=classes, y=y)
        sw = torch.as_tensor(cw[y_idx], dtype=dtype, device=dev)
        binary = len(classes) == 2
        out = 1 if binary else len(classes)
        W = torch.zeros(Xt.shape[1], out, dtype=dtype, device=dev)
        b = torch.zeros(out, dtype=dtype, device=dev)
        previous = getattr(self, "coef_", None) if self.warm_start else None
        if previous is not None and previous.shape == (out, Xt.shape[1]):
            W = torch.as_tensor(previous.T.copy(), dtype=dtype, device=dev)
            b = torch.as_tensor(self.intercept_.copy(), dtype=dtype, device=dev)
        W.requires_grad_(True)
        b.requires_grad_(True)
        # Divided by C * sum(s): the same minimiser, numbers of order 1 for L-BFGS's tolerances.
        scale = 1.0 / (float(self.C) * float(sw.sum()))

        def objective() -> torch.Tensor:
            loss = self._loss(Xt @ W + b, yt, binary)
            reg = (W * W).sum() + ((b * b).sum() if self.penalise_intercept else 0.0)
            return (sw * loss).sum() / sw.sum() + 0.5 * scale * reg

        opt = torch.optim.LBFGS(
            [W, b],
            lr=1.0,
            max_iter=self.max_iter,
            tolerance_grad=self.tol,
            tolerance_change=1e-12,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = objective()
            value.backward()
            return value

        opt.step(closure)
        self.classes_ = classes
        self.coef_ = W.detach().T.cpu().numpy().astype(np.float64)
        self.intercept_ = b.detach().cpu().numpy().astype(np.float64)
        self.n_features_in_ = Xt.shape[1]
        self.n_iter_ = np.array([opt.state_dict()["state"].get(0, {}).get("n_iter", 0)])
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        z = X @ self.coef_.T + self.intercept_
        return z[:, 0] if z.shape[1] == 1 else z

    def predict(self, X: np.ndarray) -> np.ndarray:
        z = self.decision_function(X)
        return self.classes_[(z > 0).astype(int) if z.ndim == 1 else z.argmax(axis=1)]


class TorchLogisticRegression(_TorchLinear):
    """Drop-in for scikit-learn's multinomial L-BFGS logistic regression, fitted with torch."""

    def _loss(self, z: torch.Tensor, y: torch.Tensor, binary: bool) -> torch.Tensor:
        if binary:
            return F.softplus(-(2 * y - 1).to(z.dtype) * z[:, 0])
        return F.cross_entropy(z, y, reduction="none")

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = self.decision_function(X)
        if z.ndim == 1:
            p = 1.0 / (1.0 + np.exp(-z))
            return np.stack([1 - p, p], axis=1)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


class TorchLinearSVC(_TorchLinear):
    """Drop-in for scikit-learn's `LinearSVC()` (squared hinge, one-vs-rest), fitted with torch:
    all classes at once instead of liblinear's one class at a time on one core."""

    penalise_intercept = True

    def _loss(self, z: torch.Tensor, y: torch.Tensor, binary: bool) -> torch.Tensor:
        if binary:
            t = (2 * y - 1).to(z.dtype)[:, None]
        else:
            t = -torch.ones_like(z)
            t[torch.arange(len(y), device=z.device), y] = 1.0
        return (F.relu(1 - t * z) ** 2).sum(dim=1)
