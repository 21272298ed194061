"""Near-duplicate threshold of the split: how similar copies of one photo are, and how similar
different photos are, with the default backbone, so the threshold comes from a measurement.

    uv run python bench/grouping.py
    uv run python bench/grouping.py --crops 6 --copies 4 --json bench/results/grouping.json

For each of 17 real photos (scikit-image's data) it cuts `--crops` 256-px crops at random
places; each crop gets `--copies` copies resized by up to ±15% and re-encoded as JPEG at
quality 60-95. Cosine similarities of the embeddings, by pair kind:

    copy:         a copy against its original crop (what the split must keep together)
    overlapping:  two crops of one photo that share over a quarter of their area
    apart:        two crops of one photo that share less
    different:    crops of different photos

then, for thresholds 0.70-0.95, the share of each kind at or above it, and on the demo's
digits (8x8 scans, upscaled) the share of images with a neighbour at or above it, which is
what chains a class into one group (extractors/store/grouping.py guards against that).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "camera",
    "coins", "horse", "gravel", "brick", "grass", "page", "text", "immunohistochemistry",
    "moon", "cell",
)  # fmt: skip
THRESHOLDS = (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)


def _images(folder: Path, crops: int, copies: int, seed: int) -> tuple[list[str], list[tuple]]:
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    paths, meta = [], []
    for name in PHOTOS:
        pixels = getattr(data, name)()
        if pixels.dtype != np.uint8:
            pixels = (pixels / pixels.max() * 255).astype(np.uint8)
        img = Image.fromarray(pixels).convert("RGB")
        w, h = img.size
        for c in range(crops):
            x, y = int(rng.integers(0, max(1, w - 256))), int(rng.integers(0, max(1, h - 256)))
            crop = img.crop((x, y, x + 256, y + 256))
            paths.append(str(folder / f"{name}_{c}.png"))
            crop.save(paths[-1])
            meta.append((name, c, False, (x, y)))
            for k in range(copies):
                side = int(256 * rng.uniform(0.85, 1.15))
                paths.append(str(folder / f"{name}_{c}_{k}.jpg"))
                crop.resize((side, side), Image.BICUBIC).save(
                    paths[-1], quality=int(rng.integers(60, 96))
                )
                meta.append((name, c, True, (x, y)))
    return paths, meta


def _embed(paths: list[str]) -> np.ndarray:
    from extractors.common import normalize
    from extractors.embedding.backbones import create_backbone
    from extractors.embedding.embed import embed_files

    bb = create_backbone("efficientnet_lite0", device="cpu")
    return normalize(np.concatenate([b.embeddings for b in embed_files(bb, paths, progress=False)]))


def _pairs(sim: np.ndarray, meta: list[tuple]) -> dict[str, np.ndarray]:
    kinds: dict[str, list[float]] = {"copy": [], "overlapping": [], "apart": [], "different": []}
    for i, j in itertools.combinations(range(len(meta)), 2):
        (ni, ci, copy_i, (xi, yi)), (nj, cj, copy_j, (xj, yj)) = meta[i], meta[j]
        if ni == nj and ci == cj:
            if not (copy_i and copy_j):
                kinds["copy"].append(sim[i, j])
        elif not (copy_i or copy_j):
            shared = max(0, 256 - abs(xi - xj)) * max(0, 256 - abs(yi - yj)) / 256**2
            kind = "different" if ni != nj else "overlapping" if shared > 0.25 else "apart"
            kinds[kind].append(sim[i, j])
    return {k: np.array(v) for k, v in kinds.items()}


def _digits_chaining(folder: Path) -> dict[str, float]:
    from flows.sample_data import materialise_digits

    root = materialise_digits(folder / "digits", per_class=174)
    vectors = _embed(sorted(str(p) for p in root.rglob("*.png")))
    sim = vectors @ vectors.T
    np.fill_diagonal(sim, -1)
    best = sim.max(axis=1)
    return {f"{t:.2f}": float((best >= t).mean()) for t in THRESHOLDS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--crops", type=int, default=4, help="crops per photo")
    ap.add_argument("--copies", type=int, default=3, help="copies per crop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths, meta = _images(Path(tmp), args.crops, args.copies, args.seed)
        vectors = _embed(paths)
        kinds = _pairs(vectors @ vectors.T, meta)
        chaining = _digits_chaining(Path(tmp))
    result: dict = {"images": len(paths), "kinds": {}, "at_threshold": {}}
    print(f"{len(paths)} images: {len(PHOTOS)} photos x {args.crops} crops x (1 + {args.copies})")
    print(f"{'pairs':<12}{'n':>6}{'min':>8}{'p5':>8}{'median':>8}{'max':>8}")
    for kind, v in kinds.items():
        q = {"n": len(v), "min": v.min(), "p5": np.percentile(v, 5), "median": np.median(v)}
        q = {k: float(x) for k, x in (q | {"max": v.max()}).items()}
        result["kinds"][kind] = q
        print(
            f"{kind:<12}{len(v):>6}"
            + "".join(f"{q[k]:>8.3f}" for k in ("min", "p5", "median", "max"))
        )
    print(f"\n{'cosine >=':<10}" + "".join(f"{k:>13}" for k in kinds) + f"{'digits chain':>15}")
    for t in THRESHOLDS:
        shares = {k: float((v >= t).mean()) for k, v in kinds.items()}
        result["at_threshold"][f"{t:.2f}"] = shares | {
            "digits_with_a_neighbour": chaining[f"{t:.2f}"]
        }
        print(
            f"{t:<10.2f}"
            + "".join(f"{s:>13.3f}" for s in shares.values())
            + f"{chaining[f'{t:.2f}']:>15.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
