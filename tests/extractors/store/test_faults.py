"""Faults: SIGKILL at any point then re-run gives exactly one row per good image; a full disk
or a second writer leaves the store as it was."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extractors.embedding.sources import read_source
from extractors.store.layout import EMBEDDINGS, STAGING
from extractors.store.store import Store

ROOT = Path(__file__).resolve().parents[3]
EMBED = """
import sys
from extractors.embedding.backbones import create_backbone
from extractors.embedding.sources import read_source
from extractors.embedding.engines import LocalEngine
from extractors.settings import EmbedSettings
from extractors.store.store import Store
src, store = sys.argv[1], sys.argv[2]
engine = LocalEngine(EmbedSettings(batch_size=8, decode_threads=2), False, checkpoint_rows=16)
report = Store(store).update(read_source(src), create_backbone(device="cpu"), engine=engine)
print("resumed", report.resumed, "rows", report.rows)
"""


def _embed(src: Path, store: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", EMBED, str(src), str(store)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _kill_when(proc: subprocess.Popen, ready, limit: float = 120) -> str:
    """SIGKILL `proc` as soon as `ready()` holds; returns where it died."""
    deadline = time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed"
        time.sleep(0.005)
    proc.wait()
    return "finished"


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture
def source(digits_dir: Path, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(digits_dir, src)
    return src


def test_sigkill_at_several_points_then_rerun_is_exactly_once(source, tmp_path) -> None:
    store_dir = tmp_path / "store"
    staging = store_dir / STAGING
    points = {
        "while loading": lambda: (store_dir / ".lock").exists(),
        "after the first staged part": lambda: len(list(staging.glob("part-*.parquet"))) >= 1,
        "after three staged parts": lambda: len(list(staging.glob("part-*.parquet"))) >= 3,
        "while committing": lambda: any(store_dir.glob(f".{EMBEDDINGS}.*.tmp")),
        # the new Parquet in place, the failures table, index and manifest not yet
        "after the Parquet's rename": lambda: (
            (store_dir / EMBEDDINGS).exists() and not (store_dir / "manifest.json").exists()
        ),
    }
    outcomes = {}
    for name, ready in points.items():
        outcomes[name] = _kill_when(_embed(source, store_dir), ready)
        problems = Store(store_dir).verify() if (store_dir / EMBEDDINGS).exists() else []
        assert not any("unreadable" in p or "duplicate" in p for p in problems), problems
    # new images between kills, as a live folder would have
    final = _embed(source, store_dir)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    store = Store(store_dir)
    assert store.verify() == []
    table = store.table(["path", "id"])
    assert sorted(table["path"].to_pylist()) == sorted(r.path for r in read_source(source).records)
    assert not staging.exists()
    assert outcomes["after the first staged part"] == "killed", outcomes
    resumed = int(out.split()[1])
    assert resumed > 0 or outcomes["while committing"] == "killed", (out, outcomes)


def test_full_disk_leaves_the_store_as_it_was(source, tmp_path) -> None:
    store_dir = tmp_path / "store"
    first = _embed(source, store_dir)
    assert first.wait(timeout=300) == 0
    before = _snapshot(store_dir)
    for i, f in enumerate(sorted((source / "0").iterdir())[:5]):
        shutil.copy(f, source / "1" / f"new_{i}.png")  # five new images to write

    def small_disk() -> None:  # writes past 64 KiB fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = _embed(source, store_dir, preexec_fn=small_disk)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "cannot write to store" in err and "The store is unchanged" in err, err[-2000:]
    assert {k: v for k, v in _snapshot(store_dir).items() if not k.startswith(STAGING)} == {
        k: v for k, v in before.items() if not k.startswith(STAGING)
    }
    assert Store(store_dir).verify() == []


def test_two_writers_at_once_one_is_refused(source, tmp_path) -> None:
    store_dir = tmp_path / "store"
    a, b = _embed(source, store_dir), _embed(source, store_dir)
    (_, err_a), (_, err_b) = a.communicate(timeout=300), b.communicate(timeout=300)
    codes = sorted([a.returncode, b.returncode])
    assert codes[0] == 0, (err_a, err_b)
    if codes[1] != 0:  # the usual case: they overlapped, so the second was refused
        assert "another headstart process is writing" in err_a + err_b
    assert Store(store_dir).verify() == []
    assert Store(store_dir).manifest()["rows"] == 100
    assert not os.path.exists(store_dir / STAGING)


FAULTY = EMBED.replace(
    "src, store = sys.argv[1], sys.argv[2]",
    """src, store = sys.argv[1], sys.argv[2]
import errno
import extractors.store.commit, extractors.store.staging, extractors.store.update
import extractors.index.maintain

def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

def faiss_full(*args, **kwargs):  # what FAISS raises on a failed write
    raise RuntimeError("Error in faiss::FileIOWriter: 'ret == n' failed: write error")

step = sys.argv[3]
if step == "failures table":
    extractors.store.commit.write_parquet_atomic = full
elif step == "index":
    extractors.index.maintain.write_index = faiss_full
elif step == "manifest":
    extractors.store.update.write_manifest = full
elif step == "staging part":
    extractors.store.staging.StagingWriter._seal = staticmethod(full)""",
)


@pytest.mark.parametrize("step", ["staging part", "failures table", "index", "manifest"])
def test_a_full_disk_at_any_write_of_the_commit_leaves_the_old_store(source, tmp_path, step):
    """The disk fills at one write of the update (a staging part, or after the new Parquet
    is in place: the failures table, the index, the manifest): the run fails with one message
    that the store is unchanged, every committed file is as before, and the next run commits
    the new images exactly once."""
    store_dir = tmp_path / "store"
    assert _embed(source, store_dir).wait(timeout=300) == 0
    before = _snapshot(store_dir)
    rng = np.random.default_rng(5)
    for i in range(5):  # five images of new content: to stage, commit and index
        arr = rng.integers(0, 255, (32, 32), dtype=np.uint8)
        Image.fromarray(arr).save(source / "1" / f"new_{i}.png")
    proc = subprocess.Popen(
        [sys.executable, "-c", FAULTY, str(source), str(store_dir), step],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "The store is unchanged" in err and "StoreError" in err, err[-2000:]
    committed = {k: v for k, v in _snapshot(store_dir).items() if not k.startswith(STAGING)}
    assert committed == {k: v for k, v in before.items() if not k.startswith(STAGING)}
    assert Store(store_dir).verify() == []
    again = _embed(source, store_dir)
    assert again.wait(timeout=300) == 0
    paths = Store(store_dir).table(["path"])["path"].to_pylist()
    assert len(paths) == len(set(paths)) == 105
