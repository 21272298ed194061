"""Benchmark: embedding images from object storage vs the same images from local files (issue 33).

    uv run python bench/objects.py                 # writes bench/results/objects-<date>.json
    uv run python bench/objects.py --per-class 20  # a quicker round

Real images: scikit-learn's handwritten digits as `materialise_digits` writes them (PNG,
`--per-class` per class, 10 classes), uploaded to a real S3-compatible server on loopback
(moto's server mode, tests/s3server.py). Each case builds a fresh store with the default
backbone (efficientnet_lite0, CPU) and reports images/s end to end (listing, hashing,
decoding, the network, the commit and the index), as ratios to the local engine on local
files, from one run:

    local files      --engine local, the images in a folder
    bucket           --engine local, the images under s3://bench/digits/
    bucket, dask 1   --engine dask with a local cluster of 1 worker process
    bucket, dask 2   the same with 2 worker processes (each gets half the cores)
    local, dask 2    local files with 2 worker processes: what Dask itself costs here

and, for the Dask cases, the bytes moved per image from the workers to the client (the
shard's rows, zstd-compressed Arrow) and the object GETs per image (the plan's hash and the
worker's decode each read an object once). On loopback the bucket costs only the S3
protocol (and moto's Python server shares the two cores); over a network add the round
trips, which the threads of both reads overlap. A Dask run includes starting its cluster
and building the backbone in each worker, a fixed cost that a larger update spreads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extractors.embedding.backbones import create_backbone  # noqa: E402
from extractors.embedding.engines import DaskEngine  # noqa: E402
from extractors.embedding.sources import read_source  # noqa: E402
from extractors.store.store import Store  # noqa: E402
from flows.sample_data import materialise_digits  # noqa: E402
from tests.s3server import S3Server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=60)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-objects-"))
    folder = materialise_digits(work / "digits", per_class=args.per_class)
    server = S3Server(work)
    os.environ.update(server.env)
    bucket = server.bucket("bench")
    server.upload(folder, bucket, "digits")
    backbone = create_backbone("efficientnet_lite0", device="cpu")
    # warm-up (the first batches of a process pay for lazy initialisation), not timed
    Store(work / "warm-up").update(read_source(folder / "0"), backbone, progress=False)
    cases = {
        "local files": (str(folder), None),
        "bucket": (f"s3://{bucket}/digits/", None),
        "bucket, dask 1": (f"s3://{bucket}/digits/", 1),
        "bucket, dask 2": (f"s3://{bucket}/digits/", 2),
        "local files, dask 2": (str(folder), 2),
    }
    results = {}
    try:
        for name, (source, workers) in cases.items():
            gets = server.gets(bucket)
            engine = DaskEngine(workers=workers, progress=False) if workers else None
            started = time.perf_counter()
            report = Store(work / name.replace(", ", "-").replace(" ", "-")).update(
                read_source(source), backbone, progress=False, engine=engine
            )
            seconds = time.perf_counter() - started
            n = report.rows
            results[name] = {
                "images": n,
                "images_per_s": n / seconds,
                "bytes_moved_per_image": report.stats.get("bytes_moved_per_image", 0.0),
                "gets_per_image": (server.gets(bucket) - gets) / n,
            }
            print(f"{name:16s} {n} images, {n / seconds:6.1f} images/s", flush=True)
    finally:
        server.close()
    base = results["local files"]["images_per_s"]
    for name, r in results.items():
        r["vs_local_files"] = r["images_per_s"] / base
        print(
            f"{name:16s} {r['vs_local_files']:.2f}x local files; "
            f"{r['bytes_moved_per_image']:.0f} B/image worker->client; "
            f"{r['gets_per_image']:.1f} GET/image"
        )
    out = ROOT / "bench" / "results" / f"objects-{datetime.date.today()}.json"
    out.write_text(json.dumps({"per_class": args.per_class, "cases": results}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
