"""Decode once: a multi-backbone update against separate updates of the same images, in one run.

    uv run python bench/decode_once.py                  # 96 photo-sized JPEGs, lite0/1/2
    uv run python bench/decode_once.py --images 200 --rounds 2

(1) separate:  `Store.update` of the images into a fresh store per backbone, one after another
               (what `run --backbone A --backbone B --backbone C` did before issue 30);
(2) together:  `update_many` of the same fresh stores: each file hashed once and decoded once
               for every backbone (extractors/store/update_many.py, embedding/multi.py).
Both with the same settings (eager network, default decode threads and batch size). Printed:
wall seconds of each arm and their ratio, the decode stage's seconds (read, decode and each
backbone's resize, summed over threads and stores) and their ratio, the model's seconds, and
how often each image was opened (audit hook: hashing and decoding) in each arm.
With --rounds above 1 the arms alternate and each keeps its fastest round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from extract import make_images  # noqa: E402

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


class Opens:
    """`open` audit events on the images, from every thread."""

    def __init__(self, paths: list[str]):
        self.watched = {os.path.realpath(p) for p in paths}
        self.count: Counter[str] = Counter()
        self.on = False
        self.lock = threading.Lock()
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if self.on and event == "open" and isinstance(args[0], str | os.PathLike):
            path = os.path.realpath(os.fspath(args[0]))
            if path in self.watched:
                with self.lock:
                    self.count[path] += 1

    def per_image(self) -> float:
        return sum(self.count.values()) / len(self.watched)


def run_arm(together: bool, nets: list, source, settings, work: Path, opens: Opens) -> dict:
    from extractors.embedding.engines import LocalEngine
    from extractors.store.store import Store
    from extractors.store.update_many import update_many

    shutil.rmtree(work, ignore_errors=True)
    stores = [Store(work / f"store-{i}") for i in range(len(nets))]
    opens.count.clear()
    opens.on = True
    t = time.perf_counter()
    engine = LocalEngine(settings, progress=False)
    if together:
        reports = update_many(list(zip(stores, nets, strict=True)), source, engine=engine)
    else:
        reports = [st.update(source, n, engine=engine) for st, n in zip(stores, nets, strict=True)]
    wall = time.perf_counter() - t
    opens.on = False
    assert len({r.embedded for r in reports}) == 1 and not any(r.failed for r in reports)
    decode = sum(r.stats["decode_ms_per_image"] * r.embedded for r in reports) / 1000
    model = sum(r.stats["model_ms_per_image"] * r.embedded for r in reports) / 1000
    return {
        "wall_s": wall,
        "decode_s": decode,
        "model_s": model,
        "opens_per_image": opens.per_image(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--backbone", action="append", help=f"repeat; default {', '.join(BACKBONES)}")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "hs-bench-photos")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from extractors.embedding.backbones import create_backbone
    from extractors.embedding.embed import embed_files
    from extractors.embedding.sources import read_source
    from extractors.settings import EmbedSettings

    names = args.backbone or list(BACKBONES)
    paths = make_images(args.cache / f"decode_once-{args.images}", args.images, (1600, 3200))
    source = read_source(Path(paths[0]).parent, "unlabelled")
    nets = [create_backbone(n, device="auto") for n in names]
    for net in nets:  # warm up each network (first-call costs stay out of both arms)
        list(embed_files(net, paths[:4], batch_size=4, progress=False))
    settings = EmbedSettings(compile=False)
    opens = Opens(paths)
    work = Path(tempfile.mkdtemp(prefix="hs-bench-decode-once-"))
    best: dict[str, dict] = {}
    try:
        for _ in range(args.rounds):
            for arm, together in (("separate", False), ("together", True)):
                got = run_arm(together, nets, source, settings, work / arm, opens)
                if arm not in best or got["wall_s"] < best[arm]["wall_s"]:
                    best[arm] = got
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a, b = best["separate"], best["together"]
    result = {
        "images": args.images,
        "backbones": names,
        "device": str(nets[0].device),
        "cpus": os.cpu_count(),
        "separate": a,
        "together": b,
        "wall_ratio": a["wall_s"] / b["wall_s"],
        "decode_ratio": a["decode_s"] / b["decode_s"],
    }
    print(f"{args.images} images, {len(names)} backbones ({', '.join(names)}), {result['device']}")
    print(f"{'arm':10} {'wall s':>7} {'decode s':>9} {'model s':>8} {'opens/image':>12}")
    for arm, r in best.items():
        cols = f"{r['wall_s']:7.1f} {r['decode_s']:9.1f} {r['model_s']:8.1f}"
        print(f"{arm:10} {cols} {r['opens_per_image']:12.1f}")
    ratios = f"wall {result['wall_ratio']:.2f}x, decode {result['decode_ratio']:.2f}x"
    print(f"separate / together: {ratios}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
