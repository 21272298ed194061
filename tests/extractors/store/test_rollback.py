"""A failed write at any point of a commit, for every index kind, leaves every file of the store
as it was: the writes are enumerated (each open for writing, rename, link or removal in the
store's folder fails in turn, as on a full disk) and the files come from the layout."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from extractors.embedding.sources import read_source
from extractors.settings import INDEX_KINDS, IndexSettings
from extractors.store.layout import COMMIT_FILES, STAGING, VECTOR_IDS, VECTORS
from extractors.store.store import Store, StoreError

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class _Disk:
    """An audit hook that fails the `at`-th write into `folder` (not its staging/) with ENOSPC,
    once. Audit hooks cannot be removed: it does nothing while `folder` is None."""

    folder: Path | None = None
    last: tuple = ()  # the last write counted: (event, args)
    only: str | None = None  # fail only this kind of event (e.g. "os.link")
    at = 0
    seen = 0
    fired = False

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.folder is None or cls.fired:
            return
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else False
            writes = writes or (mode is None and bool((flags or 0) & WRITE_FLAGS))
            if not writes:
                return
        elif event in ("os.rename", "os.link"):
            path = args[1]
        elif event == "os.remove":
            path = args[0]
        else:
            return
        if isinstance(path, int) or Path(os.fsdecode(path)).parent != cls.folder:
            return
        if cls.only not in (None, event):
            return
        cls.seen += 1
        cls.last = (event, args)
        if cls.seen == cls.at:
            cls.fired = True
            raise OSError(errno.ENOSPC, "No space left on device")

    @classmethod
    def arm(cls, folder: Path, at: int, only: str | None = None) -> None:
        cls.folder, cls.at, cls.only, cls.seen, cls.fired = folder.resolve(), at, only, 0, False

    @classmethod
    def disarm(cls) -> None:
        cls.folder = None


sys.addaudithook(_Disk.hook)


def _files(folder: Path) -> dict[str, str]:
    """Every file of the store but its staging folder and lock, hashed."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != ".lock"
    }


