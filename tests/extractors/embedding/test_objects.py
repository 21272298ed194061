"""Sources in object storage, against a real S3-compatible server on loopback: a bucket
prefix updates a store exactly as a folder does (unchanged objects not read again, changed,
deleted and added ones followed), ids are the content's hash, failures are recorded."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from extractors.embedding import objects
from extractors.embedding.sources import SourceError, read_source, read_sources
from extractors.store.layout import content_id, embedding_matrix
from extractors.store.store import Store


@pytest.fixture(scope="module")
def bucket(s3_server, digits_dir: Path, tmp_path_factory) -> str:
    """12 digits of two classes under s3://objects/digits/<class>/."""
    local = tmp_path_factory.mktemp("few") / "digits"
    for cls in ("0", "1"):
        (local / cls).mkdir(parents=True)
        for f in sorted((digits_dir / cls).iterdir())[:6]:
            shutil.copy(f, local / cls / f.name)
    name = s3_server.bucket("objects")
    s3_server.upload(local, name, "digits")
    return name


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_prefix_is_read_like_a_folder_with_stamps_from_one_listing(bucket, s3_server) -> None:
    src = read_source(f"s3://{bucket}/digits/")
    assert src.kind == "folders" and src.root == f"s3://{bucket}/digits"
    assert src.name == "digits" and len(src.records) == 12
    assert {r.label for r in src.records} == {"0", "1"}
    assert all(r.path.startswith(f"s3://{bucket}/digits/") for r in src.records)
    assert set(src.stamps) == {r.path for r in src.records}
    one = src.records[0].path
    assert objects.stamp(one) == src.stamps[one]  # the listing's stamp is the object's own
    with pytest.raises(SourceError, match=r"no images found in s3://objects/nothing"):
        read_source(f"s3://{bucket}/nothing/")
    with pytest.raises(SourceError, match=r"^cannot list s3://no-such-bucket/x/: no such bucket"):
        read_source("s3://no-such-bucket/x/")
    files = read_sources([r.path for r in src.records[:2]])
    assert files.kind == "files" and files.root == src.records[0].path.rsplit("/", 1)[0]


def test_a_bucket_updates_a_store_exactly_like_its_folder(
    bucket, s3_server, backbone, tmp_path
) -> None:
    s3 = s3_server.client()
    prefix = f"s3://{bucket}/digits"
    store = Store(tmp_path / "store")
    first = store.update(read_source(prefix + "/"), backbone, progress=False)
    assert (first.rows, first.embedded, first.failed) == (12, 12, 0)

    # the same images from local files give the same rows: ids and embeddings
    local = tmp_path / "local"
    for r in read_source(prefix).records:
        dest = local / r.label / r.path.rsplit("/", 1)[1]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(objects.read_bytes(r.path))
    twin = Store(tmp_path / "twin")
    twin.update(read_source(local), backbone, progress=False)
    a, b = (s.table().sort_by("id") for s in (store, twin))
    assert a["id"].to_pylist() == b["id"].to_pylist()
    np.testing.assert_allclose(embedding_matrix(a), embedding_matrix(b), atol=1e-5)

    # unchanged: nothing new, and not one object body read
    before = s3_server.gets(bucket)
    again = store.update(read_source(prefix), backbone, progress=False)
    assert (again.embedded, again.removed, again.kept) == (0, 0, 12)
    assert s3_server.gets(bucket) == before

    # one changed, one deleted, one added
    keys = sorted(r.path.split("/", 3)[3] for r in read_source(prefix).records)
    changed, deleted = keys[0], keys[-1]
    s3.put_object(Bucket=bucket, Key=changed, Body=_png(1))
    s3.delete_object(Bucket=bucket, Key=deleted)
    s3.put_object(Bucket=bucket, Key="digits/1/added.png", Body=_png(2))
    after = store.update(read_source(prefix), backbone, progress=False)
    assert (after.embedded, after.removed, after.kept, after.rows) == (2, 1, 10, 12)
    rows = store.table(["id", "path", "sha256"])
    for key, body in ((changed, _png(1)), ("digits/1/added.png", _png(2))):
        sha = hashlib.sha256(body).hexdigest()
        row = rows.filter(pc.equal(rows["path"], f"s3://{bucket}/{key}")).to_pylist()
        assert row == [{"id": content_id(sha), "path": f"s3://{bucket}/{key}", "sha256": sha}]
    assert f"s3://{bucket}/{deleted}" not in rows["path"].to_pylist()


