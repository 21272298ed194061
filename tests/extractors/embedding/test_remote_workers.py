"""Dask workers that share no disk with the store: a scheduler and two `dask worker` processes,
each in its own mount namespace where the store's folder is an empty tmpfs, read the images
from a real S3-compatible server; the client alone writes the store. Same rows as the local
engine, and a worker SIGKILLed mid-run still leaves every image exactly once."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from extractors.embedding.engines import DaskEngine, EngineError
from extractors.embedding.sources import read_source
from extractors.store.layout import STAGING, embedding_matrix
from extractors.store.store import Store


def _can_hide_folders() -> bool:
    if not shutil.which("unshare") or not shutil.which("mount"):
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "none", "/mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
    not _can_hide_folders(), reason="needs mount namespaces (unshare -m) to hide the store"
)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """`dask scheduler` and `dask worker` processes; the workers see `hidden` as an empty
    tmpfs and run in `elsewhere`."""

    def __init__(self, hidden: Path, elsewhere: Path, workers: int = 2):
        self.address = f"tcp://127.0.0.1:{_port()}"
        self.log = elsewhere / "cluster.log"
        out = self.log.open("ab")
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                 "--port", self.address.rsplit(":", 1)[1], "--dashboard-address", ":0"],
                stdout=out, stderr=subprocess.STDOUT, cwd=elsewhere,
            )
        ]  # fmt: skip
        hide = 'mount -t tmpfs none "$0" && cd "$1" && shift && exec "$@"'
        for n in range(workers):
            self.procs.append(
                subprocess.Popen(
                    ["unshare", "-m", "--propagation", "private", "sh", "-c", hide,
                     str(hidden), str(elsewhere), sys.executable, "-m",
                     "distributed.cli.dask_worker", self.address, "--name", f"w{n}",
                     "--nthreads", "1", "--no-nanny", "--no-dashboard"],
                    stdout=out, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        from distributed import Client

        self.client = Client(self.address, timeout=120)
        deadline = time.monotonic() + 180
        while len(self.client.scheduler_info()["workers"]) < workers:
            exited = [p.args for p in self.procs if p.poll() is not None]
            if exited or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the cluster did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def close(self) -> None:
        self.client.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_workers_without_the_store_embed_from_a_bucket_exactly_once(
    s3_server, digits_dir, built_store, backbone, tmp_path
) -> None:
    bucket = s3_server.bucket("cluster")
    for label in ("0", "1"):  # 50 of the digits
        s3_server.upload(digits_dir / label, bucket, f"digits/{label}")
    source = read_source(f"s3://{bucket}/digits/")
    hidden, elsewhere = tmp_path / "client", tmp_path.parent / f"{tmp_path.name}-workers"
    hidden.mkdir()
    elsewhere.mkdir()
    (hidden / "marker").write_text("the client's folder")
    cluster = Cluster(hidden, elsewhere)
    try:
        seen = cluster.client.run(os.path.exists, str(hidden / "marker"))
        assert len(seen) == 2 and not any(seen.values()), "the workers can see the store"

        store = Store(hidden / "store")
        engine = DaskEngine(address=cluster.address, batch_size=5, shard_size=5, progress=False)
        report = store.update(source, backbone, engine=engine)
        assert (report.rows, report.embedded, report.failed) == (50, 50, 0)
        assert report.stats["bytes_moved_per_image"] > 0
        _same_rows(store, built_store)
        assert not any(cluster.client.run(os.path.exists, str(store.path)).values())
        weights = hidden / "tuned.pt"  # a weights file only this machine has: said, not a crash
        weights.write_bytes(b"weights")
        blind = DaskEngine(address=cluster.address, weights=str(weights), progress=False)
        with pytest.raises(EngineError, match=r"^2 Dask worker\(s\) cannot read the weights"):
            Store(hidden / "third").update(source, backbone, engine=blind)

        # a worker SIGKILLed once the first shard is in: its shards run on the other one
        pids = cluster.client.run(os.getpid)
        victim = pids[sorted(pids)[0]]
        second = Store(hidden / "second")
        killed: dict[str, int] = {}

        def kill_after_first_shard() -> None:
            staging = second.path / STAGING
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                done = list(staging.glob("shard-*.parquet")) if staging.exists() else []
                if done:
                    os.kill(victim, signal.SIGKILL)
                    killed["shards_done"] = len(done)
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=kill_after_first_shard, daemon=True)
        watcher.start()
        report = second.update(source, backbone, engine=engine)
        watcher.join(timeout=5)
        assert killed and killed["shards_done"] < 10, "the kill did not come mid-run"
        assert victim not in cluster.client.run(os.getpid).values()
        assert (report.rows, report.embedded, report.failed) == (50, 50, 0)
        ids = second.table(["id"])["id"]
        assert len(pc.unique(ids)) == 50
        _same_rows(second, built_store)
    finally:
        cluster.close()


def _same_rows(store: Store, reference: Store) -> None:
    """Same ids (content hashes), labels and embeddings (within 1e-5) as `reference`'s rows
    of the same images."""
    a = store.table(["id", "label", "embedding"]).sort_by("id")
    b = reference.table(["id", "label", "embedding"]).sort_by("id")
    b = b.filter(pc.is_in(b["id"], value_set=a["id"]))
    assert a["id"].to_pylist() == b["id"].to_pylist()
    assert a["label"].to_pylist() == b["label"].to_pylist()
    np.testing.assert_allclose(embedding_matrix(a), embedding_matrix(b), atol=1e-5)
