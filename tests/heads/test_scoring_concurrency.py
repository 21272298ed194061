"""Two scoring runs into one predictions folder at once, as real processes: the second waits
for the first's lock and writes the next part, so both runs' rows survive, each once; a full
or read-only disk under `--out` is one error naming the file, with nothing half-written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from tests.heads.test_scoring import MODEL

ROOT = Path(__file__).resolve().parents[2]
INTO_FOLDER = (
    MODEL
    + """
import os, time
while len(sys.argv) > 3 and not os.path.exists(sys.argv[3]):  # the model loaded: wait for go
    time.sleep(0.005)
r, part, _ = score_into_folder(read_source(sys.argv[1]), bb, model, sys.argv[2], engine,
                               progress=False)
print("part", part, "rows", r.rows)
"""
)
TO_FILE = (
    MODEL
    + """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
proba = model.proba


def disk_full_from_now(rows):  # the rows are staged: only the output is left to write
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
    return proba(rows)


model.proba = disk_full_from_now
score_source(read_source(sys.argv[1]), bb, model, sys.argv[2], engine, progress=False)
"""
)


def _run(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_score_runs_into_one_folder_keep_both_runs_rows(digits_dir: Path, tmp_path: Path):
    """Run B (digits 2 and 3) starts while run A (digits 0 and 1) is staging its rows: it
    waits for A's lock on the folder, and writes part 1 beside A's part 0 (before, both
    picked part 0: B was refused, or its rename replaced A's rows)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for src, classes in ((a, "01"), (b, "23")):
        for c in classes:
            shutil.copytree(digits_dir / c, src / c)
    folder = tmp_path / "predictions"
    go = tmp_path / "go"
    first = _run(INTO_FOLDER, str(a), str(folder))
    second = _run(INTO_FOLDER, str(b), str(folder), str(go))  # loads its model, then waits
    deadline = time.monotonic() + 240
    while not list(folder.glob(".part-*.scoring/staging/part-*.parquet")):
        assert first.poll() is None, first.communicate()[1][-2000:]  # A is mid-run: staging
        assert time.monotonic() < deadline, "run A staged nothing"
        time.sleep(0.01)
    go.touch()  # B reads the folder while A is still scoring into it
    out_a, err_a = first.communicate(timeout=600)
    out_b, err_b = second.communicate(timeout=600)
    assert first.returncode == 0, err_a[-2000:]
    assert second.returncode == 0, err_b[-2000:]
    parts = sorted(folder.glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-000000.parquet", "part-000001.parquet"]
    assert out_a.split()[1] != out_b.split()[1], (out_a, out_b)
    paths = [p for part in parts for p in pq.read_table(part, columns=["path"])["path"].to_pylist()]
    want = {str(p) for p in [*a.rglob("*.png"), *b.rglob("*.png")]}
    assert len(paths) == len(set(paths)) == 100 and set(paths) == want


def test_a_full_disk_under_out_is_one_error_naming_the_file(digits_dir: Path, tmp_path: Path):
    """The disk fills once the rows are staged, as the output is written (a 256-byte file
    size limit from then on: EFBIG): one ScoringError naming the file, not pyarrow's
    traceback; no output and no temporary file left."""
    src = tmp_path / "src"
    shutil.copytree(digits_dir / "0", src / "0")
    out = tmp_path / "out" / "preds.parquet"
    out.parent.mkdir()
    proc = _run(TO_FILE, str(src), str(out), "256")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("heads.scoring.table.ScoringError: cannot write"), err[-3000:]
    assert str(out.parent) in last and "Nothing was written" in last, last
    assert [p.name for p in out.parent.iterdir() if not p.name.startswith(".")] == []
    assert not list(out.parent.glob(".*.tmp"))
