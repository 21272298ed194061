"""The search service for real: uvicorn on a free port, HTTP requests, headless Chromium."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.flows.live import serving

ARTIFACTS = Path(
    os.environ.get("HEADSTART_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(built_store, tmp_path_factory):
    with serving(built_store.path, tmp_path_factory.mktemp("ws")) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


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
    assert by_id["query"]["id"] == str(q["id"]) and len(by_id["hits"]) == 6
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
    from flows.embedding_map import project, write_html, write_png

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

            page.goto(f"{server}/map")
            page.wait_for_function("document.querySelector('#meta').textContent.includes('tsne')")
            assert page.locator("#legend div").count() == 4
            page.screenshot(path=str(ARTIFACTS / "ui-map.png"))
        finally:
            browser.close()
    assert (ARTIFACTS / "ui-gallery.png").stat().st_size > 10_000
