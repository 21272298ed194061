"""Benchmark: how well `headstart rank` (LogME before any training) predicts what training then
finds, on real image sets built offline from data shipped in installed packages.

    uv run python bench/rank.py
    uv run python bench/rank.py --per-class 30 --out bench/results/rank-$(date +%F).json

Sets (random crops are cut with a fixed seed, written as PNGs into a temporary folder). Every
image but the digits is shrunk to `--low` px (default 12) and scaled back up: at full
resolution every candidate reaches 100% on the textures, photos and faces, every candidate
ties and tau says nothing.

  digits    scikit-learn's handwritten digits (8x8 scans, upscaled), 10 classes
  textures  greyscale 32-64 px crops of 8 of scikit-image's textured images (brick, grass,
            gravel, moon, cell, hubble_deep_field, immunohistochemistry, retina), 8 classes
  photos    greyscale crops of 15-35% of the side of 8 of scikit-image's photos (astronaut,
            camera, chelsea, clock, coffee, coins, rocket, page), flipped and brightened at
            random, 8 classes
  faces     scikit-image's `lfw_subset`: 25x25 faces against 25x25 non-faces, 2 classes

Candidates: efficientnet_lite0/1/2, each with its penultimate `embedding` and its `--layers=-2`
column: 6 per set. Each set goes through `rank_backbones` (flows/steps/ranking.py: one split
for every store, LogME and H-score on the shared train images), then each candidate gets the
project's heads (`--heads`, default logreg and knn, the protocol of heads/evaluate.py: swept on
train, chosen on validation) and its best head's validation accuracy. Per set:

  tau       Kendall's tau-b between LogME and that validation accuracy over the candidates
            (undefined where every candidate ties; the mean is over the others)
  regret    best validation accuracy minus that of LogME's top-ranked candidate
  ratio     seconds of training the heads / seconds of the estimates, per candidate (median);
            both come after the embedding, which they share

Prints a table and writes the JSON (default bench/results/rank-<date>.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
LAYERS = ["-2"]
TEXTURES = (
    "brick", "grass", "gravel", "moon", "cell", "hubble_deep_field", "immunohistochemistry",
    "retina",
)  # fmt: skip
PHOTOS = ("astronaut", "camera", "chelsea", "clock", "coffee", "coins", "rocket", "page")
SIDE = 96  # px of the written crops; every backbone resizes them to its own input size


def _low(img: Any, low: int, side: int = SIDE) -> Any:
    """`img` shrunk to `low` px and scaled back up to `side` px (a low-resolution copy)."""
    from PIL import Image

    return img.resize((low, low), Image.BILINEAR).resize((side, side), Image.BILINEAR)


def _rgb(name: str) -> Any:
    """One of scikit-image's data images as an 8-bit RGB PIL image."""
    from PIL import Image
    from skimage import data

    pixels = getattr(data, name)()
    if pixels.dtype != np.uint8:
        pixels = (pixels / max(pixels.max(), 1) * 255).astype(np.uint8)
    return Image.fromarray(pixels).convert("RGB")


