"""Serving benchmark: what a running `headstart ui` costs in memory, what a second one on the
same store adds, and its HTTP query latency, one request at a time and under 8 clients.

    uv run python bench/serving.py                        # 100k and 1M rows
    uv run python bench/serving.py --sizes 100000 --json bench/results/serving.json
    uv run python bench/serving.py --reuse /tmp/stores    # keep the stores, reuse them next time

Each size is a real store folder (embeddings.parquet in the store's schema, the index that
`refresh` chooses and tunes, a manifest), written from bench/search.py's generated collection
(1,280-d, clustered like pooled CNN features) with paths `/bench/cNNNN/img_XXXXXXX.jpg` and
labels by cluster. Then, for one and then two `headstart ui` processes on it:

- memory, read from /proc after a warm-up of 300 queries: VmRSS; its private part (RssAnon:
  what the process alone holds); its file-backed part (one copy in the page cache however many
  processes map it) split into the index's own files (index.faiss, and for ivf_pq the re-rank
  vectors.f32 and vector_ids.npy), rows.arrow and the libraries;
- the index's files are read once first, so they are in the page cache as on a machine where
  the service has run a while;
- latency of GET /api/search/id/{id}?k=10 for random stored rows (the row's vector from the
  index, the search, the hits' metadata), p50/p99 one request at a time, then with 8 client
  threads at once (and their throughput); and the same with a label filter (a 1% class).

Targets (issue 19): a running `ui` costs the index's own resident size plus at most 300 MB at
1M rows; a second process adds at most 100 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from search import CLUSTERS, DIM, Collection  # noqa: E402

WARMUP, SINGLES, CLIENTS, PER_CLIENT = 300, 400, 8, 100


def write_store(folder: Path, n: int) -> dict:
    """A store folder of `n` generated rows; returns its index entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from extractors.common import ROW_GROUP, write_bytes_atomic
    from extractors.layout import EMBEDDINGS, FORMAT_VERSION, MANIFEST, schema
    from extractors.store_index import refresh

    coll = Collection(n)
    sch = schema(DIM)
    folder.mkdir(parents=True, exist_ok=True)
    labels_of = np.random.default_rng(1).choice(CLUSTERS, size=n, p=coll.p)  # Zipf-sized classes
    with pq.ParquetWriter(folder / EMBEDDINGS, sch, compression="zstd") as w:
        for x, ids in coll.batches():
            pos = (ids - 3) // 7
            labels = [f"c{c:04d}" for c in labels_of[pos]]
            for s in range(0, len(ids), ROW_GROUP):
                sl = slice(s, s + ROW_GROUP)
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
                        "width": np.full(len(ids[sl]), 256, np.int32),
                        "height": np.full(len(ids[sl]), 256, np.int32),
                        "bytes": np.full(len(ids[sl]), 30_000, np.int64),
                        "mtime_ns": np.zeros(len(ids[sl]), np.int64),
                        "embedding": pa.FixedSizeListArray.from_arrays(
                            pa.array(x[sl].reshape(-1)), DIM
                        ),
                    },
                    schema=sch,
                )
                w.write_table(table, ROW_GROUP)
    from extractors.query import ROW_COLUMNS, write_rows

    meta = pq.ParquetFile(folder / EMBEDDINGS).read(columns=ROW_COLUMNS)
    write_rows(folder, folder / EMBEDDINGS, meta)  # as a store's commit does
    del meta
    ids = np.concatenate([i for _, i in coll.batches()])
    t = time.perf_counter()
    entry = refresh(folder, coll.batches, ids, DIM)
    build_s = time.perf_counter() - t
    classes = sorted({f"c{c:04d}" for c in labels_of})
    manifest = {
        "format_version": FORMAT_VERSION,
        "backbone": "efficientnet_lite0",
        "weights": "bench",
        "preprocessing": {},
        "dim": DIM,
        "rows": n,
        "labelled_rows": n,
        "classes": classes,
        "splits": {"train": n - (n + 4) // 5, "val": 0, "test": (n + 4) // 5},
        "failures": 0,
        "fingerprint": f"bench-{n}",
        "source": {"root": "/bench", "kind": "folders", "name": "bench"},
        "split_seed": 0,
        "layers": {},
        "index": entry,
        "created": "",
        "updated": "",
    }
    manifest["index"]["build_s"] = build_s
    write_bytes_atomic(folder / MANIFEST, json.dumps(manifest).encode())
    return entry | {"build_s": build_s}


def warm_page_cache(store: Path) -> None:
    """Read the index's files once, as a machine where the service has run a while holds them
    in its page cache (a cold re-rank file costs a disk read per candidate)."""
    for name in (*INDEX_FILES, "vector_lookup.npy", "rows.arrow"):
        path = store / name
        if path.exists():
            with open(path, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(store: Path, workspace: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "ui",
        "--store",
        str(store),
        "--port",
        str(port),
        "--workspace",
        str(workspace),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode()[-2000:])
        try:
            if httpx.get(f"{base}/api/info", timeout=5).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError("ui did not start")


INDEX_FILES = ("index.faiss", "vectors.f32", "vector_ids.npy")


def memory(pid: int) -> dict[str, float]:
    """Resident memory from /proc: in all, private (RssAnon: this process's alone), and the
    file-backed part split into the index's own files, the rows file and the rest (libraries).
    File pages are the page cache's: one copy however many processes map them."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status)
    mb = {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
    per_file: dict[str, float] = {}
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else ""
        elif line.startswith("Rss:"):
            key = Path(name).name
            per_file[key] = per_file.get(key, 0) + int(head[1]) / 1024
    index = sum(per_file.get(f, 0) for f in INDEX_FILES)
    return {
        "rss_mb": mb["VmRSS"],
        "private_mb": mb["RssAnon"],
        "file_mb": mb["RssFile"],
        "index_files_mb": index,
        "rows_file_mb": per_file.get("rows.arrow", 0),
        "beyond_index_mb": mb["VmRSS"] - index,
    }


def latencies(base: str, ids: np.ndarray, label: str | None, clients: int, per: int) -> dict:
    import httpx

    rng = np.random.default_rng(clients)
    params = {"k": 10} | ({"label": label} if label else {})
    times: list[float] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as c:
            for i in rng.choice(ids, size=n):
                t = time.perf_counter()
                r = c.get(f"/api/search/id/{i}", params=params)
                dt = time.perf_counter() - t
                assert r.status_code == 200, r.text
                with lock:
                    times.append(dt)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(per,)) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    ms = np.array(times) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "queries_per_s": len(ms) / wall,
    }


def run_size(n: int, keep: bool, reuse: Path | None = None) -> dict:
    folder = reuse / str(n) if reuse else Path(tempfile.mkdtemp(prefix=f"hs-bench-serving-{n}-"))
    try:
        t = time.perf_counter()
        if reuse and (folder / "store" / "manifest.json").exists():
            m = json.loads((folder / "store" / "manifest.json").read_text())
            entry = m["index"] | {"build_s": m["index"].get("build_s", float("nan"))}
        else:
            entry = write_store(folder / "store", n)
        print(
            f"\n== {n:,} rows: store written and indexed in {time.perf_counter() - t:.0f} s "
            f"({entry['type']}, index {entry['file_bytes'] / 2**20:.0f} MB) ==",
            flush=True,
        )
        import pyarrow.parquet as pq

        meta = pq.read_table(folder / "store" / "embeddings.parquet", columns=["id", "label"])
        ids = meta["id"].to_numpy()
        labels = meta["label"].to_pylist()
        counts = {lab: labels.count(lab) for lab in set(labels[:20000])}
        one_pct = min(counts, key=lambda lab: abs(counts[lab] * n / 20000 - 0.01 * n))
        warm_page_cache(folder / "store")
        first, base = start_ui(folder / "store", folder / "ws")
        second = None
        try:
            latencies(base, ids, None, 1, WARMUP)
            mem1 = memory(first.pid)
            single = latencies(base, ids, None, 1, SINGLES)
            many = latencies(base, ids, None, CLIENTS, PER_CLIENT)
            filtered = latencies(base, ids, one_pct, 1, SINGLES // 2)
            second, base2 = start_ui(folder / "store", folder / "ws")
            latencies(base2, ids, None, 1, WARMUP)
            mem2 = memory(second.pid)
        finally:
            for p in (first, second):
                if p is not None:
                    p.send_signal(signal.SIGINT)
                    p.wait(timeout=30)
        index_mb = entry["file_bytes"] / 2**20
        result = {
            "n": n,
            "index": entry["type"],
            "index_mb": index_mb,
            "build_s": entry["build_s"],
            "first_ui": mem1,
            "second_ui": mem2,
            "first_over_index_mb": mem1["beyond_index_mb"],
            "second_adds_mb": mem2["private_mb"],
            "single": single,
            "clients_8": many,
            "filtered_1pct": filtered | {"label": one_pct},
        }
        report(result)
        return result
    finally:
        if not keep and not reuse:
            shutil.rmtree(folder, ignore_errors=True)


def report(r: dict) -> None:
    a, b = r["first_ui"], r["second_ui"]
    print(f"index {r['index']}: {r['index_mb']:.0f} MB; built in {r['build_s']:.0f} s")
    print(
        f"ui #1: RSS {a['rss_mb']:.0f} MB = the index's files {a['index_files_mb']:.0f} (mapped) "
        f"+ {r['first_over_index_mb']:.0f} MB [target <= 300]: private {a['private_mb']:.0f}, "
        f"rows.arrow {a['rows_file_mb']:.0f}, libraries the rest"
    )
    print(
        f"ui #2: RSS {b['rss_mb']:.0f} MB, of which its own {b['private_mb']:.0f} MB; the "
        f"mapped {b['file_mb']:.0f} MB are the same pages as #1's  [target <= 100 added]"
    )
    for name in ("single", "clients_8", "filtered_1pct"):
        q = r[name]
        print(
            f"{name:>14}: p50 {q['p50_ms']:.1f} ms, p99 {q['p99_ms']:.1f} ms, "
            f"{q['queries_per_s']:.0f} queries/s"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the generated stores")
    ap.add_argument("--reuse", type=Path, help="a folder to keep the stores in and reuse")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    results = [run_size(int(n), args.keep, args.reuse) for n in args.sizes.split(",")]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
