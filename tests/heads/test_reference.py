"""The OOD reference a model folder carries (heads/scoring/reference.py), on a real store and
real images: under its cap the folder's columns are those of `score`'s detector on the store
(a digit not flagged, a photo flagged, an error row null), over it a seeded sample of the
cap's size, and a folder written without one still predicts, its columns null."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from extractors.monitor.ood import KnnOOD, columns_of
from extractors.settings import MonitorSettings
from heads.classifier import ImageClassifier
from heads.scoring import reference
from heads.scoring.reference import OODReference

LEVEL = 0.1  # the store has ~15 val images: level 0.01 would need 99 (the columns null)


@pytest.fixture(scope="module")
def clf(built_store) -> ImageClassifier:
    """A real logistic-regression head trained on the store, which it names."""
    X, meta = built_store.arrays()
    head = LogisticRegression(max_iter=500).fit(X, meta["label"].to_pylist())
    m = built_store.manifest()
    return ImageClassifier(
        m["backbone"], m["weights"], list(head.classes_), "h", head, store=str(built_store.path)
    )


def _photo(tmp_path: Path) -> Path:
    """A colour photograph (scikit-image's astronaut): nothing like a handwritten digit."""
    from skimage import data

    path = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def test_the_folder_gives_the_ood_columns_of_score(
    clf, built_store, digits_dir, backbone, tmp_path
) -> None:
    folder = clf.save(tmp_path / "model")
    info = json.loads((folder / "ood" / "ood.json").read_text())
    n = built_store.table(["id"]).num_rows
    assert info["reference_rows"] == info["store_rows"] == n  # under the cap: every row
    assert info["k"] == MonitorSettings().ood_k and info["level"] == MonitorSettings().ood_level
    bound = ImageClassifier.load(folder, device="cpu")
    digits = [str(p) for p in sorted(digits_dir.rglob("*.png"))[::9]]
    items = [*digits, str(_photo(tmp_path)), b"not an image"]
    rows = bound.predict_items(items, batch_size=len(items), ood_level=LEVEL)

    # `score`'s detector on the store itself (flows/steps/monitoring.py: every row the
    # reference, each val row left out of its own neighbours), on the same embeddings (one
    # batch, as predict_items embedded them: float noise could break a tie of scores).
    emb = backbone.embed_all(torch.cat([backbone.prepare(p) for p in items[:-1]]))[0].numpy()
    detector = KnnOOD.from_store(built_store, MonitorSettings().ood_k, None)
    expected = columns_of(detector.p_values(emb), LEVEL)
    for row, score, flag in zip(rows[:-1], expected["ood_score"], expected["ood"], strict=True):
        assert row["ood_score"] == pytest.approx(score, abs=1e-9) and row["ood"] == flag
    assert not any(r["ood"] for r in rows[: len(digits)])  # training digits: not flagged
    assert rows[len(digits)]["ood"] is True and rows[len(digits)]["ood_score"] > 0.9
    assert rows[-1]["error"] and rows[-1]["ood"] is None and rows[-1]["ood_score"] is None
    # The level written is the default: too strict for this calibration set, so null.
    assert {r["ood"] for r in bound.predict_items(digits[:2])} == {None}


def test_a_large_store_ships_a_seeded_sample_of_the_cap(built_store, monkeypatch) -> None:
    monkeypatch.setattr(reference, "REFERENCE_ROWS", 40)
    monkeypatch.setattr(reference, "CALIBRATION_ROWS", 10)
    first, again = OODReference.from_store(built_store), OODReference.from_store(built_store)
    assert first is not None and again is not None
    assert first.detector.n_reference_ == 40 and first.detector.n_calibration == 10
    assert first.info["store_rows"] == built_store.table(["id"]).num_rows
    a, b = (r.detector.index_.reconstruct_n(0, 40) for r in (first, again))
    assert np.array_equal(a, b)  # seeded: the same sample every time
    other = OODReference.from_store(built_store, MonitorSettings(seed=1))
    assert not np.array_equal(a, other.detector.index_.reconstruct_n(0, 40))


def test_a_folder_without_a_reference_predicts_with_null_ood(clf, digits_dir, tmp_path) -> None:
    folder = clf.save(tmp_path / "model")
    shutil.rmtree(folder / "ood")  # as written before the reference existed
    bound = ImageClassifier.load(folder, device="cpu")
    assert bound.model.ood is None
    row = bound.predict_items([str(sorted(digits_dir.rglob("*.png"))[0])])[0]
    assert row["prediction"] in clf.classes and row["error"] is None
    assert row["ood_score"] is None and row["ood"] is None
    # A head whose store is not here writes none either.
    moved = ImageClassifier(**{**clf.__dict__, "store": str(tmp_path / "gone")})
    assert not (moved.save(tmp_path / "model2") / "ood").exists()
