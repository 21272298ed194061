"""The pipeline's decisions as plain functions: escalate to fine-tuning or not, and reuse the
last training's heads or retrain; each with the reason the run records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extractors.common import write_json_atomic
from flows.steps.training import LAST_TRAINING, escalation_decision, reusable_training

SUMMARY = {
    "best": "rbf_svm",
    "heads": [
        {"head": "logreg", "val_score": 0.95, "selection_metric": "accuracy"},
        {"head": "rbf_svm", "val_score": 0.97, "selection_metric": "balanced_accuracy"},
    ],
}


@pytest.mark.parametrize(
    ("target", "forced", "escalate", "reason"),
    [
        (0.98, False, True, "best head rbf_svm val balanced accuracy 0.970 < target 0.980"),
        (0.97, False, False, "best head rbf_svm val balanced accuracy 0.970 >= target 0.970"),
        (None, False, False, "no target set"),
        (0.5, True, True, "fine-tuning requested (--finetune)"),
    ],
)
def test_escalation_follows_the_best_head_not_the_first(target, forced, escalate, reason) -> None:
    d = escalation_decision(SUMMARY, target, forced)
    assert d == {
        "escalate": escalate,
        "reason": reason,
        "best_head": "rbf_svm",
        "best_val_score": 0.97,
    }


def _store(tmp_path: Path, fingerprint: str) -> Path:
    (tmp_path / "heads").mkdir(parents=True, exist_ok=True)
    (tmp_path / "manifest.json").write_text(json.dumps({"fingerprint": fingerprint}))
    return tmp_path


def test_heads_are_reused_only_for_the_same_data_heads_and_seed(tmp_path: Path) -> None:
    store = _store(tmp_path, "f1")
    assert reusable_training(store) == (None, "first training of this store")
    last = {"run": "r1", "fingerprint": "f1", "heads": None, "seed": 0, "summary": SUMMARY}
    write_json_atomic(store / "heads" / LAST_TRAINING, last)

    summary, why = reusable_training(store)
    assert summary == SUMMARY | {"reused_from": "r1"}
    assert why == "data unchanged since run r1 (fingerprint f1): heads reused"
    assert reusable_training(store, heads=["knn"]) == (
        None,
        "other heads or seed than the last training",
    )
    assert reusable_training(store, seed=1)[0] is None

    write_json_atomic(store / "heads" / LAST_TRAINING, last | {"heads": ["knn", "logreg"]})
    assert reusable_training(store, heads=["logreg", "knn"])[0] is not None  # order is no matter

    _store(tmp_path, "f2")  # new rows: another fingerprint
    assert reusable_training(store, heads=["logreg", "knn"]) == (
        None,
        "data changed (fingerprint f1 -> f2)",
    )
