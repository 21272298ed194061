"""A running search service answers from the store as it is now: after a commit, search, rows,
files and the map all come from the new commit; a commit caught between its files is not
swapped in."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from starlette.testclient import TestClient

from extractors.embedding.sources import read_source
from extractors.store.layout import INDEX
from extractors.store.store import Store
from flows.web.app import create_app
from flows.web.service import SWAP_RETRY_S
from tests.flows.web.live import serving


def _source(root: Path, n: int = 5) -> Path:
    rng = np.random.default_rng(1)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / label / f"{i}.png")
    return root


def _ids(store: Store) -> dict[str, str]:
    return {str(r["id"]): r["path"] for r in store.table(["id", "path"]).to_pylist()}


def _everything(c: httpx.Client | TestClient, like: str) -> set[str]:
    res = c.get(f"/api/search/id/{like}?k=100")
    assert res.status_code == 200, res.text
    return {h["id"] for h in res.json()["hits"]} | {like}


def test_a_running_service_answers_from_each_new_commit(backbone, tmp_path) -> None:
    src = _source(tmp_path / "src")
    store = Store(tmp_path / "store")
    store.update(read_source(src), backbone, progress=False)
    before = _ids(store)
    keep, gone = sorted(before)[:2]
    with (
        serving(store.path, tmp_path / "ws") as base,
        httpx.Client(base_url=base, timeout=120) as c,
    ):
        assert _everything(c, keep) == set(before)
        assert c.get(f"/api/row/{gone}").status_code == 200
        assert c.get(f"/api/thumb/{gone}").status_code == 200
        # `headstart embed` again, with one file deleted and one added, while it runs.
        os.unlink(before[gone])
        arr = np.random.default_rng(7).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(src / "dog" / "new.png")
        store.update(read_source(src), backbone, progress=False)
        after = _ids(store)
        (new,) = set(after) - set(before)
        assert set(before) - set(after) == {gone}

        found = _everything(c, keep)
        assert found == set(after)  # the deleted row gone, the new one found
        assert c.get(f"/api/row/{gone}").status_code == 404
        assert c.get(f"/api/thumb/{gone}").status_code == 404  # not from the thumbnail cache
        assert c.get(f"/api/search/id/{gone}").status_code == 404
        row = c.get(f"/api/row/{new}")
        assert row.status_code == 200 and row.json()["path"] == after[new]
        assert c.get(f"/api/image/{new}").content == Path(after[new]).read_bytes()
        assert c.get("/api/info").json()["rows"] == len(after)
        points = c.get("/api/map").json()["points"]
        assert {p["id"] for p in points} == found  # the map is of the rows search answers
        assert all(c.get(f"/api/row/{p['id']}").status_code == 200 for p in points)


def test_a_commit_caught_between_its_files_is_not_swapped_in(backbone, tmp_path, caplog) -> None:
    src = _source(tmp_path / "src", n=3)
    store = Store(tmp_path / "store")
    store.update(read_source(src), backbone, progress=False)
    before = _ids(store)
    keep = sorted(before)[0]
    old_index = tmp_path / "old.faiss"
    shutil.copy(store.path / INDEX, old_index)
    c = TestClient(create_app(store.path, tmp_path / "ws"), base_url="http://127.0.0.1")
    assert _everything(c, keep) == set(before)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(src / "cat" / "new.png")
    store.update(read_source(src), backbone, progress=False)
    after = _ids(store)
    new_index = tmp_path / "new.faiss"
    shutil.copy(store.path / INDEX, new_index)
    # As a reader sees a store whose writer has put the new rows but not yet the new index:
    shutil.copy(old_index, store.path / "swap.tmp")
    os.replace(store.path / "swap.tmp", store.path / INDEX)
    caplog.set_level(logging.WARNING, logger="headstart")
    for _ in range(2):  # the old commit still, whole: rows and index agree
        assert _everything(c, keep) == set(before)
        assert c.get("/api/info").json()["rows"] == len(before)
        time.sleep(SWAP_RETRY_S + 0.1)  # tried again: still not whole
    for _ in range(3):  # tried ever less often meanwhile, said once
        assert c.get("/api/info").json()["rows"] == len(before)
    said = [r for r in caplog.records if r.name == "headstart"]
    assert len(said) == 1 and "does not open whole" in said[0].getMessage(), said
    shutil.copy(new_index, store.path / "swap.tmp")
    os.replace(store.path / "swap.tmp", store.path / INDEX)  # the writer is done
    deadline = time.monotonic() + 8 * SWAP_RETRY_S + 5  # the waits doubled: 1, 2, 4 s
    while c.get("/api/info").json()["rows"] != len(after):
        assert time.monotonic() < deadline, "the finished commit was never swapped in"
        time.sleep(0.2)
    assert _everything(c, keep) == set(after)
    assert len([r for r in caplog.records if r.name == "headstart"]) == 1
