"""The search service for real: uvicorn on a free port, HTTP requests, headless Chromium."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

ARTIFACTS = Path(
    os.environ.get("HEADSTART_TEST_ARTIFACTS", Path(__file__).parents[3] / "test-artifacts")
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _rows(store):
    return store.table(["id", "path", "label", "split"]).to_pylist()


def test_info_and_upload_search(client, built_store):
    info = client.get("/api/info").json()
    assert info["rows"] == built_store.manifest()["rows"] == 100
    assert info["classes"] == ["0", "1", "2", "3"] and info["index"]["type"] == "IDMap2,Flat"
    query = _rows(built_store)[7]
    data = Path(query["path"]).read_bytes()
    body = client.post("/api/search?k=5", content=data).json()
    hits = body["hits"]
    assert len(hits) == 5 and hits[0]["id"] == str(query["id"]) and hits[0]["score"] > 0.999
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    filtered = client.post("/api/search?k=4&label=2&split=test", content=data).json()["hits"]
    assert filtered and all(h["label"] == "2" and h["split"] == "test" for h in filtered)


def test_search_by_id_and_by_path(client, built_store):
    rows = _rows(built_store)
    q = rows[3]
    by_id = client.get(f"/api/search/id/{q['id']}?k=6").json()
    assert by_id["query"]["like"] == [{"id": str(q["id"])}] and len(by_id["hits"]) == 6
    assert str(q["id"]) not in [h["id"] for h in by_id["hits"]]  # not its own neighbour
    root = Path(built_store.manifest()["source"]["root"])
    rel = Path(q["path"]).relative_to(root)
    for p in (q["path"], str(rel)):
        got = client.get("/api/search/path", params={"path": p, "k": 6}).json()
        assert [h["id"] for h in got["hits"]] == [h["id"] for h in by_id["hits"]]


def test_files_are_served_only_for_rows_of_the_store(client, built_store):
    q = _rows(built_store)[0]
    assert client.get(f"/api/image/{q['id']}").content == Path(q["path"]).read_bytes()
    thumb = client.get(f"/api/thumb/{q['id']}?size=64")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 64
    row = client.get(f"/api/row/{q['id']}").json()
    assert (
        row["path"] == q["path"] and "embedding" not in row and row["parquet"].endswith(".parquet")
    )
    for bad in (
        "/api/image/123",
        "/api/image/..%2F..%2Fetc%2Fpasswd",
        "/api/thumb/abc",
        "/api/row/-1",
        "/api/search/id/42",
    ):
        r = client.get(bad)
        assert r.status_code == 404, bad
    outside = client.get("/api/search/path", params={"path": "/etc/passwd"})
    assert outside.status_code == 404 and "not an image of this store" in outside.json()["detail"]
    up = client.get("/api/search/path", params={"path": "../../../etc/passwd"})
    assert up.status_code == 404


def test_bad_uploads_get_a_clear_4xx(client, tmp_path):
    photo = io.BytesIO()
    Image.new("RGB", (400, 300), (200, 30, 30)).save(photo, format="JPEG")
    big = io.BytesIO()
    Image.new("L", (8000, 6000)).save(big, format="PNG")
    cases = {
        "empty": (b"", 400, "empty upload"),
        "text": (b"hello, not an image", 415, "not an image"),
        "truncated": (photo.getvalue()[: len(photo.getvalue()) // 2], 400, "truncated"),
        "too many pixels": (big.getvalue(), 413, "pixel limit"),
        "too many bytes": (b"\xff" * (21 * 2**20), 413, "over 20 MB"),
    }
    for name, (data, status, words) in cases.items():
        r = client.post("/api/search", content=data)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert words in r.json()["detail"], (name, r.json())
    assert client.post("/api/search?k=0", content=photo.getvalue()).status_code == 422
    assert client.post("/api/search?k=5", content=photo.getvalue()).status_code == 200


def test_embedding_map_api_and_files(client, built_store, tmp_path):
    from flows.web.map import project, write_html, write_png

    data = client.get("/api/map").json()
    assert data["method"] == "tsne" and len(data["points"]) == 100
    assert all(0 <= p["x"] <= 1 and 0 <= p["y"] <= 1 for p in data["points"])
    local = project(built_store)
    png = write_png(local, tmp_path / "map.png")
    html = write_html(local, tmp_path / "map.html")
    assert Image.open(png).size[0] > 400
    assert '"method": "tsne"' in html.read_text() and "/*MAP_DATA*/null" not in html.read_text()


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="no system Chromium (apt install chromium)",
)
def test_gallery_in_headless_chromium(server, built_store):
    """A person's path: open the page, pick an image, see the gallery; click a result."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI must install Chromium (.ci/run does: apt-get install chromium)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    query = _rows(built_store)[42]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server)
            page.wait_for_function(
                "document.querySelector('#store-meta').textContent.includes('100 images')"
            )
            page.set_input_files("#file", query["path"])
            page.wait_for_selector(".hit")
            page.wait_for_function("[...document.images].every((i) => i.complete)")
            cards = page.locator(".hit")
            assert cards.count() == 12
            first = cards.nth(0)
            assert first.get_attribute("data-id") == str(query["id"])
            assert first.locator(".label").inner_text() == query["label"]
            assert float(first.locator(".score").inner_text()) > 0.999
            sizes = page.eval_on_selector_all(".hit img", "els => els.map(e => e.naturalWidth)")
            assert all(w > 0 for w in sizes)  # every thumbnail really loaded
            page.screenshot(path=str(ARTIFACTS / "ui-gallery.png"), full_page=True)

            second = cards.nth(1).get_attribute("data-id")
            cards.nth(1).locator("img").click()
            page.wait_for_url(f"**/?id={second}")
            page.wait_for_function(
                "document.querySelector('.hit') && "
                f"!document.querySelector('.hit[data-id=\"{second}\"]')"
            )
            assert "nearest to" in page.locator("#status").inner_text()

            page.select_option("#label", "1")
            page.wait_for_function(
                "[...document.querySelectorAll('.hit .label')].every((e) => e.textContent === '1')"
            )
            page.select_option("#label", "")
            page.wait_for_function("document.querySelectorAll('.hit').length === 12")

            # More like one result, less like another: both become examples of the query.
            liked = cards.nth(0).get_attribute("data-id")
            cards.nth(0).locator("button.like").click()
            page.wait_for_function("document.querySelectorAll('#examples .chip').length === 2")
            unliked = cards.nth(2).get_attribute("data-id")
            cards.nth(2).locator("button.unlike").click()
            page.wait_for_function("document.querySelector('#status').textContent.includes('less')")
            page.wait_for_function(f"!document.querySelector('.hit[data-id=\"{unliked}\"]')")
            ids = page.eval_on_selector_all(".hit", "els => els.map(e => e.dataset.id)")
            assert liked not in ids and unliked not in ids and len(ids) == 12  # examples left out
            page.locator("#more").click()  # the next page, appended
            page.wait_for_function("document.querySelectorAll('.hit').length === 24")
            ids = page.eval_on_selector_all(".hit", "els => els.map(e => e.dataset.id)")
            assert len(set(ids)) == 24
            page.fill("#path_prefix", "3/")
            page.dispatch_event("#path_prefix", "change")
            page.wait_for_function(
                "document.querySelectorAll('.hit').length === 12 && "
                "[...document.querySelectorAll('.hit .label')].every((e) => e.textContent === '3')"
            )
            page.fill("#path_prefix", "")

            page.goto(f"{server}/map")
            page.wait_for_function("document.querySelector('#meta').textContent.includes('tsne')")
            assert page.locator("#legend div").count() == 4
            page.screenshot(path=str(ARTIFACTS / "ui-map.png"))
        finally:
            browser.close()
    assert (ARTIFACTS / "ui-gallery.png").stat().st_size > 10_000


