"""Heads on real embeddings: the protocol, metrics, saving without pickle, bad training data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from extractors.store.store import Store
from heads.classical import HEADS, PRE, build_head
from heads.evaluate import (
    METRICS,
    HeadSkipped,
    Splits,
    bootstrap_ci,
    expected_calibration_error,
    fit_head,
    score,
)
from heads.knn import FaissKNNClassifier
from heads.persist import HeadFileError, load_head, save_head
from heads.train import TrainingDataError, save_heads, splits_of, train_heads


def _splits(store, features: list[str] | None = None) -> dict:
    """Each feature column's labelled rows by split, as the training step reads them."""
    out = {}
    for f in features or store.features():
        X, meta = store.arrays(where_labelled=True, feature=f)
        out[f] = splits_of(X, meta["label"].to_pylist(), meta["split"].to_pylist())
    return out


@pytest.fixture(scope="module")
def trained(built_store):
    return train_heads(_splits(built_store), seed=0)


def test_heads_far_above_chance_with_the_same_metrics(trained) -> None:
    splits = trained.splits
    assert {r.name for r in trained.results} == set(HEADS)
    chance = 1 / len(splits.classes)  # 4 classes: 0.25
    for r in trained.results:
        assert set(r.metrics) == set(METRICS) - {"top5_accuracy"}  # <= 5 classes: no top-5
        assert r.metrics["accuracy"] >= 0.6 and r.metrics["accuracy"] > 2 * chance, r.name
        lo, hi = r.metrics["accuracy_ci_low"], r.metrics["accuracy_ci_high"]
        assert lo <= r.metrics["accuracy"] <= hi <= 1
        assert 0 <= r.metrics["ece"] <= 1 and r.metrics["log_loss"] > 0
        assert r.confusion.sum() == len(splits.y_test)
        assert set(r.per_class) == set(r.classes) and sum(
            c["n"] for c in r.per_class.values()
        ) == len(splits.y_test)


def test_every_grid_point_and_preprocessing_is_swept_and_the_best_chosen(trained) -> None:
    for r in trained.results:
        grid = HEADS[r.name].grid
        assert len(r.sweep) == len(PRE) * int(np.prod([len(v) for v in grid.values()]))
        assert r.val_score == max(row["val_score"] for row in r.sweep)
        assert r.params["pre"] in PRE
        for key, values in grid.items():
            assert r.params[key] in values
    scores = [r.val_score for r in trained.results]
    assert scores == sorted(scores, reverse=True)  # best first, chosen on validation
    assert not trained.imbalanced  # 10 balanced classes: plain accuracy selects


def test_ties_go_to_the_lower_validation_log_loss() -> None:
    from heads.evaluate import choose

    rows = [
        {"C": 1, "val_score": 0.9, "val_log_loss": 0.8},
        {"C": 2, "val_score": 0.9, "val_log_loss": 0.3},
        {"C": 3, "val_score": 0.8, "val_log_loss": 0.1},
    ]
    assert choose(rows)["C"] == 2


def _blobs(counts: list[int], dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (len(counts), dim))
    X = np.concatenate([rng.normal(c, 1.0, (n, dim)) for c, n in zip(centers, counts, strict=True)])
    y = np.concatenate([[f"c{i}"] * n for i, n in enumerate(counts)])
    return X.astype(np.float32), y


def test_imbalanced_classes_get_balanced_weights_and_balanced_selection() -> None:
    Xtr, ytr = _blobs([90, 15, 15])
    Xva, yva = _blobs([30, 5, 5], seed=1)
    Xte, yte = _blobs([30, 5, 5], seed=2)
    r = fit_head("logreg", Splits(Xtr, ytr, Xva, yva, Xte, yte))
    assert r.selection_metric == "balanced_accuracy"
    assert r.extra["class_weight"] == "balanced"
    assert r.estimator.named_steps["clf"].class_weight == "balanced"


def test_rbf_svm_is_skipped_on_large_training_sets() -> None:
    X, y = _blobs([2600, 2600], dim=4)
    with pytest.raises(HeadSkipped, match="5200 training rows > 5000"):
        fit_head("rbf_svm", Splits(X, y, X[:10], y[:10], X[:10], y[:10]))


