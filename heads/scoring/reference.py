"""The out-of-distribution reference a model folder carries (heads/classifier.py), so that the
image model gives each image the `ood_score` and `ood` columns of the predictions table
(heads/scoring/table.py) wherever it runs, its training store absent (`mlflow models serve`).

Same detector and meaning as `score` and `predict --out` (heads/scoring/monitored.py:
extractors/monitor/ood.py, `KnnOOD`, `columns_of`): the reference is the store's rows, the
calibration its val rows, each leaving itself out of its own neighbours. Written without pickle,
in the folder's `ood/`:

    reference.npy     the reference rows' embeddings, L2-normalised float32 (allow_pickle=False)
    calibration.npy   the calibration rows' raw OOD scores, sorted (float32)
    ood.json          k, the default level, the row counts, the seed and the store

At most REFERENCE_ROWS reference rows and CALIBRATION_ROWS calibration rows, each a seeded
uniform sample of the store's rows (of its val rows): a 1M-row store would otherwise ship its
whole embedding matrix (5 GB at 1280 dimensions); 10,000 rows are 51 MB at 1280 dimensions,
20 MB at 512. Conformal p-values stay valid on a sample (the calibration is scored against the
same sample); what a sample costs is some power on near-distribution images, and Sun et al.
(ICML 2022) run the deep-kNN detector on ImageNet with a 1% sample of its 1.28M training
images (~12,800, k = 10) at little loss against all of them. The calibration keeps only scores (4
bytes a row). Under both caps (every store of fewer than 10,000 rows) the reference is exactly
the store's rows, so the columns equal those of `predict --out` on the same store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from extractors.common import HeadstartError, write_json_atomic
from extractors.monitor.ood import KnnOOD, columns_of
from extractors.settings import MonitorSettings

REFERENCE_ROWS = 10_000  # reference rows a model folder keeps at most (see the docstring)
CALIBRATION_ROWS = 10_000  # calibration scores it keeps at most
OOD_DIR, REFERENCE, CALIBRATION, OOD_JSON = "ood", "reference.npy", "calibration.npy", "ood.json"
COLUMNS = ("ood_score", "ood")


def unusable(
    store_path: str | Path | None, backbone: str, weights: str | None, feature: str | None
) -> str | None:
    """Why a model's training store cannot be its OOD reference here (None when it can): it
    must be on this machine, hold the same network's embeddings (backbone and weights), and
    the model must read its `embedding` column. `score`'s monitor and the model folder's
    reference follow this one rule."""
    from extractors.store.store import Store

    if store_path is None or not Store(store_path).exists:
        return "the model's training store is not here"
    m = Store(store_path).manifest()
    if (m.get("backbone"), m.get("weights")) != (backbone, weights):
        return f"the training store {store_path} holds another network's embeddings"
    if feature not in (None, "embedding"):
        return "the model reads a --layers column, not the embedding"
    return None


@dataclass
class OODReference:
    """A fitted `KnnOOD` over a sample of a store and the level its flag uses by default."""

    detector: KnnOOD
    level: float
    info: dict[str, Any]  # what ood.json records besides k and level

    @classmethod
    def from_store(
        cls, store: Any, monitor: MonitorSettings = MonitorSettings()
    ) -> OODReference | None:
        """Fitted on a sample of `store` (extractors/store/store.py), read one batch at a time;
        None when the store cannot serve (fewer rows than k, no val rows: the columns are then
        null, as in `score`)."""
        meta = store.table(["id", "split"])
        ids = meta["id"].to_numpy()
        val = np.asarray(meta["split"].to_numpy(zero_copy_only=False)) == "val"
        rng = np.random.default_rng(monitor.seed)
        ref_ids = _sample(ids, REFERENCE_ROWS, rng)
        cal_ids = _sample(ids[val], CALIBRATION_ROWS, rng)
        if not len(ref_ids):
            return None
        ref, cal = _gather(store, ref_ids, cal_ids)
        # Each calibration row leaves itself out where it is in the reference (-1: it is not).
        at = np.minimum(np.searchsorted(ref_ids, cal_ids), len(ref_ids) - 1)
        own = np.where(ref_ids[at] == cal_ids, at, -1)
        try:
            detector = KnnOOD(monitor.ood_k).fit(ref, cal, calibration_ids=own)
        except HeadstartError:
            return None
        info = {"reference_rows": len(ref_ids), "store_rows": len(ids), "seed": monitor.seed}
        return cls(detector, monitor.ood_level, info | {"store": str(store.path)})

    def save(self, folder: str | Path) -> None:
        """Write `ood/` into a model folder."""
        where = Path(folder) / OOD_DIR
        where.mkdir(parents=True, exist_ok=True)
        index = self.detector.index_  # flat: its vectors are the normalised reference rows
        np.save(where / REFERENCE, index.reconstruct_n(0, index.ntotal), allow_pickle=False)
        scores = self.detector.calibration_scores_.astype(np.float32)
        np.save(where / CALIBRATION, scores, allow_pickle=False)
        info = {"k": self.detector.k, "level": self.level} | self.info
        write_json_atomic(
            where / OOD_JSON, info | {"calibration_rows": self.detector.n_calibration}
        )

    @classmethod
    def load(cls, folder: str | Path) -> OODReference | None:
        """The reference of a model folder; None for one written without (before it existed,
        or a model with no training store: its columns are null)."""
        where = Path(folder) / OOD_DIR
        if not (where / OOD_JSON).exists():
            return None
        info = json.loads((where / OOD_JSON).read_text())
        vectors = np.load(where / REFERENCE, allow_pickle=False)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors, np.float32))
        detector = KnnOOD(int(info.pop("k")))
        # The fitted state `fit` would set (extractors/monitor/ood.py), from the files.
        detector.index_, detector.allowed_ids_, detector.n_reference_ = index, None, index.ntotal
        detector.calibration_scores_ = np.load(where / CALIBRATION, allow_pickle=False)
        return cls(detector, float(info.pop("level")), info)

    def columns(self, vectors: np.ndarray, level: float | None = None) -> dict[str, list]:
        """`ood_score` and `ood` of each embedding (`columns_of`), at `level` (default: the
        one written); null where the calibration is too small to flag at that level, as in
        `score`."""
        level = self.level if level is None else float(level)
        try:
            self.detector.check_level(level)
        except HeadstartError:
            return {c: [None] * len(vectors) for c in COLUMNS}
        cols = columns_of(self.detector.p_values(vectors), level)
        return {c: cols[c].tolist() for c in COLUMNS}


def _sample(ids: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most `cap` of `ids`, uniformly (seeded), in id order."""
    ids = np.sort(np.asarray(ids, np.int64))
    return ids if len(ids) <= cap else np.sort(rng.choice(ids, cap, replace=False))


def _gather(store: Any, ref_ids: np.ndarray, cal_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings of two sorted id sets, in id order, one stored batch in memory at a time."""
    ref: list[tuple[np.ndarray, np.ndarray]] = []
    cal: list[tuple[np.ndarray, np.ndarray]] = []
    for vectors, ids in store.batches():
        for wanted, out in ((ref_ids, ref), (cal_ids, cal)):
            keep = np.isin(ids, wanted)
            out.append((ids[keep], np.array(vectors[keep], np.float32)))
    return _ordered(ref), _ordered(cal)


def _ordered(parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The rows of `parts` (ids, vectors) in id order."""
    ids = np.concatenate([i for i, _ in parts])
    return np.concatenate([v for _, v in parts])[np.argsort(ids, kind="stable")]
