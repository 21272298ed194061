"""Heads on real embeddings: the protocol, metrics, saving without pickle, bad training data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

from extractors.store import Store
from heads.classical import HEADS, build_head
from heads.knn import FaissKNNClassifier
from heads.persist import HeadFileError, load_head, save_head
from heads.train import TrainingDataError, load_splits, save_heads, train_heads


@pytest.fixture(scope="module")
def trained(built_store):
    return train_heads(built_store, seed=0)


def test_heads_far_above_chance(trained) -> None:
    results, splits = trained
    assert {r.name for r in results} == set(HEADS)
    chance = 1 / len(splits.classes)  # 4 classes: 0.25
    for r in results:
        assert r.metrics["accuracy"] >= 0.6, (r.name, r.metrics)
        assert set(r.metrics) == {"accuracy", "balanced_accuracy", "macro_f1"}  # <= 5 classes
        assert r.metrics["accuracy"] > 2 * chance
        assert r.confusion.sum() == len(splits.y_test)
        assert r.params[HEADS[r.name].param] in HEADS[r.name].grid


def test_best_is_chosen_on_validation(trained) -> None:
    results, _ = trained
    assert [r.val_accuracy for r in results] == sorted(
        (r.val_accuracy for r in results), reverse=True
    )
    for r in results:
        assert r.val_accuracy == max(r.val_scores.values())


def test_saved_heads_round_trip_without_pickle(trained, built_store, tmp_path) -> None:
    results, splits = trained
    store = Store(tmp_path / "s")
    import shutil

    shutil.copytree(built_store.path, store.path)
    saved = save_heads(store, results, run_tag="run1")
    for r in results:
        est, meta = load_head(saved[r.name])
        assert np.array_equal(est.predict(splits.X_test), r.estimator.predict(splits.X_test))
        assert meta["classes"] == r.classes and meta["backbone"] == "efficientnet_lite0"
        assert saved[r.name].read_bytes()[:2] == b"PK"  # a skops zip, not a pickle


def test_untrusted_head_file_is_refused(tmp_path) -> None:
    import os

    from sklearn.preprocessing import FunctionTransformer

    path = save_head(FunctionTransformer(func=os.getcwd), {}, tmp_path / "evil.skops")
    with pytest.raises(HeadFileError, match="does not trust"):
        load_head(path)


def test_knn_follows_estimator_api() -> None:
    knn = FaissKNNClassifier(k=3)
    assert clone(knn).get_params() == {"k": 3, "weights": "uniform", "temperature": 0.07}
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (20, 8)) + 5, rng.normal(0, 1, (20, 8)) - 5])
    y = np.array(["a"] * 20 + ["b"] * 20)
    assert knn.fit(X, y) is knn and list(knn.classes_) == ["a", "b"]
    assert (knn.predict(X) == y).all()
    assert np.allclose(knn.predict_proba(X).sum(axis=1), 1)


def test_single_class_and_tiny_class_are_refused(built_store, tmp_path) -> None:
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc

    from extractors.store import EMBEDDINGS, write_parquet_atomic

    store = Store(tmp_path / "s")
    shutil.copytree(built_store.path, store.path)
    table = store.table()
    one = table.filter(pc.equal(table["label"], "0"))
    write_parquet_atomic(one, store.path / EMBEDDINGS)
    with pytest.raises(TrainingDataError, match="only one class"):
        load_splits(store)
    tiny = pa.concat_tables([one, table.filter(pc.equal(table["label"], "1")).slice(0, 1)])
    write_parquet_atomic(tiny, store.path / EMBEDDINGS)
    with pytest.raises(TrainingDataError, match="too small"):
        load_splits(store)


def test_unknown_head_name() -> None:
    with pytest.raises(ValueError, match="unknown head"):
        build_head("tree")


def test_layer_is_a_head_hyperparameter(layered_store) -> None:
    from heads.train import train_heads

    results, _ = train_heads(layered_store, heads=["logreg"])
    (best,) = results
    assert best.params["feature"] in layered_store.features()
    only_last = train_heads(layered_store, heads=["logreg"], features=["emb_blocks_6"])[0][0]
    assert only_last.params["feature"] == "emb_blocks_6"
    assert best.val_accuracy >= only_last.val_accuracy  # chosen on validation among all three
