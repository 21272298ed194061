"""The update plan, without a model: what an update keeps, reuses from staging, embeds, or
records as a failure, decided from the source's files and the rows already there."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from extractors.embedding.images import file_sha256
from extractors.embedding.sources import ImageRecord, Source
from extractors.store.layout import META_COLUMNS
from extractors.store.plan import plan_update


def _rows(*paths: Path, sha: dict[Path, str] | None = None) -> pa.Table:
    """Metadata rows as a store or staging part holds them, for files as they are now."""
    sha = sha or {}
    cols: dict[str, list] = {c: [] for c in META_COLUMNS}
    for i, p in enumerate(paths):
        st = os.stat(p)
        for c, v in zip(
            META_COLUMNS,
            [i, str(p), sha.get(p, file_sha256(p)), "a", "train", 1, 1, st.st_size, st.st_mtime_ns],
            strict=True,
        ):
            cols[c].append(v)
    return pa.table(cols)


def _source(tmp_path: Path, *records: ImageRecord) -> Source:
    return Source(str(tmp_path), "folders", tuple(records))


def test_each_file_is_kept_reused_embedded_or_failed_once(tmp_path: Path) -> None:
    files = {n: tmp_path / f"{n}.png" for n in ("kept", "staged", "new", "changed", "copy")}
    for n, p in files.items():
        p.write_bytes(n.encode() if n != "copy" else b"new")  # copy: same bytes as new
    (tmp_path / "dir.png").mkdir()
    old = _rows(files["kept"], files["changed"], tmp_path / "staged.png")
    old = old.filter(pa.array([True, True, False]))  # `staged` was never committed
    files["changed"].write_bytes(b"changed since")  # new content under a committed path
    gone = tmp_path / "gone.png"
    gone.write_bytes(b"gone")
    old = pa.concat_tables([old, _rows(gone)])
    gone.unlink()
    staged = _rows(files["staged"])
    src = _source(
        tmp_path,
        *(ImageRecord(str(p), "b", None) for p in files.values()),
        ImageRecord(str(tmp_path / "dir.png"), "b"),
        ImageRecord(str(tmp_path / "missing.png"), "b"),
    )
    plan = plan_update(src, old, staged)
    assert set(plan.keep) == {str(files["kept"])}
    assert plan.keep[str(files["kept"])] == ("b", None)  # label refreshed from the source
    # copy.png and new.png hold the same bytes: the first path in order is embedded, the
    # other is a recorded duplicate of it.
    assert {r.path for r in plan.to_embed} == {str(files["changed"]), str(files["copy"])}
    assert set(plan.staged) == {str(files["staged"]), str(files["changed"]), str(files["copy"])}
    reasons = dict(plan.failures)
    assert reasons[str(files["new"])] == f"duplicate content of {files['copy']}"
    assert "not a regular file" in reasons[str(tmp_path / "dir.png")]
    assert "file not found" in reasons[str(tmp_path / "missing.png")]
    assert plan.removed == 1  # gone.png left the source
    pending = {p.path: p for p in plan.pending()}
    assert set(pending) == {r.path for r in plan.to_embed}
    assert pending[str(files["changed"])].sha256 == file_sha256(files["changed"])


def test_unchanged_size_and_mtime_reuse_the_stored_hash(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    p.write_bytes(b"a")
    old = _rows(p, sha={p: "0" * 64})  # a stored hash that is not the file's
    plan = plan_update(_source(tmp_path, ImageRecord(str(p), "a")), old, _rows())
    assert plan.sha[str(p)] == "0" * 64 and set(plan.keep) == {str(p)}  # not re-hashed
    os.utime(p, ns=(1, 1))  # touched: hashed again, and the real hash differs from the stored
    plan = plan_update(_source(tmp_path, ImageRecord(str(p), "a")), old, _rows())
    assert plan.sha[str(p)] == file_sha256(p) and [r.path for r in plan.to_embed] == [str(p)]


def test_a_file_that_takes_too_long_to_hash_is_a_failure_not_a_stall(tmp_path, monkeypatch):
    import extractors.store.plan

    big = tmp_path / "big.png"
    with open(big, "wb") as fh:
        fh.truncate(8 * 2**30)  # 8 GB, sparse: seconds to read, far over the limit below
    small = tmp_path / "small.png"
    small.write_bytes(b"x")
    monkeypatch.setattr(extractors.store.plan, "FILE_TIMEOUT_S", 0.5)
    src = _source(tmp_path, ImageRecord(str(big)), ImageRecord(str(small)))
    plan = plan_update(src, None, _rows())
    assert dict(plan.failures)[str(big)].startswith("took longer than 0.5 s to read")
    assert [r.path for r in plan.to_embed] == [str(small)]
