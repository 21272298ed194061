"""Benchmark: the index `headstart` chooses and tunes, against exact (Flat) search, and the
service around it, at 100k and 1M rows, in one run.

    uv run python bench/search.py                       # 100k and 1M rows, 1,280-d
    uv run python bench/search.py --sizes 100000 --json out.json
    uv run python bench/search.py --reuse /tmp/stores   # keep the stores' Parquet for next time

Data: generated like pooled CNN embeddings of a real photo collection: 1,000 clusters of
Zipf-distributed sizes (a few big classes, a long tail) in a 64-d latent space, each cluster a
centre plus its own spread, lifted to 1,280-d through a ReLU, plus per-dimension noise.
Queries are 1,000 fresh draws from the same distribution, never in the index.

For each size, one run:

1. a real store folder: embeddings.parquet in the store's schema (paths
   `/bench/cNNNN/img_XXXXXXX.jpg`, a label per cluster, a fifth of the rows in test),
   rows.arrow and a manifest, as an update writes them;
2. the index built from that Parquet as `headstart index --rebuild` builds it
   (`Store.reindex`: choice from the memory budget, training on a sample, recall tuning on
   held-out rows), timed;
3. the index opened memory-mapped, as the service opens it: recall@10 against exact search,
   queries/s batched (all queries in one call) and one at a time with p50/p99, a random 1% of
   the rows filtered inside FAISS (against over-fetching until k pass), and the same for an
   exact IDMap2(FlatIP) in memory;
4. the service (bench/serving.py): the resident memory of a running `headstart ui` after
   warm-up, what a second `ui` on the same store adds, HTTP latency one request at a time and
   under 8 clients. Targets: the index's own resident size plus at most 300 MB at 1M rows; a
   second process adds at most 100 MB.

Memory is the index in RAM; ivf_pq also keeps float32 vectors on disk for exact re-ranking,
memory-mapped (shown separately).

`--compare FILE` prints this run's build time and recall@10 against an earlier run's results
(the same sizes), e.g. bench/results/search-1m-2026-12-01.json, the 1M build before the
single-pass build of issue 19.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import faiss  # noqa: E402
import serving  # noqa: E402

from extractors.common import human_bytes, normalize  # noqa: E402
from extractors.index.maintain import open_index  # noqa: E402
from extractors.index.recall import exact_topk, recall_at_k  # noqa: E402
from extractors.settings import IndexSettings  # noqa: E402
from extractors.store.layout import VECTORS  # noqa: E402
from extractors.store.store import Store  # noqa: E402

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


def write_store(folder: Path, n: int) -> None:
    """A store folder of `n` generated rows without an index: Parquet, rows.arrow, manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from extractors.common import ROW_GROUP, write_bytes_atomic
    from extractors.search.rows import ROW_COLUMNS, write_rows
    from extractors.store.layout import EMBEDDINGS, FORMAT_VERSION, MANIFEST, schema

    coll = Collection(n)
    folder.mkdir(parents=True, exist_ok=True)
    labels_of = np.random.default_rng(1).choice(CLUSTERS, size=n, p=coll.p)  # Zipf-sized classes
    with pq.ParquetWriter(folder / EMBEDDINGS, schema(DIM), compression="zstd") as w:
        for x, ids in coll.batches():
            pos = (ids - 3) // 7
            labels = [f"c{c:04d}" for c in labels_of[pos]]
            for s in range(0, len(ids), ROW_GROUP):
                sl = slice(s, s + ROW_GROUP)
                rows = len(ids[sl])
                table = pa.table(
                    {
                        "id": ids[sl],
                        "path": [
                            f"/bench/{lab}/img_{p:07d}.jpg"
                            for lab, p in zip(labels[sl], pos[sl], strict=True)
                        ],
                        "sha256": [f"{i:064x}" for i in ids[sl]],
                        "label": labels[sl],
                        "split": np.where(pos[sl] % 5 == 0, "test", "train").tolist(),
                        "width": np.full(rows, 256, np.int32),
                        "height": np.full(rows, 256, np.int32),
                        "bytes": np.full(rows, 30_000, np.int64),
                        "mtime_ns": np.zeros(rows, np.int64),
                        "embedding": pa.FixedSizeListArray.from_arrays(
                            pa.array(x[sl].reshape(-1)), DIM
                        ),
                    },
                    schema=schema(DIM),
                )
                w.write_table(table, ROW_GROUP)
    meta = pq.ParquetFile(folder / EMBEDDINGS).read(columns=ROW_COLUMNS)
    write_rows(folder, folder / EMBEDDINGS, meta)  # as a store's commit does
    manifest = {
        "format_version": FORMAT_VERSION,
        "backbone": "efficientnet_lite0",
        "weights": "bench",
        "preprocessing": {},
        "dim": DIM,
        "rows": n,
        "labelled_rows": n,
        "classes": sorted({f"c{c:04d}" for c in labels_of}),
        "splits": {"train": n - (n + 4) // 5, "val": 0, "test": (n + 4) // 5},
        "failures": 0,
        "fingerprint": f"bench-{n}",
        "source": {"root": "/bench", "kind": "folders", "name": "bench"},
        "split_seed": 0,
        "layers": {},
        "created": "",
        "updated": "",
    }
    write_bytes_atomic(folder / MANIFEST, json.dumps(manifest).encode())


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


def filtered_timings(ann, store: Store, queries, k: int, singles: int) -> dict[str, float]:
    """A random 1% of the rows: our filter inside FAISS against over-fetching until k pass
    (what the search page did before), one query at a time, with recall@k against an exact
    search of that 1%."""
    ids = store.table(["id"])["id"].to_numpy()
    rng = np.random.default_rng(1)
    subset = np.sort(rng.choice(ids, max(k, len(ids) // 100), replace=False))
    member = np.zeros(int(ids.max()) + 1, bool)
    member[subset] = True

    def subset_batches():
        for x, i in store.batches():
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


def index_figures(ann, folder: Path, entry: dict, build_s: float, queries, truth, k, singles):
    """Recall and speed of a built index (opened memory-mapped, as the service opens it)."""
    t = timings(ann.search, queries, k, singles)
    vec = folder / VECTORS
    print(
        f"{entry['type']} ({entry['choice']['reason']}): built in {build_s:.1f} s, tuned "
        f"{entry['tuning']['params']} (held-out recall {entry['tuning']['recall']})",
        flush=True,
    )
    return {
        "index": entry["type"],
        "reason": entry["choice"]["reason"],
        "params": entry["tuning"]["params"],
        "build_s": build_s,
        "memory_bytes": entry["file_bytes"],
        "disk_vectors_bytes": vec.stat().st_size if vec.exists() else 0,
        "recall_at_10": recall_at_k(t.pop("_found"), truth, k),
        "tuning_curve": entry["tuning"]["curve"],
        **t,
    }


def flat_figures(store: Store, n: int, queries, truth, k: int, singles: int) -> dict:
    t = time.perf_counter()
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    for x, i in store.batches():
        flat.add_with_ids(normalize(x), i)
    flat_build = time.perf_counter() - t

    def flat_search(q, kk):
        return flat.search(normalize(q), kk)

    ft = timings(flat_search, queries, k, max(5, singles // 10))
    flat.reset()
    return {
        "index": "IDMap2,Flat",
        "build_s": flat_build,
        "memory_bytes": n * (DIM * 4 + 24),
        "recall_at_10": recall_at_k(ft.pop("_found"), truth, k),
        **ft,
    }


def run_size(n: int, args: argparse.Namespace, previous: list[dict], k: int = 10) -> dict:
    budget, n_queries, singles = args.max_memory, args.queries, args.singles
    print(f"\n== {n:,} vectors x {DIM} ({human_bytes(n * DIM * 4)} float32) ==", flush=True)
    base = args.reuse / str(n) if args.reuse else Path(tempfile.mkdtemp(prefix="hs-bench-"))
    folder = base / "store"
    try:
        t = time.perf_counter()
        if not (args.reuse and (folder / "rows.arrow").exists()):
            shutil.rmtree(folder, ignore_errors=True)
            write_store(folder, n)
            print(f"store written: {time.perf_counter() - t:.0f} s", flush=True)
        store = Store(folder)
        coll = Collection(n)
        queries = coll.queries(n_queries)
        t = time.perf_counter()
        truth = exact_topk(queries, store.batches(), k)
        print(f"ground truth for {n_queries} queries: {time.perf_counter() - t:.1f} s", flush=True)

        settings = IndexSettings(max_memory=budget)
        t = time.perf_counter()
        entry = store.reindex(settings, rebuild=True)  # headstart index --rebuild
        build_s = time.perf_counter() - t
        ann = open_index(folder, entry, mmap=True)
        chosen = index_figures(ann, folder, entry, build_s, queries, truth, k, singles)
        chosen["filtered"] = filtered_timings(ann, store, queries, k, singles)
        del ann
        result = {
            "n": n,
            "budget": budget,
            "chosen": chosen,
            "flat": flat_figures(store, n, queries, truth, k, singles),
        }
        earlier = [e for e in previous if e["n"] == n]
        if earlier:
            result["compared"] = {"file": str(args.compare)} | {
                key: earlier[0]["chosen"][key] for key in ("build_s", "recall_at_10", "index")
            }
        report(result)
        if not args.no_serving:
            with tempfile.TemporaryDirectory(prefix="hs-bench-ws-") as ws:
                result["serving"] = serving.measure(folder, Path(ws))
        return result
    finally:
        if not args.reuse:
            shutil.rmtree(base, ignore_errors=True)


def report(r: dict) -> None:
    c, f = r["chosen"], r["flat"]
    cols = [("chosen", c), ("flat", f)]
    print(f"\n{r['n']:,} vectors, budget {r['budget']}")
    print(f"{'':20}" + "".join(f"{name:>22}" for name, _ in cols) + f"{'chosen/flat':>13}")
    rows = [
        ("index", lambda x: x["index"], ""),
        ("build s", lambda x: f"{x['build_s']:.1f}", ""),
        (
            "memory (RAM)",
            lambda x: human_bytes(x["memory_bytes"]),
            f"{c['memory_bytes'] / f['memory_bytes']:.2f}x",
        ),
        ("recall@10", lambda x: f"{x['recall_at_10']:.4f}", ""),
        (
            "queries/s batched",
            lambda x: f"{x['qps_batched']:.0f}",
            f"{c['qps_batched'] / f['qps_batched']:.1f}x",
        ),
        (
            "queries/s single",
            lambda x: f"{x['qps_single']:.0f}",
            f"{c['qps_single'] / f['qps_single']:.1f}x",
        ),
        ("p50 ms", lambda x: f"{x['p50_ms']:.2f}", ""),
        ("p99 ms", lambda x: f"{x['p99_ms']:.2f}", ""),
    ]
    for name, get, ratio in rows:
        print(f"{name:20}" + "".join(f"{get(x):>22}" for _, x in cols) + f"{ratio:>13}")
    if r.get("compared"):
        e = r["compared"]
        print(
            f"against {e['file']}: build {c['build_s']:.0f} s vs {e['build_s']:.0f} s "
            f"({e['build_s'] / c['build_s']:.2f}x faster), recall@10 {c['recall_at_10']:.4f} vs "
            f"{e['recall_at_10']:.4f}, index {c['index']} vs {e['index']}"
        )
    if c["disk_vectors_bytes"]:
        print(f"re-rank vectors on disk (memory-mapped): {human_bytes(c['disk_vectors_bytes'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--max-memory", default="2GB", help="index memory budget (default 2GB)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--singles", type=int, default=200, help="one-at-a-time queries timed")
    ap.add_argument("--reuse", type=Path, help="keep the generated stores here and reuse them")
    ap.add_argument("--compare", type=Path, help="an earlier run's --json, to compare with")
    ap.add_argument("--no-serving", action="store_true", help="skip the `ui` measurements")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    previous = json.loads(args.compare.read_text()) if args.compare else []
    results = []
    for n in args.sizes:
        results.append(run_size(n, args, previous))
        if args.json:  # after each size: a long run keeps what it measured
            args.json.write_text(json.dumps(results, indent=2))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS of this process: {peak:.1f} GB (includes the exact index)")


if __name__ == "__main__":
    main()
