"""Who may ask the search service and what it serves: loopback Host names only (no DNS
rebinding), no cross-origin POST, a token off loopback; filters inside FAISS; a row's file only
while it is the file that was embedded; uploads that cannot crash or exhaust it."""

from __future__ import annotations

import io
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from extractors.embedding.sources import read_source
from extractors.store.store import Store
from flows.web.app import create_app


@pytest.fixture(scope="module")
def own_store(backbone, tmp_path_factory) -> Store:
    """A store over files this module may replace: 2 classes x 4 photos-ish PNGs."""
    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir()
        for i in range(4):
            arr = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / label / f"{i}.png")
    store = Store(tmp_path_factory.mktemp("ownstore") / "s")
    store.update(read_source(root), backbone, progress=False)
    return store


def _client(store: Store, host: str = "127.0.0.1", **kw) -> TestClient:
    return TestClient(create_app(store.path, store.path.parent, **kw), base_url=f"http://{host}")


def _png(**kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_only_loopback_host_names_are_served(own_store) -> None:
    for host in ("127.0.0.1", "localhost", "127.0.0.1:8765", "[::1]:8765"):
        res = _client(own_store).get("/api/info", headers={"host": host})
        assert res.status_code == 200, host
    rebound = _client(own_store).get("/api/info", headers={"host": "evil.example:8765"})
    assert rebound.status_code == 403 and "evil.example" in rebound.json()["detail"]
    named = _client(own_store, hosts=("127.0.0.1", "mybox"))
    assert named.get("/api/info", headers={"host": "mybox:8765"}).status_code == 200


def test_cross_origin_posts_are_refused(own_store) -> None:
    c = _client(own_store)
    evil = c.post("/api/search", content=_png(), headers={"origin": "http://evil.example"})
    assert evil.status_code == 403 and "cross-origin" in evil.json()["detail"]
    same = c.post("/api/search", content=_png(), headers={"origin": "http://127.0.0.1"})
    assert same.status_code == 200 and same.json()["hits"]
    assert c.post("/api/search", content=_png()).status_code == 200  # curl sends no Origin


def test_a_token_is_required_off_loopback_and_kept_in_a_cookie(own_store) -> None:
    c = _client(own_store, host="192.168.1.5", token="s3cret")
    assert c.get("/api/info").status_code == 401
    assert c.get("/api/info?token=wrong").status_code == 401
    assert c.get("/api/info", headers={"authorization": "Bearer s3cret"}).status_code == 200
    first = c.get("/?token=s3cret")
    assert first.status_code == 200 and "httponly" in first.headers["set-cookie"].lower()
    assert "samesite=strict" in first.headers["set-cookie"].lower()
    assert c.get("/api/info").status_code == 200  # the page's own requests: the cookie


def test_filters_refuse_unknown_values_and_search_inside_faiss(own_store) -> None:
    c = _client(own_store)
    rows = {r["id"]: r for r in own_store.table(["id", "label", "split"]).to_pylist()}
    some = next(iter(rows))
    bad = c.get(f"/api/search/id/{some}?label=zzz")
    assert bad.status_code == 400 and "no label 'zzz'" in bad.json()["detail"]
    assert c.get(f"/api/search/id/{some}?split=nope").status_code == 400
    hits = c.get(f"/api/search/id/{some}?label=dog&k=50").json()["hits"]
    dogs = {i for i, r in rows.items() if r["label"] == "dog"} - {some}
    assert {int(h["id"]) for h in hits} == dogs  # every dog, however few, none else
    test_dogs = c.get(f"/api/search/id/{some}?label=dog&split=train&k=50").json()["hits"]
    assert all(h["label"] == "dog" and h["split"] == "train" for h in test_dogs)


def test_a_row_s_file_is_served_only_while_it_is_the_embedded_file(
    own_store, backbone, tmp_path
) -> None:
    store = Store(tmp_path / "copy")
    shutil.copytree(own_store.path, store.path)
    src = tmp_path / "src"
    shutil.copytree(Path(own_store.manifest()["source"]["root"]), src)
    store.update(read_source(src), backbone, progress=False)
    c = _client(store)
    table = store.table(["id", "path"]).to_pylist()
    (a, b, d) = table[:3]
    ok = c.get(f"/api/image/{a['id']}")
    assert ok.status_code == 200 and ok.content == Path(a["path"]).read_bytes()
    assert ok.headers["content-type"] == "image/png"
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    os.unlink(b["path"])
    os.symlink(secret, b["path"])  # an embedded file swapped for a link to a secret
    swapped = c.get(f"/api/image/{b['id']}")
    assert swapped.status_code == 410 and "symbolic link" in swapped.json()["detail"]
    assert "PRIVATE" not in swapped.text
    assert c.get(f"/api/thumb/{b['id']}").status_code == 410
    Path(d["path"]).write_bytes(secret.read_bytes())  # same path, other content
    assert c.get(f"/api/image/{d['id']}").status_code == 410
    os.unlink(a["path"])
    assert c.get(f"/api/image/{a['id']}").status_code == 404


def test_range_headers_cost_nothing(own_store) -> None:
    c = _client(own_store)
    rid = own_store.table(["id"])["id"][0].as_py()
    ranges = "bytes=" + ",".join(f"{i}-{i}" for i in range(0, 20000, 2))
    t0 = time.perf_counter()
    res = c.get(f"/api/image/{rid}", headers={"range": ranges})
    assert res.status_code == 200 and time.perf_counter() - t0 < 5  # whole file, no parsing


def test_uploads_of_any_bit_depth_and_broken_files_get_4xx_never_5xx(own_store) -> None:
    c = _client(own_store)
    deep = io.BytesIO()
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(deep, format="PNG")
    assert c.post("/api/search", content=deep.getvalue()).status_code == 200
    broken_tiff = b"II*\x00\x08\x00\x00\x00\x01\x00\x00\x01\x03\x00\x01\x00\x00\x00\x00\x00"
    res = c.post("/api/search", content=broken_tiff)
    assert 400 <= res.status_code < 500, res.text
    psd = b"8BPS" + bytes(40)  # a format extraction does not read
    assert c.post("/api/search", content=psd).status_code == 415
    statuses = {c.post("/api/search", content=blob).status_code for blob in fuzz_corpus(120)}
    assert all(s < 500 for s in statuses), statuses


def fuzz_corpus(n: int, seed: int = 0) -> list[bytes]:
    """Seeded byte-mutations (flips, truncations, spliced junk) of small valid images of every
    format extraction reads."""
    rng = random.Random(seed)
    base = []
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24, 3), np.uint8))
    for fmt in ("PNG", "JPEG", "TIFF", "GIF", "WEBP", "BMP"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        base.append(buf.getvalue())
    out = []
    for i in range(n):
        data = bytearray(base[i % len(base)])
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            pos = rng.randrange(len(data))
            if op < 0.5:
                data[pos] = rng.randrange(256)
            elif op < 0.75:
                del data[pos:]
                data += b"\x00"
            else:
                data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        out.append(bytes(data))
    return out


def test_a_row_in_a_bucket_is_served_only_while_it_is_the_embedded_object(
    s3_server, backbone, tmp_path
) -> None:
    s3 = s3_server.client()
    bucket = s3_server.bucket("served")
    bodies = {}
    for i, label in enumerate(("cat", "dog", "cat")):
        buf = io.BytesIO()
        arr = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(buf, format="PNG")
        bodies[f"photos/{label}/{i}.png"] = buf.getvalue()
        s3.put_object(Bucket=bucket, Key=f"photos/{label}/{i}.png", Body=buf.getvalue())
    store = Store(tmp_path / "store")
    store.update(read_source(f"s3://{bucket}/photos/"), backbone, progress=False)
    c = _client(store)
    rows = {r["path"]: r["id"] for r in store.table(["id", "path"]).to_pylist()}
    url = f"s3://{bucket}/photos/cat/0.png"
    ok = c.get(f"/api/image/{rows[url]}")
    assert ok.status_code == 200 and ok.content == bodies["photos/cat/0.png"]
    assert ok.headers["content-type"] == "image/png"
    assert c.get(f"/api/thumb/{rows[url]}").status_code == 200
    s3.put_object(Bucket=bucket, Key="photos/cat/0.png", Body=b"secret of the same length?")
    replaced = c.get(f"/api/image/{rows[url]}")
    assert replaced.status_code == 410 and "changed since it was embedded" in replaced.text
    assert "secret" not in replaced.text
    s3.delete_object(Bucket=bucket, Key="photos/dog/1.png")
    gone = c.get(f"/api/image/{rows[f's3://{bucket}/photos/dog/1.png']}")
    assert gone.status_code == 404 and "object not found" in gone.json()["detail"]