def test_metrics_on_known_probabilities() -> None:
    classes = np.array(["a", "b"])
    y = np.array(["a", "a", "b", "b"])
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    m = score(y, proba, classes)
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == 0.75
    expected_ll = -np.mean(np.log([0.9, 0.6, 0.7, 0.2]))
    assert m["log_loss"] == pytest.approx(expected_ll)
    # confidences 0.9, 0.6, 0.7, 0.8 fall in four bins; |acc - conf| = .1, .4, .3, .8
    assert m["ece"] == pytest.approx((0.1 + 0.4 + 0.3 + 0.8) / 4)
    assert expected_calibration_error(np.array([0, 1]), np.array([[1.0, 0.0], [0, 1.0]])) == 0


def test_bootstrap_interval_brackets_the_mean() -> None:
    correct = np.array([1.0] * 80 + [0.0] * 20)
    lo, hi = bootstrap_ci(correct)
    assert 0.7 < lo < 0.8 < hi < 0.9


def test_saved_heads_round_trip_without_pickle(trained, built_store, tmp_path) -> None:
    splits = trained.splits
    store = Store(tmp_path / "s")
    shutil.copytree(built_store.path, store.path)
    saved = save_heads(store.path, store.manifest(), trained.results, run_tag="run1")
    for r in trained.results:
        est, meta = load_head(saved[r.name])
        assert np.array_equal(est.predict(splits.X_test), r.estimator.predict(splits.X_test))
        assert meta["classes"] == r.classes and meta["backbone"] == "efficientnet_lite0"
        assert meta["params"]["pre"] == r.params["pre"]
        assert saved[r.name].read_bytes()[:2] == b"PK"  # a skops zip, not a pickle


def test_untrusted_head_file_is_refused(tmp_path) -> None:
    import os

    from sklearn.preprocessing import FunctionTransformer

    path = save_head(FunctionTransformer(func=os.getcwd), {}, tmp_path / "evil.skops")
    with pytest.raises(HeadFileError, match="does not trust"):
        load_head(path)


def test_a_head_is_a_pipeline_whose_parameters_reach_its_steps() -> None:
    # The estimators themselves pass scikit-learn's own checks (test_estimators.py).
    head = build_head("logreg", pre="pca_whiten", C=0.5)
    params = head.get_params()
    assert params["clf__C"] == 0.5 and params["pre__whiten"] is True


def test_balanced_knn_votes_do_not_follow_class_size() -> None:
    X = np.array([[1.0, 0.0]] * 9 + [[0.9, 0.1]] * 3)
    y = np.array(["big"] * 9 + ["small"] * 3)
    query = np.array([[0.95, 0.05]])
    plain = FaissKNNClassifier(k=12).fit(X, y).predict_proba(query)[0]
    fair = FaissKNNClassifier(k=12, class_weight="balanced").fit(X, y).predict_proba(query)[0]
    assert plain[0] == pytest.approx(0.75) and fair[0] == pytest.approx(0.5)


def test_single_class_and_tiny_class_are_refused(built_store, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    from extractors.common import write_parquet_atomic
    from extractors.store.layout import EMBEDDINGS

    store = Store(tmp_path / "s")
    shutil.copytree(built_store.path, store.path)
    table = store.table()
    one = table.filter(pc.equal(table["label"], "0"))
    write_parquet_atomic(one, store.path / EMBEDDINGS)
    with pytest.raises(TrainingDataError, match="only one class"):
        _splits(store)
    tiny = pa.concat_tables([one, table.filter(pc.equal(table["label"], "1")).slice(0, 1)])
    write_parquet_atomic(tiny, store.path / EMBEDDINGS)
    with pytest.raises(TrainingDataError, match="too small"):
        _splits(store)


def test_unknown_head_name() -> None:
    with pytest.raises(ValueError, match="unknown head"):
        build_head("tree")


def test_layer_is_a_head_hyperparameter(layered_store) -> None:
    best = train_heads(_splits(layered_store), heads=["logreg"]).best
    alone = {
        f: train_heads(_splits(layered_store, [f]), heads=["logreg"]).best
        for f in layered_store.features()
    }
    assert {f: r.params["feature"] for f, r in alone.items()} == {f: f for f in alone}
    # The column chosen is the one whose own sweep scores best on validation, and its score
    # and test metrics are that sweep's: nothing of the other columns leaks into it.
    chosen = alone[best.params["feature"]]
    assert chosen.val_score == max(r.val_score for r in alone.values())
    assert (best.val_score, best.metrics["accuracy"]) == (
        chosen.val_score,
        chosen.metrics["accuracy"],
    )