def _source(digits_dir: Path, dest: Path, per_class: int, skip: int = 0) -> Path:
    for cls in sorted(p for p in digits_dir.iterdir() if p.is_dir()):
        (dest / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[skip : skip + per_class]:
            shutil.copy(f, dest / cls.name / f.name)
    return dest


def _update(store: Store, src: Path, backbone, at: int | None = None, only: str | None = None):
    """Run an update, failing its `at`-th write (of kind `only`); (report or error, fired)."""
    if at is not None:
        _Disk.arm(store.path, at, only)
    try:
        return store.update(read_source(src), backbone, progress=False), _Disk.fired
    except StoreError as exc:
        return exc, _Disk.fired
    finally:
        _Disk.disarm()


@pytest.fixture(scope="module")
def staged(digits_dir: Path, backbone, tmp_path_factory: pytest.TempPathFactory):
    """A store of 36 rows, and a source that has since lost 2 files and gained 64, whose new
    rows are already staged (one failed update embedded them): (store, source)."""
    root = tmp_path_factory.mktemp("rollback")
    src = _source(digits_dir, root / "src", per_class=9)
    store = Store(root / "store")
    store.update(read_source(src), backbone, progress=False)
    for f in sorted(src.rglob("*.png"))[:2]:
        f.unlink()
    _source(digits_dir, src, per_class=16, skip=9)
    before = _files(store.path)
    result, fired = _update(store, src, backbone, at=1, only="os.link")  # the commit's first
    assert fired and isinstance(result, StoreError), result
    assert _files(store.path) == before
    assert len(Store(store.path).table(["id"])) == 36
    return store, src


def _kind_store(staged, kind: str, dest: Path) -> Store:
    shutil.copytree(staged[0].path, dest)
    out = Store(dest)
    out.reindex(IndexSettings(kind=kind), rebuild=True)
    assert out.manifest()["index"]["choice"]["kind"] == kind
    return out


def _fail_every_write(template: Store, src: Path, backbone, tmp: Path) -> tuple[int, Store]:
    """Fail each write of the commit in turn on a copy of `template`; returns how many there
    were and the store the update without a failure left. Every failure leaves the same files,
    byte for byte, and a sound store."""
    before = _files(template.path)
    at = 0
    while True:
        at += 1
        copy = Store(shutil.copytree(template.path, tmp / f"at-{at}"))
        result, fired = _update(copy, src, backbone, at=at)
        if not fired:
            break
        assert copy.verify() == [], (at, copy.verify(), result, _Disk.last)
        if isinstance(result, StoreError):
            assert "cannot write to store" in str(result), result
            assert _files(copy.path) == before, f"write {at} left the store changed"
        else:  # a failed clean-up after the commit (a link kept for the rollback): committed
            assert _files(copy.path) != before, at
        shutil.rmtree(copy.path)
    # the same update without a failure commits, and writes only files the layout declares
    assert not isinstance(result, Exception), result
    changed = {k for k, v in _files(copy.path).items() if before.get(k) != v}
    changed |= set(before) - set(_files(copy.path))
    assert changed <= set(COMMIT_FILES), changed - set(COMMIT_FILES)
    assert copy.verify() == []
    assert not (copy.path / STAGING).exists()
    return at - 1, copy


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_a_failed_write_anywhere_in_the_commit_leaves_the_old_files(
    staged, backbone, kind: str, tmp_path: Path
) -> None:
    """36 rows, then 2 deleted and 64 added: for ivf_* the lists double (a fresh build and,
    for ivf_pq, a new re-rank file), for hnsw a removal rebuilds, flat updates in place."""
    template = _kind_store(staged, kind, tmp_path / "template")
    writes, _ = _fail_every_write(template, staged[1], backbone, tmp_path)
    assert writes >= 6, writes  # the links kept for the rollback, then the files


def test_a_failed_append_to_the_rerank_file_is_rolled_back(
    staged, backbone, digits_dir: Path, tmp_path: Path
) -> None:
    """ivf_pq updated in place (two rows gone, two new, the lists unchanged): the re-rank
    file grows in place; a failure after it grew leaves it as long as before."""
    template = _kind_store(staged, "ivf_pq", tmp_path / "template")
    src = tmp_path / "src"
    shutil.copytree(staged[1], src)
    for f in sorted(src.rglob("*.png"))[36:]:
        f.unlink()  # the 34 committed files (36 less the two deleted) and two new ones
    result, fired = _update(template, src, backbone, at=1, only="os.link")  # stage two rows
    assert fired and isinstance(result, StoreError)
    vectors = (template.path / VECTORS).stat().st_size
    _, done = _fail_every_write(template, src, backbone, tmp_path)
    history = done.manifest()["index"]["history"][-1]["action"]
    assert history.startswith("updated in place"), history
    assert (done.path / VECTORS).stat().st_size > vectors
    tail = Store(shutil.copytree(template.path, tmp_path / "tail"))
    with open(tail.path / VECTORS, "ab") as fh:  # an earlier append killed before its ids
        fh.write(b"\0" * (vectors // len(np.load(tail.path / VECTOR_IDS)) * 5))
    tail.update(read_source(src), backbone, progress=False)
    history = tail.manifest()["index"]["history"][-1]["action"]
    assert history.startswith("updated in place"), history  # the tail is no cause to rebuild
    assert (tail.path / VECTORS).stat().st_size == (done.path / VECTORS).stat().st_size
    assert tail.verify() == []


def test_verify_sees_rerank_vectors_out_of_line_with_their_ids(staged, tmp_path: Path) -> None:
    """The re-rank file of another commit beside the ids file, shorter than its ids: `verify`
    and the index check (`info`) see it; the next update's index step and a reader opening
    the index rebuild it. A tail past the ids' end (an append killed before it wrote the
    ids) is harmless: never read, and the next append truncates it (no rebuild)."""
    store = _kind_store(staged, "ivf_pq", tmp_path / "store")
    assert store.verify() == []
    ids = np.load(store.path / VECTOR_IDS)
    vectors = (store.path / VECTORS).read_bytes()
    row = len(vectors) // len(ids)
    (store.path / VECTORS).write_bytes(vectors + vectors[: row * 3])  # three rows too many
    assert store.index_if_consistent() is not None and store.verify() == []
    (store.path / VECTORS).write_bytes(vectors[: -row * 3])  # three rows too few
    assert store.index_if_consistent() is None
    assert any(VECTORS in p for p in store.verify()), store.verify()
    other = Store(shutil.copytree(store.path, tmp_path / "other"))
    with other.lock():  # the next update's index step: rebuilt, not appended to
        action = other.reindex()["history"][-1]["action"]
    assert action.startswith("built") and VECTORS in action, action
    assert other.verify() == []
    with pytest.warns(UserWarning, match="rebuilt"):
        store.index()  # a reader finds it out of line: rebuilt under the lock
    assert store.verify() == []
    vectors = (store.path / VECTORS).read_bytes()
    (store.path / VECTORS).write_bytes(vectors[row:] + vectors[:row])  # each id, another's row
    assert any(VECTORS in p for p in store.verify()), store.verify()
    store.reindex(rebuild=True)  # `headstart index --rebuild`, as the message says
    assert store.verify() == []


def _fail_every_write_of(template: Store, action, tmp: Path) -> Store:
    """`action(store)` (which takes the store's lock) on a copy of `template` with each of
    its writes failing in turn: a StoreError each time and the files as they were; returns
    the store it left when nothing failed."""
    before = _files(template.path)
    for at in range(1, 200):
        copy = Store(shutil.copytree(template.path, tmp / f"{action.__name__}-{at}"))
        _Disk.arm(copy.path, at)
        failed = False
        try:
            action(copy)
        except StoreError as exc:
            assert "cannot write to store" in str(exc), exc
            failed = True
        finally:
            _Disk.disarm()
        assert copy.verify() == [], (at, copy.verify())
        if not _Disk.fired:
            return copy
        if failed:
            assert _files(copy.path) == before, f"write {at} ({_Disk.last}) changed the store"
        else:  # a failed clean-up after the commit (a link kept for the rollback): committed
            assert _files(copy.path) != before, at
        shutil.rmtree(copy.path)
    raise AssertionError("more than 200 writes")


@pytest.mark.parametrize(("old", "new"), [("flat", "ivf_pq"), ("ivf_pq", "hnsw")])
def test_a_failed_index_rebuild_or_split_move_leaves_the_old_files(
    staged, old: str, new: str, tmp_path: Path
) -> None:
    """`index --rebuild` to another kind (writing, or removing, the re-rank files) and a
    split move commit the same way as an update."""
    template = _kind_store(staged, old, tmp_path / "template")

    def rebuild(store: Store) -> None:  # as `headstart index --rebuild` does
        with store.lock():
            store.reindex(IndexSettings(kind=new), rebuild=True)

    def move(store: Store) -> None:
        first = int(store.table(["id"])["id"][0].as_py())
        store.move_splits({first: "test"}, {"moved": 1})

    done = _fail_every_write_of(template, rebuild, tmp_path)
    assert done.manifest()["index"]["choice"]["kind"] == new
    assert _fail_every_write_of(template, move, tmp_path).manifest()["split_groups"]["moved"]


def test_a_failed_write_of_an_audit_keeps_the_last_one_whole(staged, tmp_path) -> None:
    """The findings and the summary of an audit are replaced together or not at all."""
    import pyarrow as pa

    from extractors.store.layout import AUDIT_FILES

    store = Store(shutil.copytree(staged[0].path, tmp_path / "store"))
    store.keep_audit(pa.table({"id": [1, 2]}), {"fingerprint": "old", "rows": 2})
    before = _files(store.path)
    at = 0
    while True:
        at += 1
        _Disk.arm(store.path, at)
        try:
            store.keep_audit(pa.table({"id": [3, 4, 5]}), {"fingerprint": "new", "rows": 3})
        except StoreError as exc:
            assert "cannot write to store" in str(exc), exc
            assert _Disk.fired
            assert _files(store.path) == before, f"write {at} left a torn audit"
            continue
        finally:
            fired = _Disk.fired
            _Disk.disarm()
        if not fired:
            break
    after = _files(store.path)
    assert {k for k in after if after[k] != before.get(k)} == set(AUDIT_FILES)
    assert at > 3  # the two files, their renames and the rollback's links were each failed
