"""The compiled-package cache: a full cache, a planted package, a cache others can write and
two runs building at once all end in a finished embed (eager where need be), never in an
aborted process or in running a library headstart did not build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from extractors.embedding import compiled
from extractors.embedding.backbones import Backbone

ROOT = Path(__file__).resolve().parents[3]
BATCH = 8

# A shared library whose constructor writes a marker file: what a planted package would run.
PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
  const char *p = getenv("HEADSTART_PLANTED_MARKER");
  if (p) { FILE *f = fopen(p, "w"); if (f) { fputs("ran", f); fclose(f); } }
}
"""


def _embed(src: Path, tmp: Path, cache: Path, *extra: str, env: dict | None = None):
    """`headstart embed` in a child process; (exit code, its JSON report or None, stderr)."""
    cmd = [sys.executable, "-m", "flows.cli", "embed", str(src), "--store", str(tmp / "store")]
    cmd += ["--workspace", str(tmp / "ws"), "--batch-size", str(BATCH), "--json", *extra]
    env = os.environ | {
        compiled.CACHE_ENV: str(cache),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        **(env or {}),
    }
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, dict | None, str]:
    out, err = proc.communicate(timeout=timeout)
    try:
        report = json.loads(out)
    except ValueError:
        report = None
    return proc.returncode, report, err


def _package(cache: Path, monkeypatch: pytest.MonkeyPatch, backbone: Backbone) -> Path:
    """Where `embed` (default backbone, on the CPU, batches of BATCH) looks for its package."""
    monkeypatch.setenv(compiled.CACHE_ENV, str(cache))
    return compiled.package_path(backbone, BATCH)


def test_a_full_compile_cache_embeds_eagerly(digits_dir, tmp_path) -> None:
    """A compile cache on a nearly full disk: AOTInductor's package writer used to abort the
    whole process (`terminate called after throwing c10::Error`); now the run warns and
    embeds every image eagerly."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        (disk / "filler").write_bytes(b"\0" * (6 << 20))  # 2 MB left: less than a package
        code, report, err = _finish(_embed(digits_dir, tmp_path, disk / "cache", "--compile"))
        assert code == 0, err[-3000:]
        assert report["embedded"] == 100 and report["compiled"] is False
        assert report["model_path"] == "eager (compiling failed)"
        assert "compiling the network failed, embedding without it" in err
        assert "not enough free space in the compile cache" in err
        assert not [p for p in (disk / "cache").iterdir() if p.suffix == ".pt2"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_planted_package_is_never_loaded(digits_dir, backbone, tmp_path, monkeypatch) -> None:
    """A package at the path the cache computes that headstart has no record of building
    (here a library whose constructor writes a marker) is not loaded: a warning, and the
    embed goes on without it."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the planted library with")
    (tmp_path / "planted.c").write_text(PLANTED_C)
    so = tmp_path / "planted.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(so), str(tmp_path / "planted.c")], check=True)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    package = _package(cache, monkeypatch, backbone)
    with zipfile.ZipFile(package, "w") as zf:  # the layout aoti_load_package opens
        zf.writestr("pkg/archive_format", "pt2")
        zf.writestr(
            "pkg/data/aotinductor/model/x.wrapper_metadata.json", '{"AOTI_DEVICE_KEY": "cpu"}'
        )
        zf.write(so, "pkg/data/aotinductor/model/x.wrapper.so")
    marker = tmp_path / "marker"
    env = {"HEADSTART_PLANTED_MARKER": str(marker)}
    code, report, err = _finish(_embed(digits_dir, tmp_path, cache, env=env))
    assert code == 0, err[-3000:]
    assert not marker.exists(), "the planted library ran"
    assert f"ignoring the compiled package {package}: headstart has no record" in err
    assert report["embedded"] == 100 and report["model_path"].startswith("eager")


def test_a_cache_of_another_user_others_can_write_is_ignored(digits_dir, tmp_path) -> None:
    """A cache folder of another user, writable by all, could hold anyone's package and
    record: it is ignored with a warning (nothing built or loaded there), the embed is eager."""
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    os.chown(cache, 65534, 65534)  # nobody's
    code, report, err = _finish(_embed(digits_dir, tmp_path, cache, "--compile"))
    assert code == 0, err[-3000:]
    assert f"ignoring the compile cache {cache}: it is owned by another user" in err
    assert report["embedded"] == 100 and report["model_path"] == "eager (compiling failed)"
    assert list(cache.iterdir()) == []


def test_an_own_cache_made_under_a_loose_umask_is_made_private(tmp_path, monkeypatch, capfd):
    """The user's own cache folder, group-writable (created under umask 002): it is made
    writable by its owner only, with one line saying so, instead of turning compiling off."""
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o775)
    monkeypatch.setenv(compiled.CACHE_ENV, str(cache))
    assert compiled.private_cache(create=False) == cache
    assert cache.stat().st_mode & 0o777 == 0o755
    err = capfd.readouterr().err
    assert f"made the compile cache {cache} writable by its owner only" in err


def test_a_package_is_hashed_once_while_it_stays_the_same(tmp_path) -> None:
    """`decide` and `load_or_build` both ask whether the package is trusted: its bytes are
    read once per process, and again only once it (or its record) changes."""
    package = tmp_path / "pkg.pt2"
    package.write_bytes(b"package bytes")
    record = compiled.record_path(package)
    record.write_text(json.dumps({"sha256": compiled.file_sha256(package)}))
    reads: list[str] = []
    watching = [True]

    def hook(event: str, args: tuple) -> None:
        if watching[0] and event == "open" and str(args[0]) == str(package) and "w" not in args[1]:
            reads.append(event)

    sys.addaudithook(hook)  # hooks cannot be removed: `watching` turns it off
    try:
        assert compiled._untrusted(package) is None
        assert compiled._untrusted(package) is None
        assert len(reads) == 1
        before = package.stat().st_mtime_ns
        package.write_bytes(b"other bytes!!")  # same size, a new mtime (set: clocks are coarse)
        os.utime(package, ns=(before + 10**9, before + 10**9))
        assert "differ" in compiled._untrusted(package)
        assert len(reads) == 2
    finally:
        watching[0] = False


@pytest.mark.slow
def test_two_embeds_build_one_package_at_a_time(
    digits_dir, backbone, tmp_path, monkeypatch
) -> None:
    """Two `embed --compile` runs on an empty cache at once: they take turns on the package's
    lock, both run compiled, and the package left is whole and matches its record."""
    cache = tmp_path / "cache"
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        run.mkdir()
    procs = [_embed(digits_dir, run, cache, "--compile") for run in runs]
    results = [_finish(proc, timeout=900) for proc in procs]
    for code, report, err in results:
        assert code == 0, err[-3000:]
        assert report["embedded"] == 100 and report["model_path"] == "compiled (--compile)"
        assert "compiling the network failed" not in err
    package = _package(cache, monkeypatch, backbone)
    record = json.loads(compiled.record_path(package).read_text())
    assert record["sha256"] == compiled.file_sha256(package)
    assert record["built_by_pid"] in {proc.pid for proc in procs}
    assert zipfile.ZipFile(package).testzip() is None
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [package.name, package.name + ".lock", package.name + ".sha256"]
    )
    assert oct(cache.stat().st_mode & 0o777) == oct(0o700)