def _by_label(store) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in _rows(store):
        out.setdefault(r["label"], []).append(r)
    return out


def test_queries_by_vector_examples_and_pages(client, built_store) -> None:
    import base64

    import numpy as np

    rows = _by_label(built_store)
    a, b = rows["0"][0], rows["1"][0]
    first = client.get(f"/api/search/id/{a['id']}?k=8").json()["hits"]
    page = client.get(f"/api/search/id/{a['id']}?k=3&offset=2").json()
    assert [h["id"] for h in page["hits"]] == [h["id"] for h in first[2:5]]
    assert page["query"] == {
        "like": [{"id": str(a["id"])}], "unlike": [], "k": 3, "offset": 2, "filters": {}
    }  # fmt: skip
    # A stored row's vector, as a JSON list and as base64 float32, finds the row itself first.
    vectors = {int(i): v for vs, ids in built_store.batches() for v, i in zip(vs, ids, strict=True)}
    vector = vectors[a["id"]]
    b64 = base64.b64encode(vector.astype("<f4").tobytes()).decode()
    for ex in ({"vector": vector.tolist()}, {"vector_b64": b64}):
        got = client.post("/api/query", json={"like": [ex], "k": 9}).json()["hits"]
        assert got[0]["id"] == str(a["id"]) and got[1:] == first[:8]
    # More like a "0", less like a "1": the results move away from the "1".
    like = client.post("/api/query", json={"like": [{"id": str(a["id"])}], "k": 20}).json()
    both = {"like": [{"id": str(a["id"])}], "unlike": [{"id": str(b["id"])}], "k": 20}
    pushed = client.post("/api/query", json=both).json()
    assert pushed["query"]["unlike"] == [{"id": str(b["id"])}]
    unit = {i: v / np.linalg.norm(v) for i, v in vectors.items()}

    def closeness(hits):
        return np.mean([unit[int(h["id"])] @ unit[b["id"]] for h in hits])

    assert closeness(pushed["hits"]) < closeness(like["hits"])
    assert str(b["id"]) not in [h["id"] for h in pushed["hits"]]  # examples are left out
    # Several images at once, by path and upload: one result list each, in order.
    upload = base64.b64encode(Path(b["path"]).read_bytes()).decode()
    batch = {"queries": [{"like": [{"path": a["path"]}], "k": 2},
                         {"like": [{"image_b64": upload}], "k": 2}]}  # fmt: skip
    results = client.post("/api/query/batch", json=batch).json()["results"]
    assert [r["hits"][0]["id"] for r in results] == [first[0]["id"], str(b["id"])]


