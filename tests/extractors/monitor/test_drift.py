"""Batch drift on real embeddings: held-out digit batches raise no alarm, a batch of photo
patches and a batch with a fifth of them do, for the stated reasons."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from extractors.monitor.drift import batch_report, class_shift, mmd_test
from extractors.monitor.ood import KnnOOD
from extractors.settings import MonitorSettings, SettingsError


@pytest.fixture(scope="module")
def scoring(embedded):
    """What a scoring run holds: the OOD detector, a head, training label counts and the mean
    top probability on held-out images (the test split's role)."""
    ood = KnnOOD(k=10).fit(embedded.train, embedded.calibration)
    head = LogisticRegression(max_iter=2000).fit(embedded.train, embedded.train_labels)
    classes, counts = np.unique(embedded.train_labels, return_counts=True)
    top = head.predict_proba(embedded.calibration).max(axis=1).mean()
    shares = dict(zip(classes.tolist(), counts.tolist(), strict=True))

    def report(batch: np.ndarray) -> dict:
        proba = head.predict_proba(batch)
        return batch_report(
            batch, embedded.calibration, ood=ood,
            predicted=head.classes_[proba.argmax(axis=1)], label_shares=shares,
            top_proba=proba.max(axis=1), reference_top_proba=float(top),
        )  # fmt: skip

    return report


def test_held_out_digit_batches_raise_no_alarm(scoring, embedded) -> None:
    for batch in np.split(embedded.held_out, 4):
        report = scoring(batch)
        assert not report["alarm"], report["reasons"]
        assert report["embedding_drift"]["auc"] < 0.7
        assert report["ood"]["share"] <= 0.15
        for part in ("embedding_drift", "ood", "prediction_drift", "confidence"):
            assert 0 < report[part]["p_value"] <= 1


def test_a_batch_of_photo_patches_alarms(scoring, embedded) -> None:
    report = scoring(embedded.foreign[:25])
    assert report["alarm"]
    assert report["embedding_drift"]["auc"] > 0.95 and report["ood"]["share"] >= 0.9
    said = " ".join(report["reasons"])
    assert "embeddings drifted" in said and "out of distribution" in said


def test_a_batch_with_a_fifth_of_photo_patches_alarms(scoring, embedded) -> None:
    batch = np.concatenate([embedded.held_out[:20], embedded.foreign[:5]])
    report = scoring(batch)
    assert report["alarm"]
    assert report["ood"]["flagged"] >= 4
    assert any("out of distribution" in r for r in report["reasons"])


def test_mmd_test_tells_samples_apart_and_not_alike(embedded) -> None:
    alike = mmd_test(embedded.held_out, embedded.calibration, permutations=199)
    apart = mmd_test(embedded.foreign, embedded.calibration, permutations=199)
    assert alike["p_value"] > 0.01 and 0.35 < alike["auc"] < 0.65
    assert apart["p_value"] == pytest.approx(1 / 200) and apart["auc"] > 0.95
    assert apart["mmd2"] > 10 * abs(alike["mmd2"]) and apart["rows"] == [30, 100]
    sub = mmd_test(embedded.held_out, embedded.calibration, rows=40, permutations=99)
    assert sub["rows"] == [40, 40]


def test_class_shift() -> None:
    shares = {"a": 50, "b": 30, "c": 20}
    same = class_shift(["a"] * 50 + ["b"] * 30 + ["c"] * 20, shares)
    assert same["total_variation"] == pytest.approx(0) and same["p_value"] > 0.9
    skewed = class_shift(["a"] * 10 + ["c"] * 90, shares)
    assert skewed["total_variation"] == pytest.approx(0.7) and skewed["p_value"] < 1e-3
    unknown = class_shift(["a", "z"], shares)
    assert unknown["p_value"] == 0.0 and unknown["shares"]["z"] == 0.5


def test_monitor_settings_refuse_bad_values() -> None:
    assert MonitorSettings().ood_level == 0.01
    with pytest.raises(SettingsError, match="--drift-permutations"):
        MonitorSettings(drift_permutations=500)  # p-values >= 1/501 never reach 0.001
    with pytest.raises(SettingsError, match="--ood-level"):
        MonitorSettings(ood_level=0.7)
