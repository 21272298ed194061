"""Out-of-distribution score of each scored image against a model's training images.

The raw score is the deep nearest-neighbour distance of Sun et al., "Out-of-Distribution
Detection with Deep Nearest Neighbors" (ICML 2022): one minus the cosine similarity of the
k-th nearest training image, on L2-normalised embeddings (FAISS inner product). It needs no
density model and no labels, and the store's own index answers it at any size.

A raw distance means something different on every data set (tight digits, loose photos), so
it is calibrated: the same statistic is computed for held-out images of the training
distribution (the store's val split, never in the reference) and each new image gets the
conformal p-value (Vovk et al., "Algorithmic Learning in a Random World", 2005; Bates et al.,
"Testing for outliers with conformal p-values", Annals of Statistics 2023)

    p = (1 + #{calibration scores >= s}) / (1 + n_calibration)

which is uniform (super-uniform) for an image from the training distribution, whatever the
data set: flagging p <= level flags at most `level` of in-distribution images. The column
`ood_score` is the calibrated percentile 1 - p (in [0, 1), higher = more unusual) and `ood`
the flag. Conditional on one calibration set the flagged share of in-distribution images is
Beta(l, n + 1 - l) distributed with l = floor(level * (n + 1)) (Bates et al., section 3),
which `null_flag_share` returns for the batch test (extractors/monitor/drift.py).
"""

from __future__ import annotations

import math
from typing import Any, Self

import faiss
import numpy as np

from extractors.common import HeadstartError, normalize
from extractors.index.ann import AnnIndex
from extractors.index.kinds import kind_of

SEARCH_ROWS = 4096  # queries per FAISS call (bounded memory for the (n, k) results)


class OODError(HeadstartError, ValueError):
    """An OOD detector asked for what its data cannot give (too few rows, not fitted)."""