def test_objects_that_fail_are_recorded_with_their_reason(
    bucket, s3_server, backbone, tmp_path
) -> None:
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="mixed/cat/bad.png", Body=b"not an image at all")
    s3.put_object(Bucket=bucket, Key="mixed/cat/good.png", Body=_png(3))
    s3.put_object(Bucket=bucket, Key="mixed/dog/good.png", Body=_png(4))
    manifest = (
        "path,label\n"
        "cat/bad.png,cat\ncat/good.png,cat\ndog/good.png,dog\ndog/gone.png,dog\n"
        f"s3://{bucket}/mixed/cat/good.png,cat\n"
    )
    s3.put_object(Bucket=bucket, Key="mixed/list.csv", Body=manifest.encode())
    src = read_source(f"s3://{bucket}/mixed/list.csv")
    assert src.kind == "manifest" and len(src.records) == 4  # a URL and its key: one image
    report = Store(tmp_path / "store").update(src, backbone, progress=False)
    reasons = dict(report.failures)
    assert report.rows == 2 and report.failed == 2
    assert reasons[f"s3://{bucket}/mixed/dog/gone.png"] == (
        "object not found (moved or deleted after listing?)"
    )
    assert reasons[f"s3://{bucket}/mixed/cat/bad.png"].startswith("not an image Pillow can read")
    with pytest.raises(SourceError, match=r"^cannot read manifest s3://objects/none.csv: object"):
        read_source(f"s3://{bucket}/none.csv")
    s3.put_object(Bucket=bucket, Key="mixed/out.csv", Body=b"path\n../../other/a.png\n")
    with pytest.raises(SourceError, match=r"leads out of its bucket; give a full URL$"):
        read_source(f"s3://{bucket}/mixed/out.csv")
    with pytest.raises(SourceError, match=r"credentials in it \(s3://objects/…\)"):
        read_source(f"s3://key:secret@{bucket}/mixed/")


def test_a_huge_object_is_refused_without_being_fetched(bucket, s3_server) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="big/blob.png", Body=b"x" * 5000)
    with pytest.raises(OSError, match="larger than the 1000 bytes allowed"):
        objects.read_bytes(f"s3://{bucket}/big/blob.png", limit=1000)
    assert len(objects.read_bytes(f"s3://{bucket}/big/blob.png", limit=5000)) == 5000


def test_a_store_that_never_answers_costs_its_objects_not_the_run(
    bucket, s3_server, backbone, tmp_path, monkeypatch
) -> None:
    import socket

    import extractors.store.plan

    s3_server.client().put_object(Bucket=bucket, Key="slow/good.png", Body=_png(5))
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        never = f"http://127.0.0.1:{silent.getsockname()[1]}/never.png"
        manifest = tmp_path / "list.csv"
        manifest.write_text(f"path\n{never}\ns3://{bucket}/slow/good.png\n")
        monkeypatch.setattr(extractors.store.plan, "FILE_TIMEOUT_S", 1.0)
        report = Store(tmp_path / "store").update(read_source(manifest), backbone, progress=False)
    assert report.rows == 1 and dict(report.failures)[never].startswith("took longer than 1 s")


def test_objects_of_a_dead_store_time_out_together_not_one_after_another() -> None:
    """Ten objects on a store that never answers, four threads: the four asked time out
    together after their one second; the six never asked fail at once (not six more)."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(32)
        port = silent.getsockname()[1]
        urls = [f"http://127.0.0.1:{port}/{i}.png" for i in range(10)]
        got = objects.stamps(urls, threads=4, timeout=1.0)
    reasons = sorted(str(e) for e in got.values())
    assert all(isinstance(e, TimeoutError) for e in got.values())
    assert reasons.count("took longer than 1 s") == 4
    assert reasons.count("every thread is stuck on a task past its time limit") == 6


def test_a_listing_and_a_head_give_one_stamp_whatever_their_precision() -> None:
    """MinIO's and Ceph's listings give milliseconds, a HEAD's Last-Modified whole seconds,
    and ETags come quoted or not: the same object has one stamp; another ETag another."""
    import datetime as dt

    listed = {"size": 5, "LastModified": dt.datetime(2026, 12, 6, 13, 54, 52, 763000, dt.UTC),
              "ETag": '"5d41402abc4b2a76b9719d911017c592"'}  # fmt: skip
    head = {"size": 5, "Last-Modified": "Sun, 06 Dec 2026 13:54:52 GMT",
            "ETag": "5d41402abc4b2a76b9719d911017c592"}  # fmt: skip
    assert objects.object_stamp(listed) == objects.object_stamp(head)
    assert objects.object_stamp(listed) != objects.object_stamp(listed | {"ETag": '"other"'})
    later = listed | {"LastModified": dt.datetime(2026, 12, 6, 13, 54, 53, tzinfo=dt.UTC)}
    assert objects.object_stamp(listed) != objects.object_stamp(later)
