"""The state the search service's routes share: the store as it is now (`SearchService.snapshot`,
one commit's rows, index, stored vectors and map: `Snapshot`), the backbone that embeds
uploads, and the places slow work waits for (`Places`), with `in_thread` to run it off the
event loop.

The store as it is now: every request checks manifest.json (one stat); after a commit
(`headstart embed`, `dedup --fix-splits --apply`) the service opens the new commit's files,
checks they belong together (`extractors.search.searcher.commit_searcher`) and swaps to them
between requests: a request keeps the snapshot it started with, and rows, index, stored vectors
and map always come from one commit. A commit that does not open whole is logged once (logger
`headstart`) and tried again later and later (SWAP_RETRY_S, doubled each time up to
SWAP_RETRY_MAX_S); meanwhile the service answers from the commit it has.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import numpy as np
import pyarrow.parquet as pq
from fastapi import Depends, HTTPException, Request

from extractors.search.query import NotFound, QueryError, hit
from extractors.search.query import Query as Search
from extractors.search.rows import Rows
from extractors.search.searcher import (
    Searcher,
    commit_searcher,
    embed_batches,
    searcher_for,
    stamp,
)
from extractors.settings import EmbedSettings
from extractors.store.layout import (
    AUDIT,
    AUDIT_ISSUES,
    AUDIT_SUMMARY,
    EMBEDDINGS,
    MANIFEST,
    META_COLUMNS,
)
from extractors.store.store import Store, StoreError
from flows.web.files import THUMB_DECODING, Thumbs
from flows.web.memory import trim
from flows.web.security import MAX_REQUEST_IMAGES, Limits
from flows.web.uploads import Uploads

SWAP_RETRY_S = 1.0  # a new commit that did not open whole is tried again after this,
SWAP_RETRY_MAX_S = 60.0  # doubled after each failed try up to this
HEAVY_AT_ONCE = 2  # requests that embed images, running at once (the map has a place of its own)
log = logging.getLogger("headstart")
T = TypeVar("T")


@dataclass(frozen=True)
class Places:
    """Where slow work waits, so that however many arrive, the pool's threads stay free for
    quick requests (a search by id, a row, an image): embedding images (`heavy`), computing a
    map (`mapping`: its own place, not one of `heavy`), decoding thumbnails (`thumbs`; a cached
    one waits for none)."""

    heavy: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(HEAVY_AT_ONCE)
    )
    mapping: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))
    thumbs: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(THUMB_DECODING)
    )


async def in_thread(
    fn: Callable[..., T], *args: Any, limiter: anyio.CapacityLimiter | None = None
) -> T:
    """`fn(*args)` in a worker thread; with `limiter`, waiting for one of its places first (on
    the event loop, holding no thread of the pool the quick requests use)."""
    return await anyio.to_thread.run_sync(lambda: fn(*args), limiter=limiter)


@dataclass
class Snapshot:
    """One commit of the store, as the service answers from it: its manifest, rows, index and
    stored vectors (`extractors.search.searcher.commit_searcher`: opened together), and its map."""

    manifest: dict[str, Any]
    searcher: Searcher
    stamp: tuple[int, int, int] | None  # manifest.json's when it was opened
    _map: bytes | None = None  # the map as JSON, once computed
    _map_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def rows(self) -> Rows:
        return self.searcher.rows

    @property
    def computed_map(self) -> bytes | None:
        """The map as JSON if it is computed already, else None (no waiting)."""
        return self._map

    def embedding_map(self, store: Store) -> bytes:
        """The map of this commit's Parquet (the file this snapshot opened, not the newest), as
        JSON: computed once, by the first caller; later ones wait for it."""
        from flows.web.map import project

        with self._map_lock:
            if self._map is None:
                data = project(store, parquet=self.searcher.vector_of.file)
                for p in data["points"]:
                    p["id"] = str(p["id"])
                self._map = json.dumps(data, separators=(",", ":")).encode()
            return self._map


class SearchService:
    """The store's index (memory-mapped), its row metadata, and the backbone (loaded lazily);
    `snapshot()` is the store's latest commit, swapped in when one lands."""

    def __init__(
        self,
        store: Store,
        workspace: str | Path,
        mlflow_url: str | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.store, self.workspace, self.mlflow_url = store, Path(workspace), mlflow_url
        self.batch_size = batch_size or EmbedSettings().batch_size
        if not (store.path / EMBEDDINGS).exists():
            raise StoreError(f"store {store.path} holds no images yet; run `headstart embed`")
        seen = stamp(store.path / MANIFEST)
        manifest = store.manifest()
        self._snap = Snapshot(manifest, searcher_for(store, self.embed_images), seen)
        self.limits = Limits(manifest["dim"])
        trim()  # the opening checks' temporaries, back to the system
        self._backbone = None
        self._lock = threading.Lock()  # loading the backbone
        self._model_lock = threading.Lock()  # one forward at a time
        self._swap_lock = threading.Lock()
        self._retry_at = 0.0  # after a commit that could not be opened whole
        self._retry_s = SWAP_RETRY_S  # the wait before the next try, doubled after each
        self._failed: tuple[int, int, int] | None = None  # the manifest stamp that failed
        self.uploads = Uploads()
        self.thumbs = Thumbs()

    # --- the store as it is now ----------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The latest commit of the store: one stat of manifest.json per call; when it changed,
        the new commit's files are opened and swapped in (by the one request that noticed;
        requests meanwhile keep the snapshot they have). While a writer is between its files
        the current snapshot stays, and a request SWAP_RETRY_S later tries again; a commit that
        still does not open is logged once and tried ever less often (up to SWAP_RETRY_MAX_S
        apart), the current snapshot served meanwhile."""
        snap = self._snap
        now = stamp(self.store.path / MANIFEST)
        if now == snap.stamp or now is None:
            return snap
        if now == self._failed and time.monotonic() < self._retry_at:
            return snap  # this commit failed to open a moment ago (a newer one is tried now)
        if not self._swap_lock.acquire(blocking=False):
            return snap  # another request is opening the new commit
        try:
            if self._snap is not snap:
                return self._snap
            opened = commit_searcher(self.store, self.embed_images)
            if opened is None:  # a writer between its files, or a broken store: not yet
                if self._retry_s == SWAP_RETRY_S * 2:  # failed twice: no writer's moment
                    log.warning(
                        "search service: the new commit of %s does not open whole (its files "
                        "do not belong together); answering from the previous one, trying "
                        "again ever less often (up to every %.0f s)",
                        self.store.path,
                        SWAP_RETRY_MAX_S,
                    )
                self._failed = now
                self._retry_at = time.monotonic() + self._retry_s
                self._retry_s = min(self._retry_s * 2, SWAP_RETRY_MAX_S)
            else:
                self._snap = Snapshot(opened[0], opened[1], now)
                self._retry_s, self._failed = SWAP_RETRY_S, None
                trim()
            return self._snap
        finally:
            self._swap_lock.release()

    # --- queries -------------------------------------------------------------------------
    def backbone(self) -> Any:  # extractors.embedding.backbones.Backbone
        """The store's backbone, loaded on first use (on the CPU), checked against the store."""
        with self._lock:
            if self._backbone is None:
                from extractors.workspace import backbone_for

                bb = backbone_for(self._snap.manifest["backbone"], self.workspace, device="cpu")
                if bb.weights != self._snap.manifest["weights"]:
                    raise HTTPException(500, f"backbone weights {bb.weights} differ from store")
                self._backbone = bb
            return self._backbone

    def embed_images(self, images: Sequence[bytes | str | Path]) -> np.ndarray:
        """Uploaded images as vectors: all decoded (checked, as `Uploads.decode`), then run
        through the backbone `batch_size` at a time, one forward per batch."""
        if any(not isinstance(i, bytes) for i in images):
            raise QueryError("this service embeds uploaded images only, not paths")
        if len(images) > MAX_REQUEST_IMAGES:
            raise HTTPException(413, f"a request embeds at most {MAX_REQUEST_IMAGES} images")
        bb = self.backbone()
        decoded = [self.uploads.decode(data, bb.decode_side) for data in images]  # type: ignore[arg-type]
        with self._model_lock:
            return embed_batches(bb, decoded, self.batch_size)

    def query(self, snap: Snapshot, queries: Sequence[Search]) -> list[dict[str, Any]]:
        """Queries (extractors/search/query.py) over one snapshot, filtered inside FAISS: a filter
        costs about what no filter does; a label or split the store does not have is refused
        (400). The images of all of them are embedded together, in batches."""
        return snap.searcher.run_many(queries)

    def row(self, snap: Snapshot, row_id: int) -> dict[str, Any]:
        r = snap.searcher.vector_of.read(row_id, META_COLUMNS).to_pylist()[0]  # NotFound: 404
        out = {**r, "id": str(r["id"]), "row_number": snap.rows.parquet_row(row_id)}
        out["parquet"] = str(self.store.path / EMBEDDINGS)
        out["store"] = str(self.store.path)
        if self.mlflow_url:
            out["mlflow"] = f"{self.mlflow_url.rstrip('/')}/#/experiments"
        return out

    def issues(self, snap: Snapshot, issue: str | None, limit: int) -> dict[str, Any]:
        """The store's latest audit (`headstart audit`): findings, most suspect first within
        each kind, as gallery cards with their related image; stale when the store changed."""
        path = self.store.path / AUDIT
        if not path.exists():
            return {"summary": None, "stale": False, "findings": []}
        summary = json.loads((self.store.path / AUDIT_SUMMARY).read_text())
        table = pq.ParquetFile(path).read().to_pylist()
        if issue is not None:
            if issue not in AUDIT_ISSUES:
                raise HTTPException(400, f"issue takes {', '.join(AUDIT_ISSUES)}, not {issue!r}")
            table = [r for r in table if r["issue"] == issue]
        cards = []
        rows = snap.rows
        for r in table[:limit]:
            if r["id"] not in rows:
                continue  # removed from the store since the audit
            card = hit(rows.get(r["id"]), r["score"])
            card |= {"issue": r["issue"], "suggested_label": r["suggested_label"]}
            try:
                related = rows.by_path(r["related"]) if r["related"] else None
            except NotFound:
                related = None
            card["related"] = None if related is None else hit(rows.get(related), 0.0)
            cards.append(card)
        stale = summary.get("fingerprint") != snap.manifest["fingerprint"]
        return {"summary": summary, "stale": stale, "findings": cards}

    def info(self, snap: Snapshot) -> dict[str, Any]:
        m = snap.manifest
        entry = m.get("index") or {}
        return {
            "store": str(self.store.path),
            "source": m["source"],
            "backbone": m["backbone"],
            "rows": m["rows"],
            "updated": m.get("updated"),
            "classes": m.get("classes", []),
            "splits": m.get("splits", {}),
            "index": {
                "type": entry.get("type"),
                "reason": entry.get("choice", {}).get("reason"),
                "params": entry.get("tuning", {}).get("params"),
                "recall_at_10": entry.get("tuning", {}).get("recall"),
            },
            "limits": self.limits.record(),
        }


async def get_service(request: Request) -> SearchService:
    """The app's `SearchService` (a dependency of the routes; on the loop, no thread taken)."""
    return request.app.state.service


async def get_places(request: Request) -> Places:
    """The app's `Places` (a dependency of the routes that wait for one)."""
    return request.app.state.places


Service = Annotated[SearchService, Depends(get_service)]
Waits = Annotated[Places, Depends(get_places)]