def test_filters_by_id_list_and_path_prefix(client, built_store) -> None:
    rows = _by_label(built_store)
    a = rows["2"][0]
    some = [r["id"] for r in rows["3"][:4]] + [r["id"] for r in rows["0"][:2]]
    ids = ",".join(map(str, some))
    got = client.get(f"/api/search/id/{a['id']}?k=10&ids={ids}").json()["hits"]
    assert sorted(int(h["id"]) for h in got) == sorted(some)  # every allowed row, no other
    three = client.get(f"/api/search/id/{a['id']}?k=10&ids={ids}&label=3").json()["hits"]
    assert sorted(int(h["id"]) for h in three) == sorted(some[:4])
    root = built_store.manifest()["source"]["root"]
    for prefix in ("1/", f"{root}/1/"):  # relative to the source root, or absolute
        hits = client.get(f"/api/search/id/{a['id']}", params={"k": 30, "path_prefix": prefix})
        paths = [h["path"] for h in hits.json()["hits"]]
        assert len(paths) == 25 and all(p.startswith(f"{root}/1/") for p in paths)
    body = {"like": [{"id": str(a["id"])}], "ids": [str(i) for i in some], "path_prefix": "0/"}
    both = client.post("/api/query", json=body).json()["hits"]
    assert sorted(int(h["id"]) for h in both) == sorted(some[4:])


def test_bad_queries_say_what_they_take(client, built_store) -> None:
    a = _rows(built_store)[0]
    cases = [
        ({"like": []}, 422),
        ({"like": [{"id": str(a["id"]), "path": a["path"]}]}, 400),  # two kinds in one example
        ({"like": [{"vector": [0.1, 0.2]}]}, 400),  # not the store's dimension
        ({"like": [{"vector_b64": "%%%"}]}, 400),
        ({"like": [{"image_b64": "aGVsbG8="}]}, 415),  # "hello" is not an image
        ({"like": [{"id": "42"}]}, 404),
        ({"like": [{"path": "/etc/passwd"}]}, 404),
        ({"like": [{"id": str(a["id"])}], "label": "zzz"}, 400),
        ({"like": [{"id": str(a["id"])}], "ids": ["42"]}, 404),
        ({"like": [{"id": str(a["id"])}], "k": 100, "offset": 950}, 400),
        ({"like": [{"id": str(a["id"])}], "sort": "up"}, 422),  # unknown field
    ]
    for body, status in cases:
        res = client.post("/api/query", json=body)
        assert res.status_code == status, (body, res.text)
        assert res.json()["detail"]
    chunked = client.post("/api/query", content=iter([b'{"like": []}']))  # no Content-Length
    assert chunked.status_code == 422  # read, counted and parsed as any other body
    huge = client.post("/api/query", content=b" " * (64 * 2**20 + 1))
    assert huge.status_code == 413


