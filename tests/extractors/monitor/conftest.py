"""Real embeddings for the monitor tests, computed once a session with the shared backbone:
handwritten digits (the training distribution) and patches of scikit-image's photos (foreign).

Digits (sklearn's, as `materialise_digits` writes them), shuffled with a fixed seed: 100 are
the reference (train), 100 calibrate (the val split's role), 80 are held out (four batches of
20).
Foreign: 30 patches of 6 photos (5 crops each, 96-160 px)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TRAIN, CALIBRATION, HELD_OUT = 100, 100, 80
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera")


@dataclass(frozen=True)
class Embedded:
    train: np.ndarray
    train_labels: np.ndarray
    calibration: np.ndarray
    calibration_labels: np.ndarray
    held_out: np.ndarray
    held_out_labels: np.ndarray
    foreign: np.ndarray


def _embed(backbone, images: list[Image.Image]) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), 32):
            x = torch.stack([backbone.transform(im) for im in images[start : start + 32]])
            out.append(backbone.embed(x).numpy())
    return np.concatenate(out).astype(np.float32)


def _patches(rng: np.random.Generator) -> list[Image.Image]:
    from skimage import data

    out = []
    for name in PHOTOS:
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        for _ in range(5):
            side = int(rng.integers(96, 161))
            x, y = (int(rng.integers(0, s - side)) for s in photo.size)
            out.append(photo.crop((x, y, x + side, y + side)))
    return out


@pytest.fixture(scope="session")
def embedded(backbone, tmp_path_factory: pytest.TempPathFactory) -> Embedded:
    from flows.sample_data import materialise_digits

    root = materialise_digits(tmp_path_factory.mktemp("monitor") / "digits", per_class=28)
    files = sorted(root.glob("*/*.png"))
    rng = np.random.default_rng(0)
    files = [files[i] for i in rng.permutation(len(files))]
    labels = np.array([int(Path(f).parent.name) for f in files])
    vectors = _embed(backbone, [Image.open(f).convert("RGB") for f in files])
    a, b = TRAIN, TRAIN + CALIBRATION
    return Embedded(
        vectors[:a],
        labels[:a],
        vectors[a:b],
        labels[a:b],
        vectors[b:],
        labels[b:],
        _embed(backbone, _patches(rng)),
    )


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Chance that a positive row scores above a negative one (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
