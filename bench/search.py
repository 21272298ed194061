"""Benchmark: the index `headstart` chooses and tunes, against exact (Flat) search.

    uv run python bench/search.py                       # 100k and 1M vectors, 1,280-d
    uv run python bench/search.py --sizes 100000 --max-memory 2GB

Data: generated like pooled CNN embeddings of a real photo collection: 1,000 clusters of
Zipf-distributed sizes (a few big classes, a long tail) in a 64-d latent space, each cluster a
centre plus its own spread, lifted to 1,280-d through a ReLU, plus per-dimension noise.
Queries are 1,000 fresh draws from the same distribution, never in the index.

For each size it builds, in one run: the chosen index through the same code as a store
(`extractors.store_index.refresh`: choice from the memory budget, training, recall tuning on
held-out queries) and an exact IDMap2(FlatIP). For both it prints build time, resident size,
recall@10 against exact search, queries/s batched (all queries in one call) and one at a time
with p50/p99 latency, and the ratio chosen/Flat. Memory is the index in RAM; ivf_pq also keeps
float32 vectors on disk for exact re-ranking, memory-mapped (shown separately).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss

from extractors.common import human_bytes, normalize
from extractors.layout import VECTORS
from extractors.recall import exact_topk, recall_at_k
from extractors.settings import IndexSettings
from extractors.store_index import open_index, refresh

DIM, LATENT, CLUSTERS, CHUNK = 1280, 64, 1000, 50_000


class Collection:
    """A reproducible generated collection, streamed in chunks (chunk i is seeded by i)."""

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.n, self.seed = n, seed
        self.centres = rng.normal(0, 1.0, (CLUSTERS, LATENT)).astype(np.float32)
        self.spread = rng.uniform(0.3, 0.9, CLUSTERS).astype(np.float32)
        weights = 1 / np.arange(1, CLUSTERS + 1) ** 0.8
        self.p = weights / weights.sum()
        self.lift = rng.normal(0, 1 / np.sqrt(LATENT), (LATENT, DIM)).astype(np.float32)

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        c = rng.choice(CLUSTERS, size=n, p=self.p)
        noise = rng.normal(0, 1, (n, LATENT)).astype(np.float32)
        z = self.centres[c] + noise * self.spread[c, None]
        x = np.maximum(z @ self.lift, 0) + rng.normal(0, 0.05, (n, DIM)).astype(np.float32)
        return normalize(x)

    def chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start = i * CHUNK
        size = min(CHUNK, self.n - start)
        rng = np.random.default_rng([self.seed, i])
        return self.draw(size, rng), np.arange(start, start + size, dtype=np.int64) * 7 + 3

    def batches(self):
        for i in range((self.n + CHUNK - 1) // CHUNK):
            yield self.chunk(i)

    def queries(self, n: int) -> np.ndarray:
        return self.draw(n, np.random.default_rng([self.seed, 10**6]))


def timings(search, queries: np.ndarray, k: int, singles: int) -> dict[str, float]:
    search(queries[:8], k)
    start = time.perf_counter()
    _, found = search(queries, k)
    batched = time.perf_counter() - start
    lat = []
    for q in queries[:singles]:
        t = time.perf_counter()
        search(q[None], k)
        lat.append(1000 * (time.perf_counter() - t))
    return {
        "qps_batched": len(queries) / batched,
        "qps_single": 1000 / float(np.mean(lat)),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "_found": found,
    }


def filtered_timings(ann, coll, ids, queries, k: int, singles: int) -> dict[str, float]:
    """A label on 1% of the rows: our filter inside FAISS against over-fetching until k pass
    (what the search page did before), one query at a time, with recall@k against an exact
    search of that 1%."""
    rng = np.random.default_rng(1)
    subset = np.sort(rng.choice(ids, max(k, len(ids) // 100), replace=False))
    member = np.zeros(int(ids.max()) + 1, bool)
    member[subset] = True

    def subset_batches():
        for x, i in coll.batches():
            keep = member[i]
            yield x[keep], i[keep]

    qs = queries[:singles]
    truth = exact_topk(qs, subset_batches(), k)

    def overfetch(q):
        fetch = 4 * k + 1
        while True:
            _, found = ann.search(q, fetch)
            hits = found[0][member[np.maximum(found[0], 0)] & (found[0] >= 0)]
            if len(hits) >= k or fetch >= ann.ntotal:
                return hits[:k]
            fetch = min(ann.ntotal, fetch * 4)

    out = {}
    for name, run in (
        ("ours", lambda q: ann.search(q, k, allowed=subset)[1][0]),
        ("overfetch", overfetch),
        ("unfiltered", lambda q: ann.search(q, k)[1][0]),
    ):
        run(qs[:1])
        lat, found = [], []
        for q in qs:
            t = time.perf_counter()
            found.append(np.pad(run(q[None]), (0, k))[:k])
            lat.append(1000 * (time.perf_counter() - t))
        out[f"{name}_p50_ms"] = float(np.percentile(lat, 50))
        out[f"{name}_p99_ms"] = float(np.percentile(lat, 99))
        if name != "unfiltered":
            out[f"{name}_recall"] = recall_at_k(np.stack(found), truth, k)
    print(
        f"filtered to 1% ({len(subset):,} rows), one at a time p50: ours "
        f"{out['ours_p50_ms']:.2f} ms (recall {out['ours_recall']:.3f}), over-fetching "
        f"{out['overfetch_p50_ms']:.2f} ms (recall {out['overfetch_recall']:.3f}), unfiltered "
        f"{out['unfiltered_p50_ms']:.2f} ms",
        flush=True,
    )
    return out


def run_size(n: int, max_memory: str, n_queries: int, singles: int, k: int) -> dict:
    coll = Collection(n)
    queries = coll.queries(n_queries)
    print(f"\n== {n:,} vectors x {DIM} ({human_bytes(n * DIM * 4)} float32) ==", flush=True)
    t = time.perf_counter()
    ids = np.concatenate([i for _, i in coll.batches()])
    truth = exact_topk(queries, coll.batches(), k)
    print(f"ground truth for {n_queries} queries: {time.perf_counter() - t:.1f} s", flush=True)

    folder = Path(tempfile.mkdtemp(prefix="hs-bench-search-"))
    try:
        t = time.perf_counter()
        entry = refresh(
            folder, coll.batches, ids, DIM, settings=IndexSettings(max_memory=max_memory)
        )
        build_s = time.perf_counter() - t
        ann = open_index(folder, entry)
        chosen = timings(ann.search, queries, k, singles)
        filtered = filtered_timings(ann, coll, ids, queries, k, singles)
        choice = entry["choice"]
        print(
            f"chosen: {entry['type']} ({choice['reason']}); build {build_s:.1f} s; "
            f"tuned {entry['tuning']['params']} (held-out recall {entry['tuning']['recall']})",
            flush=True,
        )
        vec_disk = (folder / VECTORS).stat().st_size if (folder / VECTORS).exists() else 0
        res_chosen = {
            "index": entry["type"],
            "reason": choice["reason"],
            "params": entry["tuning"]["params"],
            "build_s": build_s,
            "memory_bytes": entry["file_bytes"],
            "disk_vectors_bytes": vec_disk,
            "recall_at_10": recall_at_k(chosen.pop("_found"), truth, k),
            "tuning_curve": entry["tuning"]["curve"],
            **chosen,
            "filtered": filtered,
        }
        del ann
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    t = time.perf_counter()
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    for x, i in coll.batches():
        flat.add_with_ids(x, i)
    flat_build = time.perf_counter() - t

    def flat_search(q, kk):
        return flat.search(normalize(q), kk)

    ft = timings(flat_search, queries, k, max(5, singles // 10))
    res_flat = {
        "index": "IDMap2,Flat",
        "build_s": flat_build,
        "memory_bytes": n * (DIM * 4 + 24),
        "recall_at_10": recall_at_k(ft.pop("_found"), truth, k),
        **ft,
    }
    flat.reset()
    return {"n": n, "budget": max_memory, "chosen": res_chosen, "flat": res_flat}


def report(r: dict) -> None:
    c, f = r["chosen"], r["flat"]
    print(f"\n{r['n']:,} vectors, budget {r['budget']}")
    print(f"{'':22}{'chosen':>16}{'flat':>14}{'ratio':>10}")
    rows = [
        ("index", c["index"], f["index"], ""),
        ("build s", f"{c['build_s']:.1f}", f"{f['build_s']:.1f}", ""),
        (
            "memory (RAM)",
            human_bytes(c["memory_bytes"]),
            human_bytes(f["memory_bytes"]),
            f"{c['memory_bytes'] / f['memory_bytes']:.2f}x",
        ),
        ("recall@10", f"{c['recall_at_10']:.4f}", f"{f['recall_at_10']:.4f}", ""),
        (
            "queries/s batched",
            f"{c['qps_batched']:.0f}",
            f"{f['qps_batched']:.1f}",
            f"{c['qps_batched'] / f['qps_batched']:.1f}x",
        ),
        (
            "queries/s single",
            f"{c['qps_single']:.0f}",
            f"{f['qps_single']:.1f}",
            f"{c['qps_single'] / f['qps_single']:.1f}x",
        ),
        ("p50 ms", f"{c['p50_ms']:.2f}", f"{f['p50_ms']:.1f}", ""),
        ("p99 ms", f"{c['p99_ms']:.2f}", f"{f['p99_ms']:.1f}", ""),
    ]
    for name, a, b, ratio in rows:
        print(f"{name:22}{a:>16}{b:>14}{ratio:>10}")
    if c["disk_vectors_bytes"]:
        print(f"re-rank vectors on disk (memory-mapped): {human_bytes(c['disk_vectors_bytes'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--max-memory", default="2GB", help="index memory budget (default 2GB)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--singles", type=int, default=200, help="one-at-a-time queries timed")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    results = []
    for n in args.sizes:
        results.append(run_size(n, args.max_memory, args.queries, args.singles, 10))
        report(results[-1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS of this process: {peak:.1f} GB (includes the generated vectors)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