def test_the_api_reference_works_offline(client) -> None:
    import re

    spec = client.get("/api/openapi.json").json()
    page = client.get("/api/docs").text
    assert "<script" not in page and not re.search(r"(src|href)=['\"]https?://", page)
    for path, methods in spec["paths"].items():
        assert path in page
        for op in methods.values():
            for p in op.get("parameters", []):
                if path.startswith("/api/search") or path.startswith("/api/issues"):
                    assert p.get("description"), (path, p["name"])
                    if p["name"] != "row_id" or path.startswith("/api/search"):
                        assert (
                            "example" in p
                            or p.get("schema", {}).get("examples")
                            or (p.get("examples"))
                        ), (path, p["name"])
    assert "vector_b64" in page and "path_prefix" in page


def test_search_on_the_command_line_answers_what_the_api_answers(client, built_store, tmp_path):
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    rows = _by_label(built_store)
    a, b = rows["0"][1], rows["2"][1]
    store = ["--store", str(built_store.path), "--workspace", str(tmp_path)]
    args = ["search", "--like", str(a["id"]), "--unlike", b["path"], "-k", "4", "--offset", "1"]
    res = CliRunner().invoke(app, [*args, "--split", "train", "--json", *store])
    assert res.exit_code == 0, res.output
    body = {"like": [{"id": str(a["id"])}], "unlike": [{"id": str(b["id"])}], "k": 4,
            "offset": 1, "split": "train"}  # fmt: skip
    assert json.loads(res.stdout) == client.post("/api/query", json=body).json()
    # Several images: one result list each, as the batch API; the query image itself first.
    images = [rows["1"][0]["path"], rows["3"][0]["path"]]
    res = CliRunner().invoke(app, ["search", *images, "-k", "2", "--json", *store])
    assert res.exit_code == 0, res.output
    results = json.loads(res.stdout)["results"]
    assert [r["hits"][0]["path"] for r in results] == images
    table = CliRunner().invoke(app, ["search", "--like", a["path"], "-k", "3", *store])
    assert table.exit_code == 0 and "nearest to" in table.output
    # A relative path is taken from the current folder, else from the source root.
    root = Path(built_store.manifest()["source"]["root"])
    rel = str(Path(a["path"]).relative_to(root))
    before = os.getcwd()
    for where in (root, root.parent):
        os.chdir(where)
        try:
            got = CliRunner().invoke(app, ["search", "--like", rel, "-k", "2", "--json", *store])
        finally:
            os.chdir(before)
        assert got.exit_code == 0, got.output
        assert json.loads(got.stdout)["query"]["like"] == [{"id": str(a["id"])}]
    bad = CliRunner().invoke(app, ["search", "--like", "42", *store])
    assert bad.exit_code == 2 and "no row with id 42" in bad.output
    bad = CliRunner().invoke(app, ["search", "--like", str(a["id"]), "--label", "zzz", *store])
    assert bad.exit_code == 2 and "no label 'zzz'" in bad.output


def test_the_ui_command_serves_without_pandas(built_store, tmp_path) -> None:
    """`headstart ui` keeps pyarrow from importing pandas (48 MB a process); every endpoint,
    an upload (torch) and the map (scikit-learn) still work in that process."""
    import subprocess
    import sys

    from tests.flows.web.live import free_port, wait_until_answering

    port = free_port()
    cmd = [sys.executable, "-m", "flows.cli", "ui", "--store", str(built_store.path),
           "--workspace", str(tmp_path), "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[3], stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(base)
        row = _rows(built_store)[5]
        assert httpx.get(f"{base}/api/search/id/{row['id']}?k=3").json()["hits"]
        with open(row["path"], "rb") as fh:
            up = httpx.post(f"{base}/api/search?k=2", content=fh.read(), timeout=120)
        assert up.status_code == 200 and up.json()["hits"][0]["id"] == str(row["id"])
        assert httpx.get(f"{base}/api/map", timeout=120).json()["method"] == "tsne"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert b"Traceback" not in err, err.decode()[-3000:]
