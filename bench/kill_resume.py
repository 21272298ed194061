"""Fault script: SIGKILL `embed` at random moments, re-run, and count lost or duplicated rows.

    uv run python bench/kill_resume.py --trials 20

Each trial starts from an empty store over the same folder, kills the embedding process 1-3
times at uniformly random moments of a full run (loading, embedding, committing), then lets a
last run finish. The store must then hold exactly one row per good image (same paths as a
clean reference run, embeddings equal to it), ids unique, the index ids equal to the Parquet
ids, and no staging left. Needs nothing but this repository.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EMBED = """
import sys
from extractors.embedding.backbones import create_backbone
from extractors.embedding.sources import read_source
from extractors.embedding.engines import LocalEngine
from extractors.settings import EmbedSettings
from extractors.store.store import Store
engine = LocalEngine(EmbedSettings(batch_size=8, decode_threads=2), False, checkpoint_rows=16)
Store(sys.argv[2]).update(read_source(sys.argv[1]), create_backbone(device="cpu"), engine=engine)
"""


def run(src: Path, store: Path, kill_after: float | None = None) -> bool:
    """Run one embed; SIGKILL it after `kill_after` seconds. True when it was killed."""
    proc = subprocess.Popen([sys.executable, "-c", EMBED, str(src), str(store)], cwd=ROOT)
    try:
        proc.wait(timeout=kill_after)
        if proc.returncode != 0:
            raise SystemExit(f"embed failed with exit code {proc.returncode}")
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def main() -> None:
    from extractors.store.layout import STAGING, embedding_matrix
    from extractors.store.store import Store
    from flows.sample_data import materialise_digits

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--images-per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        src = materialise_digits(Path(tmp) / "digits", per_class=args.images_per_class)
        ref = Store(Path(tmp) / "reference")
        t0 = time.perf_counter()
        run(src, ref.path)
        full = time.perf_counter() - t0
        ref_table = ref.table()
        ref_rows = dict(
            zip(ref_table["path"].to_pylist(), embedding_matrix(ref_table), strict=True)
        )
        print(f"reference run: {len(ref_rows)} rows in {full:.1f} s; killing within that span")
        kills = lost = duplicated = bad = 0
        for trial in range(args.trials):
            store = Store(Path(tmp) / f"trial-{trial}")
            for _ in range(rng.randint(1, 3)):
                kills += run(src, store.path, kill_after=rng.uniform(0.0, full))
            run(src, store.path)
            table = store.table()
            paths = table["path"].to_pylist()
            lost += len(set(ref_rows) - set(paths))
            duplicated += len(paths) - len(set(paths))
            problems = store.verify() + (
                ["staging left"] if (store.path / STAGING).exists() else []
            )
            emb = embedding_matrix(table)
            same = all(
                np.allclose(ref_rows[p], e, atol=1e-4) for p, e in zip(paths, emb, strict=True)
            )
            bad += bool(problems) or not same
            print(
                f"trial {trial}: rows {len(paths)}, problems {problems or 'none'}, "
                f"embeddings equal to reference: {same}"
            )
            shutil.rmtree(store.path)
        print(
            f"\n{args.trials} trials, {kills} SIGKILLs landed: {lost} rows lost, "
            f"{duplicated} duplicated, {bad} stores with problems"
        )
        raise SystemExit(1 if lost or duplicated or bad else 0)


if __name__ == "__main__":
    main()
