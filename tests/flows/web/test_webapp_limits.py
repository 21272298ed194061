"""What one request may cost the search service: bodies bounded before they are parsed (by
Content-Length, and counted when chunked), the work of a batch bounded and run in batches, slow
work off the event loop; ids checked at the boundary; path prefixes that mean folders."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image
from starlette.testclient import TestClient
from typer.testing import CliRunner

from flows.cli import app as cli
from flows.web.app import create_app
from flows.web.security import MAX_REQUEST_IMAGES
from tests.flows.web.live import serving, serving_process

HUGE = "99999999999999999999999"  # past int64


def _rows(store) -> list[dict]:
    return store.table(["id", "path", "label", "split"]).to_pylist()


def _hwm_kb(pid: int) -> int:
    """The server process's peak resident memory."""
    return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def _rss_kb(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def _reset_hwm(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from now


def _vector_body(numbers: int) -> bytes:
    """A query whose one vector has `numbers` numbers: valid JSON, as big as asked."""
    return b'{"like": [{"vector": [' + b"0.5," * (numbers - 1) + b"0.5]}]}"


def _raw(base: str, head: str, chunks: list[bytes] = ()) -> tuple[int, bytes]:
    """Send a request's head and then `chunks` over a socket; the status and the response."""
    u = urlsplit(base)
    with socket.create_connection((u.hostname, u.port), timeout=20) as s:
        s.sendall(head.encode())
        for c in chunks:
            s.sendall(c)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            more = s.recv(65536)
            if not more:
                break
            data += more
    return int(data.split(b" ", 2)[1]), data


def test_oversized_bodies_are_refused_before_parsing_at_no_memory_cost(
    built_store, tmp_path
) -> None:
    """Measured on `headstart ui` in a process of its own: only the server's memory counts."""
    with (
        serving_process(built_store.path, tmp_path) as (server, pid),
        httpx.Client(base_url=server, timeout=120) as client,
    ):
        _refuse_oversized_bodies(client, server, pid)


def _refuse_oversized_bodies(client: httpx.Client, server: str, pid: int) -> None:
    limits = client.get("/api/info").json()["limits"]
    cap = limits["max_query_body_bytes"]
    assert 1 * 2**20 < cap < 48 * 2**20  # what the largest legitimate query needs, no more
    many = _vector_body(4_000_000)  # 16 MB of numbers: within the bytes, past the values
    assert len(many) < cap
    head = "POST /api/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    base_rss = _rss_kb(pid)
    _reset_hwm(pid)
    t0 = time.perf_counter()
    res = client.post("/api/query", content=many, headers={"content-type": "application/json"})
    grown_mb = (_hwm_kb(pid) - base_rss) / 1024
    assert grown_mb < 120, f"a refused body took the process {grown_mb:.0f} MB up"
    assert res.status_code == 413 and "JSON values" in res.json()["detail"], res.text
    # Announced too big: refused on the head alone, none of the 60 MB is waited for.
    status, body = _raw(server, head + "Content-Length: 60000000\r\n\r\n")
    assert status == 413 and b"request body over" in body
    # Chunked (no Content-Length): counted as it arrives, refused once past the limit.
    chunk = b"0.5," * 2**18  # 1 MB
    parts = [b"%x\r\n%b\r\n" % (len(chunk), chunk)] * (cap // len(chunk))
    parts.append(b"%x\r\n%b\r\n" % (len(chunk), chunk))  # the chunk that passes the limit
    status, body = _raw(server, head + "Transfer-Encoding: chunked\r\n\r\n", parts)
    assert status == 413 and b"request body over" in body
    assert time.perf_counter() - t0 < 60  # a server waiting for the 60 MB would time out at 20
    grown_mb = (_hwm_kb(pid) - base_rss) / 1024
    assert grown_mb < 120, f"the refused bodies took the process {grown_mb:.0f} MB up"
    assert client.get("/api/health").json() == {"ok": True}


def _png(seed: int, side: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _image_query(data: bytes, k: int = 5) -> dict:
    return {"like": [{"image_b64": base64.b64encode(data).decode()}], "k": k}


def test_a_batch_over_the_caps_is_refused_with_the_reason(client, built_store) -> None:
    img = _png(0, 8)
    four = {"like": _image_query(img)["like"] * 4, "k": 5}
    too_many = {"queries": [four] * 16}
    t0 = time.perf_counter()
    res = client.post("/api/query/batch", json=too_many)  # 64 images: none decoded
    assert res.status_code == 413, res.text
    assert f"at most {MAX_REQUEST_IMAGES} images" in res.json()["detail"]  # said before decoding
    assert time.perf_counter() - t0 < 30
    res = client.post("/api/query/batch", json={"queries": [_image_query(img)] * 17})
    assert res.status_code == 422 and "16" in res.text  # queries of one batch
    a = str(_rows(built_store)[0]["id"])
    res = client.post("/api/query", json={"like": [{"id": a}], "k": 101})
    assert res.status_code == 422
    examples = {"queries": [{"like": [{"id": a}] * 40}, {"like": [{"id": a}] * 40}]}
    res = client.post("/api/query/batch", json=examples)
    assert res.status_code == 413 and "at most 64 examples" in res.json()["detail"]


def test_a_batch_runs_the_backbone_in_batches_and_answers_as_one_by_one(
    built_store, tmp_path
) -> None:
    app = create_app(built_store.path, tmp_path, batch_size=4)
    import torch

    svc = app.state.service
    forwards: list[int] = []  # the batch size of each forward: the network's first convolution
    stem = next(m for m in svc.backbone().model.modules() if isinstance(m, torch.nn.Conv2d))
    hook = stem.register_forward_hook(lambda _m, args, _out: forwards.append(len(args[0])))
    images = [Path(r["path"]).read_bytes() for r in _rows(built_store)[::10]]  # 10 images
    images[3] = _png(3, 300)  # and one that is not a row
    try:
        c = TestClient(app, base_url="http://127.0.0.1")
        batch = c.post("/api/query/batch", json={"queries": [_image_query(d) for d in images]})
        assert batch.status_code == 200, batch.text
        assert forwards == [4, 4, 2]  # 10 images: three forwards of at most 4
        forwards.clear()
        alone = [c.post("/api/search?k=5", content=d).json() for d in images]
        assert len(forwards) == 10
    finally:
        hook.remove()
    for got, one in zip(batch.json()["results"], alone, strict=True):
        assert got["query"]["like"] == [{"image": "upload"}] == one["query"]["like"]
        assert [h["id"] for h in got["hits"]] == [h["id"] for h in one["hits"]]
        np.testing.assert_allclose(
            [h["score"] for h in got["hits"]], [h["score"] for h in one["hits"]], atol=1e-4
        )


def test_slow_requests_do_not_block_health_or_a_small_query(built_store, tmp_path) -> None:
    """However many slow requests arrive (the map's first computation asked 48 times, more
    than the worker threads; a batch of images; a body too big), the quick ones answer, and an
    image query does not wait for the map. Times are compared with the same requests' times
    when the service is idle, and with the map's own, so a loaded machine slows both sides."""
    a = str(_rows(built_store)[0]["id"])
    images = [_png(i, 256) for i in range(8)]
    heavy = {"queries": [_image_query(d) for d in images]}
    one_image = _image_query(_png(99, 64))
    big = _vector_body(8_000_000)
    done: dict[str, float] = {}
    busy: dict[str, float] = {}

    def timed(name: str, method: str, url: str, **kw) -> None:
        t0 = time.perf_counter()
        with httpx.Client(base_url=base, timeout=300) as other:
            assert other.request(method, url, **kw).status_code in (200, 413)
        done[name] = time.perf_counter()
        busy[name] = done[name] - t0

    def quick(client: httpx.Client) -> float:
        t0 = time.perf_counter()
        assert client.get("/api/health", timeout=60).status_code == 200
        assert client.get(f"/api/search/id/{a}?k=3", timeout=60).status_code == 200
        return time.perf_counter() - t0

    with serving(built_store.path, tmp_path) as base, httpx.Client(base_url=base) as client:
        assert client.post("/api/query", json=one_image, timeout=300).status_code == 200  # warm
        t0 = time.perf_counter()
        assert client.post("/api/query", json=one_image, timeout=300).status_code == 200
        image_idle = time.perf_counter() - t0
        quick_idle = max(quick(client) for _ in range(3))
        maps = [
            threading.Thread(target=timed, args=(f"map{i}", "GET", "/api/map")) for i in range(48)
        ]
        for t in maps:
            t.start()
        time.sleep(0.3)  # the map is being computed
        timed("image", "POST", "/api/query", json=one_image)  # needs a place to embed
        slow = [
            threading.Thread(
                target=timed, args=("batch", "POST", "/api/query/batch"), kwargs={"json": heavy}
            ),
            threading.Thread(
                target=timed, args=("big", "POST", "/api/query"), kwargs={"content": big}
            ),
        ]
        for t in slow:
            t.start()
        waits = []
        while any(t.is_alive() for t in maps + slow):
            waits.append(quick(client))
            time.sleep(0.05)
        for t in maps + slow:
            t.join()
    map_s = max(busy[f"map{i}"] for i in range(48))
    first_map = min(done[f"map{i}"] for i in range(48))
    timings = (image_idle, busy["image"], map_s, quick_idle, max(waits))
    # The image query was answered while the map was still being computed (it used to wait
    # for a place that map requests held, until the map was done).
    assert done["image"] < first_map, timings
    assert waits and map_s > 1.0  # the slow requests did overlap these
    # The quick requests wait for none of it: well under the map's time (which they used to
    # wait for, the worker threads all held by map requests).
    assert max(waits) < max(1.5, 10 * quick_idle, map_s / 3), timings


def test_ids_past_int64_are_refused_at_the_boundary(client, built_store) -> None:
    a = str(_rows(built_store)[0]["id"])
    res = client.get(f"/api/search/id/{a}?ids={HUGE}")
    assert res.status_code == 400 and "not a row id" in res.json()["detail"]
    assert client.get(f"/api/search/id/{HUGE}").status_code == 404
    assert client.get(f"/api/row/{HUGE}").status_code == 404
    for body in (
        {"like": [{"id": HUGE}]},
        {"like": [{"id": int(HUGE)}]},
        {"like": [{"id": a}], "ids": [HUGE]},
        {"like": [{"id": a}], "ids": ["-3"]},
    ):
        res = client.post("/api/query", content=json.dumps(body))
        assert res.status_code == 400 and "2**63" in res.json()["detail"], (body, res.text)


def test_the_root_prefix_matches_every_row_and_trailing_slashes_are_one(client, built_store):
    rows = _rows(built_store)
    a = str(rows[0]["id"])
    root = built_store.manifest()["source"]["root"]
    for prefix in ("/", "//", f"{root}/", f"{root}//", "."):
        res = client.get(f"/api/search/id/{a}", params={"k": 100, "path_prefix": prefix})
        assert len(res.json()["hits"]) == len(rows) - 1, prefix  # all but the row itself
    one = client.get(f"/api/search/id/{a}", params={"k": 100, "path_prefix": "1/"}).json()
    for prefix in ("1//", f"{root}/1//", "./1/"):
        got = client.get(f"/api/search/id/{a}", params={"k": 100, "path_prefix": prefix})
        assert got.json()["hits"] == one["hits"], prefix


def test_the_search_command_takes_ids_and_prefixes_and_refuses_huge_ids(
    built_store, tmp_path
) -> None:
    rows = _rows(built_store)
    a, b, c = (str(r["id"]) for r in rows[:3])
    store = ["--store", str(built_store.path), "--workspace", str(tmp_path)]
    ok = CliRunner().invoke(cli, ["search", "--like", a, "--ids", f"{b},{c}", "--json", *store])
    assert ok.exit_code == 0, ok.output
    assert {h["id"] for h in json.loads(ok.stdout)["hits"]} == {b, c}
    every = CliRunner().invoke(
        cli, ["search", "--like", a, "--path-prefix", "/", "-k", "7", "--json", *store]
    )
    assert every.exit_code == 0 and len(json.loads(every.stdout)["hits"]) == 7, every.output
    for args, flag in (
        (["--like", a, "--ids", HUGE], "--ids"),
        (["--like", a, "--ids", f"{b},-4"], "--ids"),
        (["--like", HUGE], "--like"),
    ):
        bad = CliRunner().invoke(cli, ["search", *args, *store])
        assert bad.exit_code == 2, (args, bad.output)
        assert flag in bad.output and len(bad.output.strip().splitlines()) == 1, bad.output
        assert "Traceback" not in bad.output