def _save(img: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


def make_textures(root: Path, per_class: int, low: int, seed: int = 0) -> Path:
    """Greyscale crops of 32-64 px at random places of each texture image, at `low` px
    resolution, as SIDE px PNGs."""
    rng = np.random.default_rng(seed)
    for name in TEXTURES:
        img = _rgb(name).convert("L")
        w, h = img.size
        for i in range(per_class):
            side = int(rng.integers(32, 65))
            x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            _save(
                _low(img.crop((x, y, x + side, y + side)), low), root / name / f"{name}_{i:03d}.png"
            )
    return root


def make_photos(root: Path, per_class: int, low: int, seed: int = 0) -> Path:
    """Greyscale crops of 15-35% of each photo's shorter side, at random places, flipped half
    the time and brightened by 0.7-1.3x, at `low` px resolution, as SIDE px PNGs."""
    from PIL import ImageEnhance, ImageOps

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        img = _rgb(name).convert("L")
        w, h = img.size
        for i in range(per_class):
            side = int(min(w, h) * rng.uniform(0.15, 0.35))
            x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            crop = _low(img.crop((x, y, x + side, y + side)), low)
            if rng.random() < 0.5:
                crop = ImageOps.mirror(crop)
            crop = ImageEnhance.Brightness(crop).enhance(float(rng.uniform(0.7, 1.3)))
            _save(crop, root / name / f"{name}_{i:03d}.png")
    return root


def make_faces(root: Path, per_class: int, low: int) -> Path:
    """scikit-image's lfw_subset (100 faces, then 100 non-faces, 25x25), up to `per_class` each,
    at `low` px resolution, as 64 px PNGs."""
    from PIL import Image
    from skimage import data

    images = data.lfw_subset()
    for label, block in (("face", images[:100]), ("non_face", images[100:])):
        for i, pixels in enumerate(block[:per_class]):
            img = Image.fromarray((pixels * 255).astype(np.uint8), mode="L")
            _save(_low(img, low, 64), root / label / f"{label}_{i:03d}.png")
    return root


def make_sets(folder: Path, per_class: int, low: int) -> dict[str, Path]:
    """Every set of the bench, by name, under `folder`."""
    from flows.sample_data import materialise_digits

    return {
        "digits": materialise_digits(folder / "digits", per_class=per_class),
        "textures": make_textures(folder / "textures", per_class, low),
        "photos": make_photos(folder / "photos", per_class, low),
        "faces": make_faces(folder / "faces", per_class, low),
    }


def trained_candidate(candidate: dict[str, Any], heads: list[str]) -> dict[str, Any]:
    """The project's heads on one candidate's column (train split, chosen on validation): the
    best head's validation accuracy, each head's, and the seconds the heads took."""
    from extractors.store.store import Store
    from heads.train import splits_of, train_heads

    st = Store(candidate["store"])
    x, meta = st.arrays(feature=candidate["feature"])
    labels, split = meta["label"].to_pylist(), meta["split"].to_pylist()
    start = time.perf_counter()
    trained = train_heads({candidate["feature"]: splits_of(x, labels, split)}, heads=heads)
    train_s = time.perf_counter() - start
    return {
        "val_acc": trained.best.val_score,
        "selection_metric": trained.best.selection_metric,
        "best_head": trained.best.name,
        "heads_val": {r.name: r.val_score for r in trained.results},
        "val_images": len(trained.splits.y_val),
        "train_s": train_s,
    }


def agreement(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """Kendall's tau-b of LogME (and of H-score) against validation accuracy, and the regret of
    LogME's top pick."""
    from scipy.stats import kendalltau

    acc = np.array([c["val_acc"] for c in candidates])
    out: dict[str, Any] = {}
    for est in ("logme", "h_score"):
        res = kendalltau([c[est] for c in candidates], acc)
        defined = not np.isnan(res.statistic)  # undefined when every candidate ties
        out[f"tau_{est}"] = float(res.statistic) if defined else None
        out[f"p_{est}"] = float(res.pvalue) if defined else None
    top = max(candidates, key=lambda c: c["logme"])
    best = max(candidates, key=lambda c: c["val_acc"])
    ratios = [c["train_s"] / c["score_s"] for c in candidates]
    return out | {
        "pick": _name(top),
        "best": _name(best),
        "regret": float(best["val_acc"] - top["val_acc"]),
        "train_over_estimate": float(np.median(ratios)),
        "score_s": float(np.median([c["score_s"] for c in candidates])),
        "train_s": float(np.median([c["train_s"] for c in candidates])),
    }


def _name(candidate: dict[str, Any]) -> str:
    return f"{candidate['backbone'].removeprefix('efficientnet_')}/{candidate['feature']}"


def bench_set(name: str, source: Path, workspace: Path, heads: list[str]) -> dict[str, Any]:
    """Rank the candidates on one set, train heads on each, compare."""
    from extractors.settings import EmbedSettings
    from flows.steps.ranking import rank_backbones

    start = time.perf_counter()
    ranking = rank_backbones(
        source, list(BACKBONES), EmbedSettings(layers=LAYERS), workspace, progress=False
    )
    rank_s = time.perf_counter() - start
    candidates = [c | trained_candidate(c, heads) for c in ranking["candidates"]]
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    return {
        "set": name,
        "classes": classes,
        "images": sum(1 for _ in source.rglob("*.png")),
        "train_images": ranking["train_images"],
        "val_images": candidates[0]["val_images"],
        "rank_s": rank_s,
        "candidates": candidates,
    } | agreement(candidates)


def table(sets: list[dict[str, Any]]) -> str:
    """Per set: each candidate's LogME, H-score and validation accuracy, then tau and regret."""
    lines = []
    for s in sets:
        lines.append(
            f"\n{s['set']}: {len(s['classes'])} classes, {s['images']} images "
            f"({s['train_images']} train, {s['val_images']} val)"
        )
        lines.append(f"  {'candidate':<22}{'LogME':>8}{'H-score':>9}{'val acc':>9}  best head")
        for c in sorted(s["candidates"], key=lambda c: -c["logme"]):
            lines.append(
                f"  {_name(c):<22}{c['logme']:>8.3f}{c['h_score']:>9.2f}{c['val_acc']:>9.3f}"
                f"  {c['best_head']}"
            )
        lines.append(
            f"  tau(LogME, acc) {_tau(s, 'logme')}, tau(H-score, acc) {_tau(s, 'h_score')}; "
            f"pick {s['pick']}, best {s['best']}, "
            f"regret {s['regret']:.3f}; heads {s['train_s']:.2f} s vs estimate "
            f"{s['score_s']:.3f} s a candidate ({s['train_over_estimate']:.0f}x)"
        )
    return "\n".join(lines)


def _tau(s: dict[str, Any], est: str) -> str:
    if s[f"tau_{est}"] is None:
        return "undefined (every candidate ties)"
    return f"{s[f'tau_{est}']:+.2f} (p {s[f'p_{est}']:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=40, help="images per class of each set")
    ap.add_argument("--low", type=int, default=12, help="px the crop sets are shrunk to")
    ap.add_argument("--heads", nargs="+", default=["logreg", "knn"])
    ap.add_argument("--sets", nargs="+", default=["digits", "textures", "photos", "faces"])
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: bench/results/)")
    args = ap.parse_args()
    date = dt.date.today().isoformat()
    out = args.out or ROOT / "bench" / "results" / f"rank-{date}.json"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sets = make_sets(Path(tmp) / "sets", args.per_class, args.low)
        results = [
            bench_set(name, sets[name], Path(tmp) / "workspace", args.heads) for name in args.sets
        ]
    print(table(results))
    taus = [s["tau_logme"] for s in results if s["tau_logme"] is not None]
    regrets = [s["regret"] for s in results]
    mean_tau = float(np.mean(taus)) if taus else None
    shown = "undefined" if mean_tau is None else f"{mean_tau:+.2f}"
    print(f"\nmean tau {shown} over {len(taus)} sets, mean regret {np.mean(regrets):.3f}")
    record = {
        "date": date,
        "machine": "2-core CPU, shared",
        "per_class": args.per_class,
        "low": args.low,
        "heads": args.heads,
        "backbones": list(BACKBONES),
        "layers": LAYERS,
        "seconds": time.perf_counter() - start,
        "mean_tau_logme": mean_tau,
        "mean_regret": float(np.mean(regrets)),
        "sets": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
