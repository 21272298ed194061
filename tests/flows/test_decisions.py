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


def test_an_embed_committing_during_training_makes_the_next_run_retrain(
    digits_dir: Path, backbone, tmp_path: Path, mlflow_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of the issue, made to happen: a real `embed` commits new rows while the heads
    train. The training records the fingerprint of the data it read, so the next run sees
    the change instead of reusing heads fitted on older data."""
    import shutil

    import mlflow

    from extractors.embedding.sources import read_source
    from extractors.store.store import Store
    from flows.steps import training

    source = tmp_path / "digits"
    shutil.copytree(digits_dir, source)
    late = sorted((source / "0").iterdir())[:3]
    held = tmp_path / "held"
    held.mkdir()
    for f in late:
        f.rename(held / f.name)
    store = Store(tmp_path / "store")
    store.update(read_source(source), backbone, progress=False)
    before = store.manifest()["fingerprint"]
    real_train = training.train_heads

    def train_while_an_embed_commits(*args, **kwargs):
        for f in late:
            (held / f.name).rename(f)
        Store(store.path).update(read_source(source), backbone, progress=False)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training, "train_heads", train_while_an_embed_commits)
    mlflow.set_tracking_uri(mlflow_tmp)
    # An explicit experiment: set_experiment would leave it active (and MLFLOW_EXPERIMENT_ID
    # set) for every later test of this process, whose runs live in other stores.
    race = mlflow.create_experiment("race")
    with mlflow.start_run(experiment_id=race) as parent:
        training.train_and_track(store.path, parent.info.run_id, tmp_path, heads=["logreg"])
    after = store.manifest()["fingerprint"]
    assert after != before and store.manifest()["rows"] == 100
    recorded = json.loads((store.path / "heads" / LAST_TRAINING).read_text())
    assert recorded["fingerprint"] == before  # the data it trained on, not the newer data
    assert reusable_training(store.path, heads=["logreg"]) == (
        None,
        f"data changed (fingerprint {before} -> {after})",
    )
