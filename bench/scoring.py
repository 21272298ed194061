"""Scoring benchmark: `predict FOLDER --out` against `embed` on the same images, in one run.

    uv run python bench/scoring.py                 # 300 photo-sized JPEGs (bench/extract.py's)
    uv run python bench/scoring.py --images 1000

(1) embed:            Store.update of the images into a fresh store (the training path);
(2) score, cold:      score_source of the same images with a head, nothing to reuse: embeds
                      into its own staging, then scores and writes the predictions table;
(3) score, reused:    the same with the store of (1) as donor: every embedding is copied by
                      content hash, none computed.
Ratios are images/s of each against (1); the default backbone, CPU or GPU as found.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from extract import make_images  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "hs-bench-photos")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from sklearn.linear_model import LogisticRegression

    from extractors.embedding.backbones import create_backbone
    from extractors.embedding.sources import read_source
    from extractors.store.store import Store
    from heads.classifier import ImageClassifier
    from heads.scoring.runner import score_source

    paths = make_images(args.cache / "scoring", args.images, (640, 1600))
    folder = Path(paths[0]).parent
    bb = create_backbone(device="auto")
    work = Path(tempfile.mkdtemp(prefix="hs-bench-scoring-"))
    try:
        source = read_source(folder, "unlabelled")
        t = time.perf_counter()
        store = Store(work / "store")
        store.update(source, bb, progress=False)
        embed_s = time.perf_counter() - t

        X = store.arrays(where_labelled=False)[0]
        y = np.arange(len(X)) % 3  # any three classes: scoring cost does not depend on them
        head = LogisticRegression(max_iter=200).fit(X, y.astype(str))
        model = ImageClassifier(bb.name, bb.weights, list(head.classes_), "bench", head).bind(bb)

        t = time.perf_counter()
        cold = score_source(source, bb, model, work / "cold.parquet", progress=False)
        cold_s = time.perf_counter() - t
        t = time.perf_counter()
        reused = score_source(
            source, bb, model, work / "reused.parquet", donor=store.path, progress=False
        )
        reused_s = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(paths)
    rows = {
        "embed": {"seconds": embed_s, "images_per_s": n / embed_s},
        "score_cold": {"seconds": cold_s, "images_per_s": n / cold_s, "embedded": cold.embedded},
        "score_reused": {
            "seconds": reused_s,
            "images_per_s": n / reused_s,
            "reused": reused.reused,
        },
    }
    print(f"{n} images, {bb.name} on {bb.device}")
    for name, r in rows.items():
        ratio = r["images_per_s"] / rows["embed"]["images_per_s"]
        print(f"  {name:13s} {r['images_per_s']:8.1f} images/s   {ratio:5.2f}x embed")
    if args.json:
        args.json.write_text(json.dumps({"images": n, "device": str(bb.device), **rows}, indent=2))


if __name__ == "__main__":
    main()
