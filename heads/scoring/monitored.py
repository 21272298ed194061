"""A scorer that also watches what it scores: each row's out-of-distribution score against the
model's training data (extractors/monitor/ood.py), and a bounded sample of the batch (its
embeddings, p-values, predicted classes and top probabilities) for the batch's drift tests
(extractors/monitor/drift.py), gathered as the writer scores part by part."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from extractors.common import HeadstartError
from extractors.monitor.ood import KnnOOD, columns_of
from extractors.store.layout import embedding_matrix


@dataclass
class Monitored:
    """`scorer` (classes, name, proba) with `ood_columns` for the predictions table and the
    batch it saw (`batch`): every row's p-value, prediction and top probability, and a seeded
    reservoir sample of at most `keep` embeddings (the drift test's own bound)."""

    scorer: Any
    fit: Callable[[], KnnOOD]  # the detector, fitted at the first part (never for "nothing new")
    level: float = 0.01
    keep: int = 1000
    seed: int = 0
    p_values: list[np.ndarray] = field(default_factory=list)
    raw: list[np.ndarray] = field(default_factory=list)  # distances: they rank past ties of p
    predicted: list[str] = field(default_factory=list)
    top: list[np.ndarray] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    _sample: np.ndarray | None = None
    _seen: int = 0
    _detector: KnnOOD | None = None
    unmeasured: str | None = None  # why the detector could not be fitted (columns left null)

    @property
    def detector(self) -> KnnOOD:
        if self._detector is None:
            self._detector = self.fit()
        return self._detector

    @property
    def classes(self) -> list[str]:
        return self.scorer.classes

    @property
    def name(self) -> str:
        return self.scorer.name

    def proba(self, rows: pa.Table) -> np.ndarray:
        return self.scorer.proba(rows)

    def ood_columns(self, rows: pa.Table, proba: np.ndarray) -> dict[str, np.ndarray]:
        """`ood_score` (1 - p: the percentile among held-out training images) and `ood`
        (p <= level) of each row, from its `embedding` column; the batch sample grows."""
        if self.unmeasured is None:
            try:
                self.detector.check_level(self.level)
            except HeadstartError as exc:
                self.unmeasured = str(exc)
        if self.unmeasured is not None:
            return {"ood_score": [None] * rows.num_rows, "ood": [None] * rows.num_rows}
        vectors = embedding_matrix(rows, "embedding")
        raw = self.detector.score(vectors)
        p = self.detector.p_values(vectors, scores=raw)
        self.p_values.append(p)
        self.raw.append(raw)
        self.predicted += [self.classes[j] for j in proba.argmax(axis=1)]
        self.top.append(proba.max(axis=1))
        self.paths += rows["path"].to_pylist()
        self._reservoir(vectors)
        return columns_of(p, self.level)

    def _reservoir(self, vectors: np.ndarray) -> None:
        """Algorithm R (Vitter, 1985): a uniform sample of every row seen, `keep` at most."""
        rng = np.random.default_rng(self.seed + self._seen)
        for v in vectors:
            if self._sample is None:
                self._sample = np.empty((self.keep, len(v)), np.float32)
            if self._seen < self.keep:
                self._sample[self._seen] = v
            else:
                j = int(rng.integers(0, self._seen + 1))
                if j < self.keep:
                    self._sample[j] = v
            self._seen += 1

    def batch(self) -> dict[str, Any]:
        """What the batch tests need: the embeddings sample, every p-value, predicted class
        and top probability, and the paths in scoring order."""
        n = min(self._seen, self.keep)
        empty = np.zeros(0)
        return {
            "embeddings": np.zeros((0, 1), np.float32)
            if self._sample is None
            else self._sample[:n],
            "p_values": np.concatenate(self.p_values) if self.p_values else empty,
            "raw_scores": np.concatenate(self.raw) if self.raw else empty,
            "predicted": list(self.predicted),
            "top_proba": np.concatenate(self.top) if self.top else empty,
            "paths": list(self.paths),
        }
