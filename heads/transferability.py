"""Transferability estimates: how well a frozen network's features will serve a labelled task,
scored from the train embeddings alone, in seconds, before any head is trained.

- LogME (You, Liu, Wang & Long, "LogME: Practical Assessment of Pre-trained Models for
  Transfer Learning", ICML 2021): the log evidence of a Bayesian linear model on the features,
  maximised over its prior precision alpha and noise precision beta by the paper's fixed-point
  iteration, fast over one SVD of the features; per sample, averaged over one-vs-rest targets.
- H-score (Bao, Li, Huang, Wang & Zheng, "An Information-Theoretic Approach to Transferability
  in Task Transfer Learning", ICIP 2019): tr(cov(f)^-1 cov(E[f|y])), regularised as by
  Ibrahim, Ponomareva & Mazumder ("Newer is not always better: Rethinking transferability
  metrics, their peculiarities, stability and performance", ECML-PKDD 2022):
  tr(cov_a(f)^-1 (1-a) cov(E[f|y])) with cov_a(f) the Ledoit-Wolf estimate at shrinkage a.
  The plain inverse saturates at C-1 whenever the samples are fewer than the dimensions, as
  train embeddings usually are.

Higher is better for both. Kept libraries were checked first: none on PyPI implements them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ITER = 100  # the fixed point converges in a few steps; this bounds a degenerate case
TOL = 1e-4  # relative change of alpha/beta at which the iteration stops


@dataclass(frozen=True)
class Evidence:
    """LogME's fit of one target: the evidence per sample at the maximising alpha and beta."""

    per_sample: float
    alpha: float
    beta: float


def log_evidence(features: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) of y = F w + e, w ~ N(0, I/alpha), e ~ N(0, I/beta) (the
    paper's eq. 2), from the spectrum of F: exact, and cheap once the spectrum is known."""
    f, y = np.asarray(features, np.float64), np.asarray(y, np.float64)
    basis, sigma = _spectrum(f)
    return _evidence(basis.T @ y, sigma, float(y @ y), f.shape, alpha, beta)


def _spectrum(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, s²) of F = U diag(s) Vᵀ, the zero singular values left out, from the smaller of
    the two Gram matrices: the eigenvectors of F Fᵀ when n <= d, else U = F V / s from the
    eigenproblem of FᵀF (as the paper's code does)."""
    n, d = f.shape
    sigma, vecs = np.linalg.eigh(f @ f.T if n <= d else f.T @ f)
    keep = sigma > sigma.max(initial=0.0) * 1e-12
    sigma = sigma[keep]
    return (vecs[:, keep] if n <= d else f @ (vecs[:, keep] / np.sqrt(sigma))), sigma


def _evidence(
    z: np.ndarray, sigma: np.ndarray, yy: float, shape: tuple[int, int], alpha: float, beta: float
) -> float:
    """The evidence from z = Uᵀy, the squared singular values and yᵀy: the paper's
    d/2 log a + n/2 log b - n/2 log 2pi - b/2 |y - Fm|² - a/2 |m|² - 1/2 log|A|,
    with A = aI + b FᵀF and m = b A⁻¹ Fᵀy written in the singular basis."""
    n, d = shape
    shrink = alpha / (alpha + beta * sigma)
    m2 = float(np.sum((beta * np.sqrt(sigma) * z / (alpha + beta * sigma)) ** 2))
    res2 = yy - float(z @ z) + float(np.sum((shrink * z) ** 2))
    logdet = float(np.sum(np.log(alpha + beta * sigma))) + (d - len(sigma)) * np.log(alpha)
    return float(
        d / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * res2
        - alpha / 2 * m2
        - logdet / 2
    )


def fit_evidence(features: np.ndarray, y: np.ndarray) -> Evidence:
    """LogME's fit of one real-valued target y (n) on features (n x d)."""
    f, y = np.asarray(features, np.float64), np.asarray(y, np.float64)
    basis, sigma = _spectrum(f)
    return _fit(basis.T @ y, sigma, float(y @ y), f.shape)


def _fit(z: np.ndarray, sigma: np.ndarray, yy: float, shape: tuple[int, int]) -> Evidence:
    """The paper's Algorithm 1: alpha <- gamma / |m|², beta <- (n - gamma) / |y - Fm|², with
    gamma = sum b·s_i / (a + b·s_i), from alpha = beta = 1 until alpha/beta settles."""
    n = shape[0]
    alpha, beta = 1.0, 1.0
    for _ in range(MAX_ITER):
        gamma = float(np.sum(beta * sigma / (alpha + beta * sigma)))
        m2 = float(np.sum((beta * np.sqrt(sigma) * z / (alpha + beta * sigma)) ** 2))
        res2 = yy - float(z @ z) + float(np.sum((alpha / (alpha + beta * sigma) * z) ** 2))
        new_alpha = gamma / max(m2, 1e-12)
        new_beta = max(n - gamma, 1e-12) / max(res2, 1e-12)
        done = abs(new_alpha / new_beta - alpha / beta) <= TOL * alpha / beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return Evidence(_evidence(z, sigma, yy, shape, alpha, beta) / n, alpha, beta)


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of features (n x d) for class labels (n): the maximised log evidence per sample,
    averaged over the one-vs-rest indicator targets of the classes. One spectrum of F serves
    every class. Higher is better; the values are comparable across networks on the same labels."""
    f = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    basis, sigma = _spectrum(f)
    fits = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        fits.append(_fit(basis.T @ y, sigma, float(y @ y), f.shape).per_sample)
    return float(np.mean(fits))


def h_score(features: np.ndarray, labels: np.ndarray, shrink: bool = True) -> float:
    """H-score, regularised: tr(cov_a(f)⁻¹ (1-a) cov(E[f|y])), cov_a the Ledoit-Wolf
    covariance at its shrinkage a (`shrink=False`: a = 0, the plain H-score of Bao et al.,
    for n well above d). Higher is better; at most C-1 for C classes, unshrunk."""
    from sklearn.covariance import ledoit_wolf

    f = np.asarray(features, np.float64)
    f = f - f.mean(axis=0)
    labels = np.asarray(labels)
    g = np.zeros_like(f)
    for c in np.unique(labels):
        g[labels == c] = f[labels == c].mean(axis=0)
    cov_f, a = ledoit_wolf(f, assume_centered=True) if shrink else (f.T @ f / len(f), 0.0)
    cov_g = g.T @ g / len(f)
    return float(np.trace(np.linalg.solve(cov_f, (1 - a) * cov_g)))
