"""Batch tests of a scoring run against the model's training data: is this batch still the
distribution the model was trained and tested on?

Four tests, each a p-value, each alarming only when it is below `drift_alpha` AND its effect
is large enough to matter (an effect floor, since with a big batch any shift is significant):

- embedding drift: the kernel two-sample test of Gretton et al., "A Kernel Two-Sample Test"
  (JMLR 2012): unbiased MMD^2 with a Gaussian kernel on L2-normalised embeddings, bandwidth by
  the median heuristic, p-value from label permutations (exact in finite samples, whatever
  the kernel). Each side is subsampled to `drift_rows`, so the cost is bounded (one kernel
  matrix and one matrix product for all permutations). Chosen over a classifier two-sample
  test because it trains nothing (no fold, no hyperparameter to pick on a 20-image batch) and
  its permutation p-value is valid at any size. Its readable effect size is the AUC of the
  MMD witness function (mean kernel to the batch minus mean kernel to the reference, each
  point left out of its own side): the chance that a batch image looks more like the batch
  than a reference image does; 0.5 = no difference, 1.0 = every image tells them apart.
  The kept libraries that implement it do not fit: alibi-detect needs TensorFlow or PyTorch
  plus transformers, opencv, numba and numpy < 2; frouros pins matplotlib and numpy < 2.2;
  hyppo brings numba, statsmodels, pandas and autograd; the test is 30 lines of numpy.
- prediction drift: predicted-class shares against the training label shares: the total
  variation distance (the share of predictions that would have to change class) and the
  chi-square statistic's p-value by Monte-Carlo draws from the training shares (valid where
  classes expect fewer than 5 images, unlike the chi-square law).
- confidence: the batch's mean top probability against its value on the test split (the
  drop; one-sided one-sample t-test).
- OOD share: the share of images flagged out of distribution (extractors/monitor/ood.py)
  against the level; its p-value under the beta-binomial law that conformal flags follow
  given one calibration set (Bates et al. 2023), so it is exact however few calibration
  images there are.

False alarms: each test alarms on an in-distribution batch with probability at most
`drift_alpha`, so a batch alarms with probability at most 4 x drift_alpha (Bonferroni): 0.4%
at the default 0.001 (one false alarm in about 250 runs; measured in bench/monitor.py). The
permutation and beta-binomial tests are exact; the class-share and confidence tests compare
with the training labels and the test split's value, so their effect floors carry them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from extractors.common import normalize
from extractors.monitor.ood import KnnOOD
from extractors.settings import MonitorSettings

MC_DRAWS = 9999  # Monte-Carlo draws of the class-share test (p-value resolution 1e-4)
DEFAULTS = MonitorSettings()


def _subsample(x: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= rows else x[np.sort(rng.choice(len(x), rows, replace=False))]


def mmd_test(
    batch: np.ndarray,
    reference: np.ndarray,
    *,
    rows: int = DEFAULTS.drift_rows,
    permutations: int = DEFAULTS.drift_permutations,
    seed: int = DEFAULTS.seed,
) -> dict[str, Any]:
    """Kernel two-sample test (unbiased MMD^2, Gaussian kernel, median-heuristic bandwidth,
    permutation p-value) between `batch` and `reference` embeddings, each subsampled to
    `rows`; with the witness AUC as the readable effect size."""
    rng = np.random.default_rng(seed)
    x = normalize(_subsample(np.asarray(batch), rows, rng)).astype(np.float64)
    y = normalize(_subsample(np.asarray(reference), rows, rng)).astype(np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        return {"mmd2": float("nan"), "p_value": 1.0, "auc": 0.5, "rows": [m, n]}
    z = np.concatenate([x, y])
    d2 = np.maximum(2.0 - 2.0 * (z @ z.T), 0.0)  # unit vectors: |a - b|^2 = 2 - 2 cos
    bandwidth2 = float(np.median(d2[np.triu_indices(len(z), 1)])) or 1.0
    kern = np.exp(-d2 / (2.0 * bandwidth2))
    side = np.zeros((len(z), permutations + 1))
    side[:m, 0] = 1.0
    for j in range(1, permutations + 1):
        side[rng.permutation(len(z))[:m], j] = 1.0
    stat = _mmd2(kern, side, m, n)
    return {
        "mmd2": float(stat[0]),
        "p_value": float((1 + np.sum(stat[1:] >= stat[0])) / (1 + permutations)),
        "auc": _witness_auc(kern, m),
        "bandwidth": float(np.sqrt(bandwidth2)),
        "rows": [m, n],
    }


def _mmd2(kern: np.ndarray, side: np.ndarray, m: int, n: int) -> np.ndarray:
    """Unbiased MMD^2 of every column of `side` (1 = first sample), one matrix product."""
    ks = kern @ side
    kxx = np.einsum("ij,ij->j", side, ks) - m  # the kernel's diagonal is 1
    kxy = np.einsum("ij,ij->j", 1.0 - side, ks)
    kyy = kern.sum() - 2 * kxy - (kxx + m) - n
    return kxx / (m * (m - 1)) + kyy / (n * (n - 1)) - 2 * kxy / (m * n)


def _witness_auc(kern: np.ndarray, m: int) -> float:
    """AUC of the leave-one-out MMD witness (mean kernel to the batch minus to the
    reference) separating the batch's rows (first m) from the reference's."""
    n = len(kern) - m
    to_x = kern[:, :m].sum(axis=1)
    to_y = kern[:, m:].sum(axis=1)
    witness = np.concatenate(
        [(to_x[:m] - 1) / (m - 1) - to_y[:m] / n, to_x[m:] / m - (to_y[m:] - 1) / (n - 1)]
    )
    ranks = stats.rankdata(witness)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def class_shift(
    predicted: Sequence[Any] | np.ndarray,
    reference_shares: Mapping[Any, float],
    *,
    draws: int = MC_DRAWS,
    seed: int = 0,
) -> dict[str, Any]:
    """Predicted-class shares against the training label shares (counts or shares): total
    variation distance and a Monte-Carlo chi-square p-value. A class the training data lacks
    counts fully towards the distance."""
    classes = list(reference_shares)
    counts = dict.fromkeys(classes, 0)
    for label in np.asarray(predicted).tolist():
        counts[label] = counts.get(label, 0) + 1
    ref = np.array([float(reference_shares.get(c, 0.0)) for c in counts], np.float64)
    ref = ref / ref.sum()
    obs = np.array(list(counts.values()), np.float64)
    n = int(obs.sum())
    shares = obs / max(n, 1)
    tv = float(0.5 * np.abs(shares - ref).sum())
    if n == 0 or (ref == 0).any():
        p = 1.0 if n == 0 else 0.0  # a class never trained on: impossible under the null
    else:
        sims = np.random.default_rng(seed).multinomial(n, ref, size=draws)
        chi = ((obs - n * ref) ** 2 / (n * ref)).sum()
        chis = ((sims - n * ref) ** 2 / (n * ref)).sum(axis=1)
        p = float((1 + np.sum(chis >= chi - 1e-9)) / (1 + draws))
    return {
        "total_variation": tv,
        "p_value": p,
        "shares": {str(c): float(s) for c, s in zip(counts, shares, strict=True)},
    }


def confidence_drop(top_proba: np.ndarray, reference: float) -> dict[str, float]:
    """The batch's mean top probability against `reference` (its value on the test split):
    the drop and the one-sided t-test's p-value that the batch's mean is lower."""
    top = np.asarray(top_proba, np.float64)
    mean = float(top.mean()) if len(top) else float("nan")
    p = 1.0
    if len(top) >= 2 and top.std() > 0:
        p = float(stats.ttest_1samp(top, reference, alternative="less").pvalue)
    return {
        "mean_top_proba": mean,
        "reference": float(reference),
        "drop": reference - mean,
        "p_value": p,
    }


def flagged_share(flags: np.ndarray, null: tuple[float, float], level: float) -> dict[str, Any]:
    """The share of flagged images against what in-distribution images give: `null` = (a, b)
    of its Beta law (`KnnOOD.null_flag_share`); p-value from the beta-binomial law."""
    flags = np.asarray(flags, bool)
    n, hits = len(flags), int(flags.sum())
    p = float(stats.betabinom.sf(hits - 1, n, *null)) if n else 1.0
    return {
        "flagged": hits,
        "share": hits / n if n else 0.0,
        "level": level,
        "expected": null[0] / (null[0] + null[1]),
        "p_value": p,
    }


def batch_report(
    embeddings: np.ndarray,
    reference: np.ndarray,
    *,
    ood: KnnOOD | None = None,
    p_values: np.ndarray | None = None,
    predicted: Sequence[Any] | np.ndarray | None = None,
    label_shares: Mapping[Any, float] | None = None,
    top_proba: np.ndarray | None = None,
    reference_top_proba: float | None = None,
    settings: MonitorSettings | None = None,
) -> dict[str, Any]:
    """Every batch figure of a scoring run, `alarm` and its `reasons`.

    embeddings: the batch's; reference: the training distribution's (the val split, or a
    sample of train). ood: the fitted detector (with `p_values` when the run computed them
    already). predicted + label_shares: predicted classes and the training label counts or
    shares. top_proba + reference_top_proba: each image's top probability and the mean on
    the test split. Parts whose inputs are missing are left out."""
    s = settings or DEFAULTS
    report: dict[str, Any] = {"images": len(embeddings), "settings": s.as_dict()}
    reasons: list[str] = []

    def judge(name: str, part: dict[str, Any], effect: float, floor: float, says: str) -> None:
        report[name] = part
        part["alarm"] = bool(part["p_value"] < s.drift_alpha and effect >= floor)
        if part["alarm"]:
            reasons.append(f"{says} (p = {part['p_value']:.2g})")

    emb = mmd_test(
        embeddings, reference, rows=s.drift_rows, permutations=s.drift_permutations, seed=s.seed
    )
    judge(
        "embedding_drift",
        emb,
        emb["auc"],
        s.min_drift_auc,
        f"embeddings drifted: witness AUC {emb['auc']:.2f}",
    )
    if ood is not None:
        p = ood.p_values(embeddings) if p_values is None else np.asarray(p_values)
        part = flagged_share(p <= s.ood_level, ood.null_flag_share(s.ood_level), s.ood_level)
        judge(
            "ood",
            part,
            part["share"] / s.ood_level,
            s.min_ood_ratio,
            f"{part['share']:.1%} of images out of distribution (level {s.ood_level:g})",
        )
    if predicted is not None and label_shares is not None:
        part = class_shift(predicted, label_shares, seed=s.seed)
        judge(
            "prediction_drift",
            part,
            part["total_variation"],
            s.min_class_shift,
            f"predicted classes shifted: total variation {part['total_variation']:.2f}",
        )
    if top_proba is not None and reference_top_proba is not None:
        part = confidence_drop(top_proba, reference_top_proba)
        judge(
            "confidence",
            part,
            part["drop"],
            s.min_confidence_drop,
            f"mean top probability fell by {part['drop']:.2f}",
        )
    report.update(alarm=bool(reasons), reasons=reasons)
    return report
