"""Serving measurements: what a running `headstart ui` costs in memory, what a second one on the
same store adds, and its HTTP query latency, one request at a time and under 8 clients.

`bench/search.py` runs these on its generated stores at 100k and 1M rows, in the same run as
the index figures. On a store of your own:

    uv run python bench/serving.py --store data/workspace/stores/digits

For one and then two `headstart ui` processes on the store:

- memory, read from /proc after a warm-up of 300 queries: VmRSS; its private part (RssAnon:
  what the process alone holds); its file-backed part (one copy in the page cache however many
  processes map it) split into the index's own files (index.faiss, and for ivf_pq the re-rank
  vectors.f32 and vector_ids.npy), rows.arrow and the libraries;
- the index's files are read once first, so they are in the page cache as on a machine where
  the service has run a while;
- latency of GET /api/search/id/{id}?k=10 for random stored rows (the row's vector from the
  index, the search, the hits' metadata), p50/p99 one request at a time, then with 8 client
  threads at once (and their throughput); and the same with a label filter (the class nearest
  1% of the rows).

Targets (issue 19): a running `ui` costs the index's own resident size plus at most 300 MB at
1M rows; a second process adds at most 100 MB.
"""

from __future__ import annotations

import argparse
import json
import os
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

WARMUP, SINGLES, CLIENTS, PER_CLIENT = 300, 400, 8, 100


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


def measure(store: Path, workspace: Path) -> dict:
    """Memory of one and two `ui` processes on `store` and their HTTP latency."""
    import pyarrow.parquet as pq

    meta = pq.read_table(store / "embeddings.parquet", columns=["id", "label"])
    ids = meta["id"].to_numpy()
    n = len(ids)
    labels = meta["label"].to_pylist()
    sample = labels[:20000]
    counts = {lab: sample.count(lab) for lab in set(sample) if lab is not None}
    one_pct = min(counts, key=lambda lab: abs(counts[lab] / len(sample) - 0.01)) if counts else None
    warm_page_cache(store)
    first, base = start_ui(store, workspace)
    second = None
    try:
        latencies(base, ids, None, 1, WARMUP)
        mem1 = memory(first.pid)
        single = latencies(base, ids, None, 1, SINGLES)
        many = latencies(base, ids, None, CLIENTS, PER_CLIENT)
        filtered = latencies(base, ids, one_pct, 1, SINGLES // 2) if one_pct else {}
        second, base2 = start_ui(store, workspace)
        latencies(base2, ids, None, 1, WARMUP)
        mem2 = memory(second.pid)
    finally:
        for p in (first, second):
            if p is not None:
                p.send_signal(signal.SIGINT)
                p.wait(timeout=30)
    entry = json.loads((store / "manifest.json").read_text())["index"]
    result = {
        "n": n,
        "index": entry["type"],
        "index_mb": entry["file_bytes"] / 2**20,
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


def report(r: dict) -> None:
    a, b = r["first_ui"], r["second_ui"]
    print(f"serving {r['n']:,} rows, index {r['index']} ({r['index_mb']:.0f} MB)")
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
        if "p50_ms" not in q:
            continue
        print(
            f"{name:>14}: p50 {q['p50_ms']:.1f} ms, p99 {q['p99_ms']:.1f} ms, "
            f"{q['queries_per_s']:.0f} queries/s"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--store", type=Path, required=True, help="a store folder")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    with tempfile.TemporaryDirectory(prefix="hs-bench-serving-") as ws:
        result = measure(args.store.resolve(), Path(ws))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