class KnnOOD:
    """Deep-kNN out-of-distribution detector with conformal p-values (scikit-learn style:
    parameters in `__init__`, `fit` returns self, fitted state ends in `_`).

    k: the neighbour whose cosine distance is the score (Sun et al. use k = 50 on ImageNet
    and find the score insensitive to k over a wide range; 10 suits stores of a few hundred
    images a class and up)."""

    def __init__(self, k: int = 10) -> None:
        self.k = k

    def __repr__(self) -> str:
        return f"KnnOOD(k={self.k})"

    def fit(
        self,
        train_vectors: np.ndarray | None,
        calibration_vectors: np.ndarray,
        *,
        index: faiss.Index | AnnIndex | None = None,
        allowed_ids: np.ndarray | None = None,
        calibration_ids: np.ndarray | None = None,
    ) -> Self:
        """Reference = `train_vectors` (an exact inner-product index over them), or an existing
        `index` (the store's: `Store.index(mmap=True)`). Calibration = held-out images of the
        training distribution (the val split). Where the index holds the calibration rows:
        either `allowed_ids` restricts it to the train rows (filtered inside FAISS: exact, but
        each query pays the filter, 4x at 1M rows in bench/monitor.py), or `calibration_ids`
        (their ids in the index) lets each calibration row leave itself out, the reference
        being every row (leave-one-out: a new image's neighbours are drawn from the same rows,
        so its p-value stays valid up to one row in n; the unfiltered search's cost)."""
        if self.k < 1:
            raise OODError(f"k must be at least 1, not {self.k}")
        if index is None:
            if train_vectors is None or not len(train_vectors):
                raise OODError("an OOD reference needs training vectors or an index")
            ref = normalize(train_vectors)
            index = faiss.IndexFlatIP(ref.shape[1])
            index.add(ref)
        if allowed_ids is not None and not isinstance(index, AnnIndex):
            index = AnnIndex(index, kind=kind_of(faiss.downcast_index(index)))
        self.index_ = index
        self.allowed_ids_ = None if allowed_ids is None else np.asarray(allowed_ids, np.int64)
        n_ref = index.ntotal if allowed_ids is None else len(self.allowed_ids_)
        if n_ref < self.k:
            raise OODError(f"the OOD reference holds {n_ref} images, fewer than k = {self.k}")
        self.n_reference_ = int(n_ref)
        if not len(calibration_vectors):
            raise OODError("an OOD detector needs held-out calibration images (the val split)")
        if calibration_ids is None:
            calibration = self.score(calibration_vectors)
        else:
            calibration = self.score(calibration_vectors, np.asarray(calibration_ids, np.int64))
        self.calibration_scores_ = np.sort(calibration)
        return self

    @classmethod
    def from_store(
        cls, store: Any, k: int = 10, reference: str | None = "train", calibration: str = "val"
    ) -> KnnOOD:
        """Fitted on a store (extractors/store/store.py) and its index, calibrated on the rows
        of split `calibration`; the reference is the rows of split `reference` (filtered
        inside FAISS), or with `reference=None` every row, each calibration row leaving itself
        out (no filter: the fast path at 1M rows)."""
        vectors, meta = store.arrays(where_labelled=False)
        split = np.asarray(meta["split"].to_numpy(zero_copy_only=False))
        ids = meta["id"].to_numpy()
        held = split == calibration
        if reference is None:
            return cls(k).fit(
                None, vectors[held], index=store.index(mmap=True), calibration_ids=ids[held]
            )
        allowed = np.sort(ids[split == reference])
        return cls(k).fit(None, vectors[held], index=store.index(mmap=True), allowed_ids=allowed)

    @property
    def n_calibration(self) -> int:
        self._check_fitted()
        return len(self.calibration_scores_)

    def score(self, vectors: np.ndarray, own_ids: np.ndarray | None = None) -> np.ndarray:
        """Raw OOD score of each row: 1 - cosine similarity of its k-th nearest reference image
        (in [0, 2]; higher = further from the training data). `own_ids`: the rows' ids in the
        reference, each left out of its own neighbours."""
        self._check_fitted(calibrated=False)
        q = normalize(vectors)
        out = np.empty(len(q), np.float32)
        for start in range(0, len(q), SEARCH_ROWS):
            own = None if own_ids is None else own_ids[start : start + SEARCH_ROWS]
            sims = self._search(q[start : start + SEARCH_ROWS], own)
            out[start : start + len(sims)] = 1.0 - sims
        return out

    def _search(self, q: np.ndarray, own: np.ndarray | None) -> np.ndarray:
        """Cosine similarity of each query's k-th nearest reference image other than its own
        row (missing: -1)."""
        k = self.k + (own is not None)
        if isinstance(self.index_, AnnIndex):
            sims, ids = self.index_.search(q, k, self.allowed_ids_)
        else:
            sims, ids = self.index_.search(q, k)
        kept = ids >= 0
        if own is not None:
            kept &= ids != own[:, None]
        at = np.argmax(np.cumsum(kept, axis=1) >= self.k, axis=1)  # the k-th kept neighbour
        found = kept[np.arange(len(q)), at] & (kept.sum(axis=1) >= self.k)
        return np.clip(np.where(found, sims[np.arange(len(q)), at], -1.0), -1.0, 1.0)

    def p_values(self, vectors: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
        """Conformal p-value of each row (1 + #{calibration >= s}) / (1 + n); pass `scores`
        (from `score`) to skip the search."""
        self._check_fitted()
        s = self.score(vectors) if scores is None else np.asarray(scores, np.float32)
        at_least = len(self.calibration_scores_) - np.searchsorted(
            self.calibration_scores_, s, side="left"
        )
        return (1.0 + at_least) / (1.0 + len(self.calibration_scores_))

    def flag(self, vectors: np.ndarray, level: float = 0.01) -> np.ndarray:
        """Whether each row is out of distribution at `level` (p <= level)."""
        self.check_level(level)
        return self.p_values(vectors) <= level

    def columns(self, vectors: np.ndarray, level: float = 0.01) -> dict[str, np.ndarray]:
        """The scoring table's columns: `ood_score` = 1 - p (the calibrated percentile among
        held-out training images; uniform on in-distribution images) and `ood` (p <= level)."""
        self.check_level(level)
        return columns_of(self.p_values(vectors), level)

    def check_level(self, level: float) -> None:
        """Refuse a level the calibration set is too small to flag at (p >= 1 / (n + 1))."""
        n = self.n_calibration
        if not 0.0 < level < 1.0:
            raise OODError(f"the OOD level must be in (0, 1), not {level}")
        if math.floor(level * (n + 1)) < 1:
            need = math.ceil(1.0 / level) - 1
            raise OODError(
                f"flagging at level {level} needs at least {need} calibration images "
                f"(held-out training images); this detector has {n}"
            )

    def null_flag_share(self, level: float) -> tuple[float, float]:
        """(a, b) of the Beta law of the share of in-distribution images flagged at `level`,
        given this calibration set's randomness: Beta(l, n + 1 - l), l = floor(level (n + 1));
        its mean l / (n + 1) <= level."""
        self.check_level(level)
        n = self.n_calibration
        low = math.floor(level * (n + 1))
        return float(low), float(n + 1 - low)

    def _check_fitted(self, calibrated: bool = True) -> None:
        if not hasattr(self, "index_") or (calibrated and not hasattr(self, "calibration_scores_")):
            raise OODError("the OOD detector is not fitted: call fit() first")


def columns_of(p: np.ndarray, level: float) -> dict[str, np.ndarray]:
    """The scoring table's columns from conformal p-values: `ood_score` = 1 - p and `ood`
    (p <= level)."""
    return {"ood_score": (1.0 - p).astype(np.float64), "ood": p <= level}
