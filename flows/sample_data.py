"""Bundled sample data: a small real labelled image set materialised from scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from extractors.common import atomic_path


def materialise_digits(root: str | Path, per_class: int = 40, size: int = 32) -> Path:
    """Write `per_class` handwritten digits per class as PNGs under root/<digit>/ (idempotent).

    The images are the UCI handwritten digits shipped with scikit-learn (8x8, 16 grey levels),
    upscaled to `size` px; each file name carries the sample's index in that data set.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    for label in range(10):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for idx in np.flatnonzero(digits.target == label)[:per_class]:
            out = folder / f"digit_{idx:04d}.png"
            if out.exists():
                continue
            pixels = (digits.images[idx] / 16.0 * 255.0).astype(np.uint8)
            img = Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR)
            with atomic_path(out) as tmp:
                img.save(tmp, format="PNG")
    return root
