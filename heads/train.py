"""Training stage: labelled embeddings (arrays) -> validated splits -> fitted, saved heads. Takes
arrays, not stores: flows/steps/training.py reads the store."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from extractors.common import HeadstartError, write_json_atomic
from extractors.store.layout import HEADS_DIR, LATEST_HEADS
from heads.classical import HEADS
from heads.evaluate import HeadResult, HeadSkipped, Splits, fit_head, is_imbalanced, sweep_size
from heads.persist import save_head


class TrainingDataError(HeadstartError, ValueError):
    """The store's labels cannot support training heads; the message says what to do."""


def splits_of(X: np.ndarray, labels: Any, split: Any, where: str = "the data") -> Splits:
    """Labelled features by split (`labels` and `split` one per row of X), after checking
    there is enough to train and test on; `where` names the data in the errors."""
    if len(X) == 0:
        raise TrainingDataError(
            f"{where} has no labelled images. Heads need labels: embed a folder with "
            "one sub-folder per class, or a manifest with a label column."
        )
    labels = np.asarray(labels, dtype=object)
    split = np.asarray(split, dtype=object)
    counts = Counter(labels)
    if len(counts) < 2:
        raise TrainingDataError(
            f"only one class ({next(iter(counts))!r}) in {where}; heads need at least two. "
            "Add a sub-folder of images per class."
        )
    problems = []
    for cls in sorted(counts):
        per = {s: int(((labels == cls) & (split == s)).sum()) for s in ("train", "val", "test")}
        if per["train"] == 0 or per["test"] == 0 or (per["val"] == 0 and counts[cls] >= 3):
            problems.append(f"{cls!r} ({counts[cls]} images: {per})")
    if problems:
        raise TrainingDataError(
            "these classes are too small for a train/val/test split: "
            + "; ".join(problems)
            + ". Each class needs at least 3 images (one per split); add images or drop the class."
        )
    if not (split == "val").any():
        raise TrainingDataError("no validation rows: give a 'val' split in the manifest")
    pick = {s: split == s for s in ("train", "val", "test")}
    return Splits(
        X[pick["train"]],
        labels[pick["train"]].astype(str),
        X[pick["val"]],
        labels[pick["val"]].astype(str),
        X[pick["test"]],
        labels[pick["test"]].astype(str),
    )


@dataclass
class Trained:
    """The heads of one training run, best first, and what was decided along the way."""

    results: list[HeadResult]
    splits: Splits  # of the `embedding` column, for plots
    skipped: dict[str, str]  # head -> why it did not apply
    imbalanced: bool  # classes imbalanced: balanced class weights, chosen on balanced accuracy

    @property
    def best(self) -> HeadResult:
        return self.results[0]


def train_heads(
    splits: dict[str, Splits],
    heads: list[str] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Trained:
    """Fit each head by the evaluation protocol (heads/evaluate.py); best first on validation.

    `splits` holds one Splits per feature column (the penultimate `embedding`, or a layer
    saved with `--layers`, same rows in each): the column is one more hyperparameter, each
    head is fitted on each and the best on validation kept, with `feature` among its params.
    """
    heads = heads or list(HEADS)
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise TrainingDataError(f"unknown head(s) {unknown}; choose from {', '.join(HEADS)}")
    features = list(splits)
    first = splits.get("embedding") or splits[features[0]]
    imbalanced = is_imbalanced(np.concatenate([first.y_train, first.y_val]))
    results, skipped = [], {}
    total = sum(sweep_size(h) for h in heads) * len(features)
    with tqdm(total=total, desc="heads", unit="fit", disable=not progress) as bar:
        for name in heads:
            bar.set_postfix_str(name)
            fitted = []
            for f in features:
                try:
                    r = fit_head(name, splits[f], seed, imbalanced, tick=lambda: bar.update(1))
                except HeadSkipped as exc:
                    skipped[name] = str(exc)
                    bar.update(sweep_size(name) * len(features))
                    break
                r.params["feature"] = f
                fitted.append(r)
            if fitted:  # each column's score kept: the ladder's rungs (flows/candidates.py)
                results.append(rank(fitted)[0])
                scores = {r.params["feature"]: r.val_score for r in fitted}
                results[-1].extra["val_by_feature"] = scores
    if not results:
        raise TrainingDataError(f"no head could be trained: {skipped}")
    return Trained(rank(results), first, skipped, imbalanced)


def rank(results: list[HeadResult]) -> list[HeadResult]:
    """Best first: by validation score (the choice never looks at test), then by name."""
    return sorted(results, key=lambda r: (-r.val_score, r.name))


def save_heads(
    folder: Path,
    manifest: dict[str, Any],
    results: list[HeadResult],
    run_tag: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Save every head under <folder>/heads/<run_tag>/ with what it was trained on (from the
    store's `manifest`) and point heads/latest.json at the best."""
    folder = Path(folder)
    out_dir = folder / HEADS_DIR / run_tag
    saved = {}
    for r in results:
        meta = {
            "head": r.name,
            "params": r.params,
            "classes": r.classes,
            "backbone": manifest["backbone"],
            "weights": manifest["weights"],
            "dim": manifest["dim"],
            "feature": r.params.get("feature", "embedding"),
            "feature_module": manifest.get("layers", {})
            .get(r.params.get("feature"), {})
            .get("module"),
            "store": str(folder),
            "fingerprint": manifest["fingerprint"],
            "val_score": r.val_score,
            "selection_metric": r.selection_metric,
            "metrics": r.metrics,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **(extra or {}),
        }
        saved[r.name] = save_head(r.estimator, meta, out_dir / f"{r.name}.skops")
    best = results[0]
    write_json_atomic(
        folder / LATEST_HEADS,
        {
            "run": run_tag,
            "best": best.name,
            "best_path": str(saved[best.name].relative_to(folder)),
            "heads": {k: str(v.relative_to(folder)) for k, v in saved.items()},
            **(extra or {}),
        },
    )
    return saved
