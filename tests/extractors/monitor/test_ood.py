"""The deep-kNN OOD detector on real embeddings: calibrated on held-out digits, it flags the
stated share of new digits, nearly every foreign photo patch, and ranks foreign images first."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from scipy import stats

from extractors.common import normalize
from extractors.index.ann import AnnIndex
from extractors.monitor.drift import flagged_share
from extractors.monitor.ood import KnnOOD, OODError
from tests.extractors.monitor.conftest import auroc


@pytest.fixture(scope="module")
def detector(embedded) -> KnnOOD:
    return KnnOOD(k=10).fit(embedded.train, embedded.calibration)


def test_p_values_of_held_out_digits_are_calibrated(detector: KnnOOD, embedded) -> None:
    p = detector.p_values(embedded.held_out)
    assert ((p > 0) & (p <= 1)).all()
    # exchangeable with the calibration images: their scores share one law (a one-sample
    # test against the uniform would ignore the calibration set's own randomness)
    calibration = detector.calibration_scores_
    assert stats.ks_2samp(detector.score(embedded.held_out), calibration).pvalue > 0.01
    level = 0.05
    part = flagged_share(p <= level, detector.null_flag_share(level), level)
    assert part["expected"] == pytest.approx(5 / 101)
    assert part["p_value"] > 0.01 and part["share"] <= 0.125, part
    columns = detector.columns(embedded.held_out, level)
    np.testing.assert_allclose(columns["ood_score"], 1 - p, atol=1e-6)
    np.testing.assert_array_equal(columns["ood"], p <= level)


def test_foreign_patches_are_flagged(detector: KnnOOD, embedded) -> None:
    assert detector.flag(embedded.foreign, level=0.01).mean() >= 0.9
    assert detector.score(embedded.foreign).min() > np.median(detector.calibration_scores_)


def test_mixed_batch_ranks_the_foreign_fifth_first(detector: KnnOOD, embedded) -> None:
    batch = np.concatenate([embedded.held_out[:20], embedded.foreign[:5]])
    foreign = np.arange(len(batch)) >= 20
    assert auroc(detector.columns(batch)["ood_score"], foreign) >= 0.9
    assert auroc(detector.score(batch), foreign) >= 0.9


def test_an_index_restricted_to_train_ids_scores_like_the_train_vectors(
    detector: KnnOOD, embedded
) -> None:
    """The store's index holds every split: filtered to the train ids inside FAISS, it gives
    the scores of an index of the train rows alone (calibration rows never see themselves)."""
    rows = np.concatenate([embedded.train, embedded.calibration])
    ids = np.arange(len(rows), dtype=np.int64) * 7 + 3
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(rows.shape[1]))
    index.add_with_ids(normalize(rows), ids)
    train_ids = ids[: len(embedded.train)]
    for given in (index, AnnIndex(index)):
        other = KnnOOD(k=10).fit(None, embedded.calibration, index=given, allowed_ids=train_ids)
        assert other.n_reference_ == len(embedded.train)
        np.testing.assert_allclose(
            other.calibration_scores_, detector.calibration_scores_, atol=1e-5
        )
        np.testing.assert_allclose(
            other.score(embedded.foreign), detector.score(embedded.foreign), atol=1e-5
        )
    unfiltered = KnnOOD(k=1).fit(None, embedded.calibration, index=index)
    assert (unfiltered.calibration_scores_ < 1e-5).all()  # each finds itself: why ids matter


def test_calibration_rows_in_the_index_leave_themselves_out(embedded) -> None:
    """The fast path: every row of the index is the reference, each calibration row scored
    against all the others (checked against a brute-force leave-one-out)."""
    rows = normalize(np.concatenate([embedded.train, embedded.calibration]))
    ids = np.arange(len(rows), dtype=np.int64) * 7 + 3
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(rows.shape[1]))
    index.add_with_ids(rows, ids)
    own = ids[len(embedded.train) :]
    detector = KnnOOD(k=10).fit(None, embedded.calibration, index=index, calibration_ids=own)
    sims = rows[len(embedded.train) :] @ rows.T
    sims[np.arange(len(own)), np.arange(len(embedded.train), len(rows))] = -np.inf
    loo = 1 - np.sort(sims, axis=1)[:, -10]
    np.testing.assert_allclose(detector.calibration_scores_, np.sort(loo), atol=1e-5)
    p = detector.p_values(embedded.held_out)
    assert 0.02 < (p <= 0.1).mean() < 0.2  # about the level
    assert detector.flag(embedded.foreign, 0.01).mean() >= 0.9


def test_refusals(embedded) -> None:
    with pytest.raises(OODError, match="not fitted"):
        KnnOOD().score(embedded.held_out)
    with pytest.raises(OODError, match="fewer than k = 10"):
        KnnOOD().fit(embedded.train[:5], embedded.calibration)
    small = KnnOOD().fit(embedded.train, embedded.calibration[:50])
    with pytest.raises(OODError, match="at least 99 calibration images"):
        small.flag(embedded.held_out, level=0.01)
    assert small.flag(embedded.foreign, level=0.05).mean() >= 0.9


def test_from_store_uses_its_index_on_train_rows_calibrated_on_val(built_store) -> None:
    vectors, meta = built_store.arrays(where_labelled=False)
    split = np.asarray(meta["split"].to_numpy(zero_copy_only=False))
    detector = KnnOOD.from_store(built_store, k=3)
    assert detector.n_reference_ == (split == "train").sum()
    assert detector.n_calibration == (split == "val").sum() > 0
    direct = KnnOOD(k=3).fit(vectors[split == "train"], vectors[split == "val"])
    np.testing.assert_allclose(detector.calibration_scores_, direct.calibration_scores_, atol=1e-5)
    test = vectors[split == "test"]
    np.testing.assert_allclose(detector.score(test), direct.score(test), atol=1e-5)
    every = KnnOOD.from_store(built_store, k=3, reference=None)
    assert every.n_reference_ == len(split)  # every row; each val row leaves itself out
    assert every.calibration_scores_.min() > 1e-4
    everything = KnnOOD(k=3).fit(vectors, vectors[:1])
    np.testing.assert_allclose(every.score(test), everything.score(test), atol=1e-5)
