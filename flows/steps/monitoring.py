"""Monitoring stage of scoring: an out-of-distribution detector fitted on the model's training
store (its rows the reference, its val split the calibration), wrapped around the
scorer (heads/scoring/monitored.py), and the batch's figures once it is scored (embedding,
prediction and confidence drift, the flagged share: extractors/monitor/drift.py)."""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from extractors.monitor.drift import batch_report
from extractors.settings import MonitorSettings
from extractors.store.store import Store
from heads.classifier import BoundClassifier
from heads.scoring.monitored import Monitored
from heads.scoring.reference import unusable

defaults = logging.getLogger("headstart.defaults")
FLAGGED_SHOWN = 50  # the most unusual images listed with a batch


def watch(
    bound: BoundClassifier, trained_on: Path | None, settings: MonitorSettings
) -> Monitored | None:
    """The scorer with OOD columns, when the model's training store can serve as the
    reference (same backbone and weights, a train and a val split); else None, said in one
    line (the columns are then null)."""
    from extractors.monitor.ood import KnnOOD

    why = _unwatchable(bound, trained_on)
    if why is not None:
        defaults.info(f"out-of-distribution scores: not measured ({why})")
        return None
    # Every row the reference (its index unfiltered: a few ms an image at 1M rows), each val
    # row left out of its own neighbours for the calibration.
    fit = functools.partial(KnnOOD.from_store, Store(trained_on), settings.ood_k, None)
    return Monitored(bound, fit, settings.ood_level, settings.drift_rows, settings.seed)


def _unwatchable(bound: BoundClassifier, trained_on: Path | None) -> str | None:
    bb = bound.backbone
    return unusable(trained_on, bb.name, bb.weights, bound.model.feature)


def batch_figures(
    monitored: Monitored, trained_on: Path, settings: MonitorSettings
) -> dict[str, Any] | None:
    """The batch's figures and alarm against the training store: its val embeddings (the
    reference of the two-sample test), its label shares, and the model's mean top
    probability on its test split; with the most unusual images first."""
    if monitored.unmeasured is not None:
        defaults.info(f"out-of-distribution scores: not measured ({monitored.unmeasured})")
        return None
    store = Store(trained_on)
    batch = monitored.batch()
    vectors, meta = store.arrays(where_labelled=True)
    split = np.asarray(meta["split"].to_numpy(zero_copy_only=False))
    labels = meta["label"].to_pylist()
    test = split == "test"
    reference_top = None
    if test.any():
        proba = monitored.scorer.from_features(vectors[test])
        reference_top = float(np.asarray(proba).max(axis=1).mean())
    figures = batch_report(
        batch["embeddings"],
        vectors[split == "val"],
        ood=monitored.detector,
        p_values=batch["p_values"],
        predicted=batch["predicted"],
        label_shares={c: labels.count(c) / len(labels) for c in set(labels)},
        top_proba=batch["top_proba"],
        reference_top_proba=reference_top,
        settings=settings,
    )
    figures["images"] = len(batch["p_values"])  # the drift test saw a sample of them
    order = np.argsort(-batch["raw_scores"], kind="stable")[:FLAGGED_SHOWN]  # most unusual first
    figures["flagged"] = [
        {
            "path": batch["paths"][i],
            "ood_score": float(1.0 - batch["p_values"][i]),
            "prediction": batch["predicted"][i],
        }
        for i in order
        if batch["p_values"][i] <= settings.ood_level
    ]
    return _finite(figures)


def _finite(value: Any) -> Any:
    """The figures as JSON takes them: NaN (a test on too few rows) as None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
