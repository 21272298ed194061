"""Search service over one store: a JSON API and two pages (gallery, embedding map).

`headstart ui` serves it. Safe by construction: images and thumbnails are addressed by the
store's row `id`, never by a path, so only files that are rows of the store can be read;
search by path accepts only paths that are rows of the store. Uploads are capped in bytes and
pixels and decoded with the same checks as extraction; a bad one gets a 4xx with a reason.

    GET  /                      gallery page (drop, pick or paste an image; click to re-query)
    GET  /map                   interactive embedding map (t-SNE), coloured by label
    GET  /issues                the latest audit's suspect images
    GET  /api/docs              the API reference (rendered here from the OpenAPI schema)
    GET  /api/info              store summary: rows, classes, splits, backbone, index
    POST /api/search            body: the image bytes
    GET  /api/search/id/{id}    neighbours of a stored row
    GET  /api/search/path       ?path= a path that is a row of the store (absolute, or
                                relative to the source root)
    POST /api/query             JSON: like / unlike examples (ids, paths, vectors, images)
    POST /api/query/batch       JSON: several queries, one result list each
    (every search takes k, offset, label, split, ids and path_prefix; one answer shape:
     {"query": {...}, "hits": [...]}, extractors/search/query.py)
    GET  /api/row/{id}          the row's Parquet metadata (no vector) and where it lives
    GET  /api/image/{id}        the row's image file;  /api/thumb/{id}?size=  a JPEG thumbnail
    GET  /api/map               the map's points (computed once per store commit)
    GET  /api/health            {"ok": true}, answered on the event loop, never queued

What one request may cost is bounded where it arrives: a body over its route's limit (made from
the `MAX_*` below and the store's dimension: `Limits`) is refused, 413, before any of it is
parsed, by its Content-Length or, for a chunked body, as the bytes arrive; a JSON body with
more values than a legitimate query can hold is refused before it is parsed too. Then a
request may ask for at most MAX_BATCH queries, MAX_REQUEST_IMAGES images, MAX_EXAMPLES
examples and MAX_IDS filter ids, all of its queries together; its images are decoded, then
embedded in batches (one forward per batch). Everything slow runs in worker threads, never on
the event loop: a query's JSON is parsed and checked there too (on the loop only `BodyLimit`
counts its bytes and values). Images are embedded HEAVY_AT_ONCE requests at a time; the map is
computed by one request at a time in a place of its own, so uploads and image queries never wait
for it, and once computed it is answered at once; a cached thumbnail waits for no decoding one.

The store as it is now: every request checks manifest.json (one stat); after a commit
(`headstart embed`, `dedup --fix-splits --apply`) the service opens the new commit's files,
checks they belong together (`extractors.search.query.commit_searcher`) and swaps to them between
requests: a request keeps the snapshot it started with, and rows, index, stored vectors and
map always come from one commit. A commit that does not open whole is logged once (logger
`headstart`) and tried again later and later (SWAP_RETRY_S, doubled each time up to
SWAP_RETRY_MAX_S); meanwhile the service answers from the commit it has.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import io
import json
import logging
import mimetypes
import os
import secrets
import stat
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, BinaryIO
from urllib.parse import quote, urlsplit

import anyio
import numpy as np
import pyarrow.parquet as pq
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as FPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from extractors import DEFAULT_WORKSPACE
from extractors.common import FILE_TIMEOUT_S as DECODE_TIMEOUT_S  # as extraction's
from extractors.embedding.images import FORMATS, ImageError, open_rgb
from extractors.search.query import (
    MAX_EXAMPLES,
    MAX_IDS,
    MAX_RESULTS,
    Example,
    Filters,
    NotFound,
    QueryError,
    Searcher,
    commit_searcher,
    embed_batches,
    hit,
    parse_vector,
    row_id,
    searcher_for,
    stamp,
)
from extractors.search.query import Query as Search
from extractors.settings import EmbedSettings
from extractors.store.layout import (
    AUDIT,
    AUDIT_ISSUES,
    AUDIT_SUMMARY,
    EMBEDDINGS,
    MANIFEST,
    os_path,
)
from extractors.store.store import Store, StoreError

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOAD_PIXELS = 40_000_000
MAX_K = 100
DECODING = 2  # uploads decoded at once
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
TOKEN_COOKIE = "headstart_token"
WEB = Path(__file__).parent
META = ["id", "path", "sha256", "label", "split", "width", "height", "bytes", "mtime_ns"]

# What one request may ask for, declared once: the body limits (`Limits`) and the checks
# of a query (`_check_work`) are made from these.
MAX_BATCH = 16  # queries of one batch
MAX_REQUEST_IMAGES = 16  # images one request embeds, all its queries together
MAX_REQUEST_IMAGE_BYTES = MAX_UPLOAD_BYTES  # the files of those images, together
MAX_TEXT_BYTES = 4096  # a path, label, split or path prefix
JSON_NUMBER_BYTES = 32  # a number as JSON text with its separator and indentation, at most
MAX_OTHER_BODY = 1024  # a request to any other route carries no real body
THUMB_DECODING = 4  # thumbnails decoded at once (a cached one waits for none of them)
THUMB_CACHE_BYTES = 32 * 2**20  # thumbnails kept
SWAP_RETRY_S = 1.0  # a new commit that did not open whole is tried again after this,
SWAP_RETRY_MAX_S = 60.0  # doubled after each failed try up to this
HEAVY_AT_ONCE = 2  # requests that embed images, running at once (the map has a place of its own)
log = logging.getLogger("headstart")


@dataclass(frozen=True)
class BodyRule:
    """A route's request body at most: `bytes`, and for JSON, `values` (commas and opening
    brackets: every array element and object member but the first of each costs a comma)."""

    bytes: int
    values: int | None = None


@dataclass(frozen=True)
class Limits:
    """Request-body limits by route, from what the largest legitimate request needs for a store
    of dimension `dim`: MAX_EXAMPLES examples (each a path, or a vector as JSON numbers or
    base64), MAX_IDS filter ids, MAX_BATCH queries and MAX_REQUEST_IMAGE_BYTES of images."""

    dim: int

    @property
    def query(self) -> BodyRule:
        def b64(n: int) -> int:
            return 4 * (n + 2) // 3

        example = 128 + max(6 * MAX_TEXT_BYTES, self.dim * JSON_NUMBER_BYTES, b64(4 * self.dim))
        per_query = 1024 + 3 * 6 * MAX_TEXT_BYTES
        size = (
            MAX_EXAMPLES * example
            + MAX_IDS * JSON_NUMBER_BYTES
            + MAX_BATCH * per_query
            + b64(MAX_REQUEST_IMAGE_BYTES)
        )
        values = MAX_EXAMPLES * (self.dim + 16) + MAX_IDS + MAX_BATCH * 64
        return BodyRule(size, values)

    def rule(self, method: str, path: str) -> BodyRule:
        if method == "POST" and path in ("/api/query", "/api/query/batch"):
            return self.query
        if method == "POST" and path == "/api/search":
            return BodyRule(MAX_UPLOAD_BYTES)
        return BodyRule(MAX_OTHER_BODY)

    def record(self) -> dict[str, int]:
        return {
            "max_upload_bytes": MAX_UPLOAD_BYTES,
            "max_pixels": MAX_UPLOAD_PIXELS,
            "max_query_body_bytes": self.query.bytes,
            "max_batch": MAX_BATCH,
            "max_images": MAX_REQUEST_IMAGES,
            "max_image_bytes": MAX_REQUEST_IMAGE_BYTES,
            "max_examples": MAX_EXAMPLES,
            "max_ids": MAX_IDS,
            "max_k": MAX_K,
        }


RowId = Annotated[
    str, FPath(description="a row id (`id` of a hit)", examples=["7383510266719186681"])
]


@dataclass(frozen=True)
class Page:
    """Which ranks of the results: `k` of them from rank `offset` (0 = the best)."""

    k: int = 12
    offset: int = 0


def paging(
    k: Annotated[int, Query(ge=1, le=MAX_K, description="results per page", examples=[12])] = 12,
    offset: Annotated[
        int,
        Query(ge=0, le=MAX_RESULTS - 1, description="rank of the first result", examples=[0]),
    ] = 0,
) -> Page:
    """The page of a GET or upload query, from its query string."""
    return Page(k, offset)


def filters(
    label: Annotated[
        str | None, Query(description="only rows with this label", examples=["cat"])
    ] = None,
    split: Annotated[
        str | None, Query(description="only rows of this split", examples=["test"])
    ] = None,
    ids: Annotated[
        str | None,
        Query(description="only these rows: ids, comma-separated", examples=["123,456"]),
    ] = None,
    path_prefix: Annotated[
        str | None,
        Query(
            description="only rows whose path starts with this (absolute, or relative to the "
            "source root)",
            examples=["cat/"],
        ),
    ] = None,
) -> Filters:
    """The filters of a GET or upload query, from its query string."""
    id_list = None
    if ids is not None:
        given = [i for i in ids.split(",") if i.strip()]
        if len(given) > MAX_IDS:
            raise HTTPException(400, f"ids takes at most {MAX_IDS:,} row ids")
        id_list = tuple(_row_id(i, 400) for i in given)
    return Filters(label, split, id_list, path_prefix)


class ExampleIn(BaseModel):
    """One example of a query: exactly one of its fields."""

    model_config = ConfigDict(extra="forbid")

    id: str | int | None = Field(
        None, description="a row id (a string: JSON numbers lose precision)", examples=["123"]
    )
    path: str | None = Field(
        None, description="a path that is a row of the store", examples=["cat/chelsea.png"]
    )
    vector: list[float] | None = Field(
        None, description="a vector of the store's dimension", examples=[[0.1, 0.0, 0.3]]
    )
    vector_b64: str | None = Field(
        None, description="base64 of the vector as little-endian float32", examples=["AACAPw=="]
    )
    image_b64: str | None = Field(
        None, description="base64 of an image file (JPEG, PNG, WebP...)", examples=["iVBORw0..."]
    )

    def example(self, snap: Snapshot) -> Example:
        given = [k for k, v in self.__dict__.items() if v is not None]
        if len(given) != 1:
            raise QueryError(
                "each example takes exactly one of id, path, vector, vector_b64, image_b64 "
                f"(this one has {', '.join(given) or 'none'})"
            )
        dim = snap.manifest["dim"]
        if self.id is not None:
            return Example(id=_row_id(self.id, 400))
        if self.path is not None:
            return Example(id=snap.rows.by_path(self.path))
        if self.vector is not None or self.vector_b64 is not None:
            value = self.vector if self.vector is not None else self.vector_b64
            return Example(vector=parse_vector(value, dim))
        try:
            data = base64.b64decode(self.image_b64 or "", validate=True)
        except (binascii.Error, ValueError):
            raise QueryError("image_b64 is not valid base64") from None
        return Example(image=data, name="upload")


class QueryBody(BaseModel):
    """A query: more like `like`, less like `unlike`, `k` results from rank `offset`, among the
    rows that pass every filter given."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"like": [{"id": "123"}, {"path": "cat/chelsea.png"}], "unlike": [{"id": "456"}],
                 "k": 12, "offset": 0, "split": "test"}
            ]
        },
    )  # fmt: skip

    like: list[ExampleIn] = Field(min_length=1, max_length=MAX_EXAMPLES)
    unlike: list[ExampleIn] = Field(default_factory=list, max_length=MAX_EXAMPLES)
    k: int = Field(12, ge=1, le=MAX_K, description="results per page")
    offset: int = Field(0, ge=0, le=MAX_RESULTS - 1, description="rank of the first result")
    label: str | None = Field(None, description="only rows with this label", examples=["cat"])
    split: str | None = Field(None, description="only rows of this split", examples=["test"])
    ids: list[str | int] | None = Field(
        None, max_length=MAX_IDS, description="only these rows", examples=[["123", "456"]]
    )
    path_prefix: str | None = Field(
        None, description="only rows whose path starts with this", examples=["cat/"]
    )

    def to_query(self, snap: Snapshot) -> Search:
        ids = None if self.ids is None else tuple(_row_id(i, 400) for i in self.ids)
        return Search(
            [e.example(snap) for e in self.like],
            [e.example(snap) for e in self.unlike],
            k=self.k,
            offset=self.offset,
            filters=Filters(self.label, self.split, ids, self.path_prefix),
        )


class BatchBody(BaseModel):
    """Several queries, answered in order."""

    model_config = ConfigDict(extra="forbid")

    queries: list[QueryBody] = Field(min_length=1, max_length=MAX_BATCH)


def _check_work(queries: Sequence[QueryBody]) -> int:
    """What one request asks for, all its queries together, within the MAX_REQUEST_* limits;
    else 413 saying which, before any image is decoded. Returns the images to embed."""
    examples = [e for q in queries for e in (*q.like, *q.unlike)]
    images = [e.image_b64 for e in examples if e.image_b64 is not None]
    ids = sum(len(q.ids or ()) for q in queries)
    if len(examples) > MAX_EXAMPLES:
        raise HTTPException(
            413, f"a request takes at most {MAX_EXAMPLES} examples in all its queries, "
            f"not {len(examples)}; split it into several requests",
        )  # fmt: skip
    if len(images) > MAX_REQUEST_IMAGES:
        raise HTTPException(
            413, f"a request embeds at most {MAX_REQUEST_IMAGES} images in all its queries, "
            f"not {len(images)}; split it into several requests",
        )  # fmt: skip
    if sum(len(i) for i in images) * 3 // 4 > MAX_REQUEST_IMAGE_BYTES:
        raise HTTPException(
            413, f"the images of a request are at most {MAX_REQUEST_IMAGE_BYTES // 2**20} MB "
            "together; split it into several requests",
        )  # fmt: skip
    if ids > MAX_IDS:
        raise HTTPException(
            413, f"a request's id filters take at most {MAX_IDS:,} ids together, not {ids:,}"
        )
    return len(images)


@dataclass
class Snapshot:
    """One commit of the store, as the service answers from it: its manifest, rows, index and
    stored vectors (`extractors.search.query.commit_searcher`: opened together), and its map."""

    manifest: dict[str, Any]
    searcher: Searcher
    stamp: tuple[int, int, int] | None  # manifest.json's when it was opened
    _map: bytes | None = None  # the map as JSON, once computed
    _map_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def rows(self):  # extractors.search.query.Rows
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
    ):
        self.store, self.workspace, self.mlflow_url = store, Path(workspace), mlflow_url
        self.batch_size = batch_size or EmbedSettings().batch_size
        if not (store.path / EMBEDDINGS).exists():
            raise StoreError(f"store {store.path} holds no images yet; run `headstart embed`")
        seen = stamp(store.path / MANIFEST)
        manifest = store.manifest()
        self._snap = Snapshot(manifest, searcher_for(store, self.embed_images), seen)
        self.limits = Limits(manifest["dim"])
        _trim()  # the opening checks' temporaries, back to the system
        self._backbone = None
        self._lock = threading.Lock()  # loading the backbone
        self._model_lock = threading.Lock()  # one forward at a time
        self._swap_lock = threading.Lock()
        self._retry_at = 0.0  # after a commit that could not be opened whole
        self._retry_s = SWAP_RETRY_S  # the wait before the next try, doubled after each
        self._failed: tuple[int, int, int] | None = None  # the manifest stamp that failed
        self._cache_lock = threading.Lock()
        self._decoding = threading.BoundedSemaphore(DECODING)
        self._thumbs: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._thumb_bytes = 0

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
                _trim()
            return self._snap
        finally:
            self._swap_lock.release()

    # --- queries -------------------------------------------------------------------------
    def backbone(self):
        with self._lock:
            if self._backbone is None:
                from extractors.workspace import backbone_for

                bb = backbone_for(self._snap.manifest["backbone"], self.workspace, device="cpu")
                if bb.weights != self._snap.manifest["weights"]:
                    raise HTTPException(500, f"backbone weights {bb.weights} differ from store")
                self._backbone = bb
            return self._backbone

    def decode_upload(self, data: bytes, side: int | None) -> Image.Image:
        """An uploaded image, checked (bytes, format, pixels) and decoded as extraction
        decodes (reduced scale where that loses nothing: `side`); else a 4xx saying why."""
        if not data:
            raise HTTPException(400, "empty upload: send the image file's bytes as the body")
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"upload over {MAX_UPLOAD_BYTES // 2**20} MB")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                    w, h = img.size
        except (
            UnidentifiedImageError,
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ):
            raise HTTPException(
                415, "not an image this service can read (JPEG, PNG, GIF, WebP, TIFF, BMP...)"
            ) from None
        except Exception as exc:  # any decoder's failure is the upload's fault, not ours
            raise HTTPException(400, f"corrupt image data: {exc}") from None
        if w * h > MAX_UPLOAD_PIXELS:
            raise HTTPException(
                413, f"image of {w}x{h} pixels is over the {MAX_UPLOAD_PIXELS:,}-pixel limit"
            )
        # At most DECODING uploads decode at once (each bounded by MAX_UPLOAD_PIXELS), each
        # within extraction's time limit; a slow one is answered 408 and keeps its slot
        # until its decoder returns, so memory stays bounded.
        if not self._decoding.acquire(timeout=DECODE_TIMEOUT_S):
            raise HTTPException(503, "too many uploads are decoding; try again shortly")
        pool = ThreadPoolExecutor(max_workers=1)
        future = pool.submit(open_rgb, io.BytesIO(data), side)
        future.add_done_callback(lambda _: self._decoding.release())
        pool.shutdown(wait=False)
        try:
            return future.result(timeout=DECODE_TIMEOUT_S)[0]
        except FutureTimeout:
            raise HTTPException(408, f"decoding took over {DECODE_TIMEOUT_S:.0f} s") from None
        except ImageError as exc:
            raise HTTPException(400, f"cannot decode the image: {exc}") from None

    def embed_images(self, images: Sequence[bytes | str | Path]) -> np.ndarray:
        """Uploaded images as vectors: all decoded (checked, as `decode_upload`), then run
        through the backbone `batch_size` at a time, one forward per batch."""
        if any(not isinstance(i, bytes) for i in images):
            raise QueryError("this service embeds uploaded images only, not paths")
        if len(images) > MAX_REQUEST_IMAGES:
            raise HTTPException(413, f"a request embeds at most {MAX_REQUEST_IMAGES} images")
        bb = self.backbone()
        decoded = [self.decode_upload(data, bb.decode_side) for data in images]  # type: ignore[arg-type]
        with self._model_lock:
            return embed_batches(bb, decoded, self.batch_size)

    def query(self, snap: Snapshot, queries: Sequence[Search]) -> list[dict[str, Any]]:
        """Queries (extractors/search/query.py) over one snapshot, filtered inside FAISS: a filter
        costs about what no filter does; a label or split the store does not have is refused
        (400). The images of all of them are embedded together, in batches."""
        return snap.searcher.run_many(queries)

    def row(self, snap: Snapshot, row_id: int) -> dict[str, Any]:
        r = snap.searcher.vector_of.read(row_id, META).to_pylist()[0]  # NotFound: 404
        out = {**r, "id": str(r["id"]), "row_number": snap.rows.parquet_row(row_id)}
        out["parquet"] = str(self.store.path / EMBEDDINGS)
        out["store"] = str(self.store.path)
        if self.mlflow_url:
            out["mlflow"] = f"{self.mlflow_url.rstrip('/')}/#/experiments"
        return out

    def open_file(self, snap: Snapshot, row_id: int) -> tuple[BinaryIO, str]:
        """The row's file and path, opened only if it is still the file that was embedded: the
        same path, not a symbolic link now (opened with O_NOFOLLOW, so a link swapped in after
        a check is not followed either), a regular file of the recorded size and mtime. Else
        404 (gone, or no longer a row) or 410 (replaced), with the reason."""
        row = snap.rows.get(row_id)  # NotFound: 404
        path = row["path"]
        try:
            fd = os.open(os_path(path), os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise HTTPException(404, f"the image of row {row_id} is no longer at {path}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise HTTPException(
                    410, f"{path} is a symbolic link now, not the file that was embedded"
                ) from None
            raise HTTPException(404, f"cannot open {path}: {exc.strerror}") from None
        fh = os.fdopen(fd, "rb")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (
            row["bytes"],
            row["mtime_ns"],
        ):
            fh.close()
            raise HTTPException(
                410,
                f"{path} changed since it was embedded (size or modification time); "
                "`headstart embed` the source again to serve it",
            )
        return fh, path

    def cached_thumb(self, snap: Snapshot, row_id: int, size: int) -> bytes | None:
        """The row's thumbnail if it is in the cache, else None; only for rows of `snap` (a
        lookup: no file is read, so it is answered without waiting for a decoding place)."""
        if row_id not in snap.rows:
            raise NotFound(f"no row with id {row_id} in this store")
        with self._cache_lock:
            data = self._thumbs.get((row_id, size))
            if data is not None:
                self._thumbs.move_to_end((row_id, size))
            return data

    def thumb(self, snap: Snapshot, row_id: int, size: int) -> bytes:
        """A JPEG of the row's image within `size` pixels, cached (THUMB_CACHE_BYTES in all);
        only for rows of `snap`. The app runs at most THUMB_DECODING of these at once."""
        key = (row_id, size)
        cached = self.cached_thumb(snap, row_id, size)
        if cached is not None:
            return cached
        try:
            fh, _ = self.open_file(snap, row_id)
            with fh:
                img = open_rgb(fh, min_side=size)[0]
            img = ImageOps.contain(img, (size, size))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
        except ImageError as exc:
            raise HTTPException(404, f"cannot read the image of row {row_id}: {exc}") from None
        data = buf.getvalue()
        with self._cache_lock:
            if key not in self._thumbs:
                self._thumbs[key] = data
                self._thumb_bytes += len(data)
            while self._thumb_bytes > THUMB_CACHE_BYTES:
                self._thumb_bytes -= len(self._thumbs.popitem(last=False)[1])
        return data

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


def _chunks(fh: BinaryIO, size: int = 1 << 20):
    with fh:
        while block := fh.read(size):
            yield block


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def _row_id(text: str | int, status: int = 404) -> int:
    """A row id from a request (0 to 2**63 - 1), else `status` with the reason: 404 for an
    address (no such row), 400 for a query's field."""
    try:
        return row_id(text)
    except QueryError:
        raise HTTPException(
            status, f"{text!r} is not a row id (a whole number from 0 to 2**63 - 1)"
        ) from None


class BodyLimit:
    """ASGI middleware: a request body within its route's `BodyRule` (`Limits.rule`), or 413
    before any of it is parsed: refused by its Content-Length, or, sent without one (chunked),
    as soon as the bytes read pass the limit; a JSON body with more values than the rule's is
    refused before it is parsed as well. A body within its limit is read here and handed on
    whole (so it is in memory once, bounded by the limit)."""

    def __init__(self, app: Any, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rule = self.limits.rule(scope["method"], scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > rule.bytes):
            return await self._refuse(scope, receive, send, rule)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > rule.bytes:
                return await self._refuse(scope, receive, send, rule)
        if rule.values is not None:
            values = body.count(b",") + body.count(b"[") + body.count(b"{")
            if values > rule.values:
                detail = (
                    f"a query body holds at most {rule.values:,} JSON values (numbers, ids, "
                    f"examples), not {values:,}"
                )
                return await JSONResponse({"detail": detail}, 413)(scope, receive, send)
        handed = False

        async def replay() -> dict:
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # the disconnect, for a streaming response

        return await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: dict, receive: Any, send: Any, rule: BodyRule) -> None:
        mb = rule.bytes / 2**20
        size = f"{mb:.{0 if mb.is_integer() else 1}f} MB" if mb >= 1 else f"{rule.bytes} bytes"
        detail = f"request body over {size} (the limit of {scope['method']} {scope['path']})"
        response = JSONResponse({"detail": detail}, 413, headers={"connection": "close"})
        await response(scope, receive, send)


def host_name(host_header: str) -> str:
    """The name part of a Host header: `127.0.0.1:8765` -> 127.0.0.1, `[::1]:80` -> ::1."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def is_loopback(host: str) -> bool:
    return host_name(host) in LOOPBACK


def create_app(
    store: str | Path,
    workspace: str | Path = DEFAULT_WORKSPACE,
    mlflow_url: str | None = None,
    hosts: tuple[str, ...] = LOOPBACK,
    token: str | None = None,
    batch_size: int | None = None,
) -> FastAPI:
    """The FastAPI app over `store` (read-only: the index is memory-mapped).

    Who may ask: requests whose Host is one of `hosts` (loopback names by default: a page
    that re-points its own domain to 127.0.0.1, DNS rebinding, is refused), no POST from
    another origin, and, with `token` (required off loopback), only requests that carry it:
    `?token=` once (it is then kept in an HttpOnly, SameSite=Strict cookie), the cookie, or
    `Authorization: Bearer <token>`. Uploaded images run through the backbone `batch_size`
    at a time (default: extraction's, `EmbedSettings.batch_size`)."""
    svc = SearchService(Store(store), workspace, mlflow_url, batch_size)
    app = FastAPI(
        title="headstart search",
        docs_url=None,  # Swagger UI loads from a CDN; /api/docs below needs nothing
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.service = svc
    app.add_middleware(BodyLimit, limits=svc.limits)  # inside `guard`: who may ask, first
    # Slow work waits for its own places, so however many arrive, the pool's threads stay free
    # for quick requests (a search by id, a row, an image).
    heavy = anyio.CapacityLimiter(HEAVY_AT_ONCE)  # embedding images
    mapping = anyio.CapacityLimiter(1)  # computing a map: its own place, not one of `heavy`
    thumbs = anyio.CapacityLimiter(THUMB_DECODING)  # decoding thumbnails (cached ones: none)
    allowed = {host_name(h) for h in hosts}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = request.headers.get("host", "")
        if token is None and host_name(host) not in allowed:
            return JSONResponse(
                {
                    "detail": f"host {host_name(host)!r} is not served here; use "
                    f"{', '.join(sorted(allowed))}, or start `headstart ui` with --allow-host"
                },
                403,
            )
        origin = request.headers.get("origin")
        if request.method not in SAFE_METHODS and origin and urlsplit(origin).netloc != host:
            return JSONResponse({"detail": f"cross-origin {request.method} refused"}, 403)
        from_query = False
        if token is not None:
            given = request.cookies.get(TOKEN_COOKIE) or _bearer(request)
            if not given and request.query_params.get("token"):
                given, from_query = request.query_params["token"], True
            if not (given and secrets.compare_digest(given, token)):
                return JSONResponse(
                    {
                        "detail": "this service needs its token: open the address `headstart "
                        "ui` printed (…/?token=…), or send Authorization: Bearer <token>"
                    },
                    401,
                )
        response = await call_next(request)
        if from_query:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse((WEB / "index.html").read_text())

    @app.get("/map", response_class=HTMLResponse)
    def map_page() -> HTMLResponse:
        return HTMLResponse((WEB / "map.html").read_text())

    @app.get("/api/docs", response_class=HTMLResponse, include_in_schema=False)
    def api_docs() -> HTMLResponse:
        from flows.web.api_docs import render

        return HTMLResponse(render(app.openapi()))

    @app.get("/issues", response_class=HTMLResponse)
    def issues_page() -> HTMLResponse:
        return HTMLResponse((WEB / "issues.html").read_text())

    @app.get("/api/issues")
    def issues(
        issue: Annotated[
            str | None,
            Query(
                description="label, outlier or near_duplicate (default: all)", examples=["label"]
            ),
        ] = None,
        limit: Annotated[
            int, Query(ge=1, le=1000, description="findings at most", examples=[200])
        ] = 200,
    ) -> dict[str, Any]:
        """The latest audit's suspect images (`headstart audit`)."""
        return svc.issues(svc.snapshot(), issue, limit)

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return svc.info(svc.snapshot())

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        """Whether the service answers (on the event loop: slow requests run in threads)."""
        return {"ok": True}

    @app.exception_handler(QueryError)
    async def bad_query(request: Request, exc: QueryError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 404 if isinstance(exc, NotFound) else 400)

    @app.post("/api/search")
    async def search_upload(
        request: Request,
        page: Annotated[Page, Depends(paging)],
        where: Annotated[Filters, Depends(filters)],
    ) -> dict[str, Any]:
        """Rows most like the uploaded image (the request body: the image file's bytes)."""
        data = await request.body()  # within MAX_UPLOAD_BYTES: `BodyLimit`
        q = Search(
            [Example(image=data, name="upload")], k=page.k, offset=page.offset, filters=where
        )
        return (await _in_thread(lambda: svc.query(svc.snapshot(), [q]), limiter=heavy))[0]

    @app.get("/api/search/id/{row_id}")
    def search_id(
        row_id: RowId,
        page: Annotated[Page, Depends(paging)],
        where: Annotated[Filters, Depends(filters)],
    ) -> dict[str, Any]:
        """Rows most like a stored row (itself left out)."""
        q = Search([Example(id=_row_id(row_id))], k=page.k, offset=page.offset, filters=where)
        return svc.query(svc.snapshot(), [q])[0]

    @app.get("/api/search/path")
    def search_path(
        path: Annotated[
            str,
            Query(
                description="a path that is a row of the store: absolute, or relative to the "
                "source root",
                examples=["cat/chelsea.png"],
            ),
        ],
        page: Annotated[Page, Depends(paging)],
        where: Annotated[Filters, Depends(filters)],
    ) -> dict[str, Any]:
        """Rows most like the stored row of a path (itself left out)."""
        snap = svc.snapshot()
        ex = Example(id=snap.rows.by_path(path))
        return svc.query(snap, [Search([ex], k=page.k, offset=page.offset, filters=where)])[0]

    @app.post("/api/query", openapi_extra=_json_body(QueryBody))
    async def query(request: Request) -> dict[str, Any]:
        """The general query: by row ids, paths, vectors (a list, or base64 float32) and images
        (base64), more like `like` and less like `unlike`, filtered and paged."""
        body = await _in_thread(_parse, QueryBody, await request.body())

        def run() -> dict[str, Any]:
            snap = svc.snapshot()
            return svc.query(snap, [body.to_query(snap)])[0]

        return await _in_thread(run, limiter=heavy if _check_work([body]) else None)

    @app.post("/api/query/batch", openapi_extra=_json_body(BatchBody))
    async def query_batch(request: Request) -> dict[str, Any]:
        """Several queries at once (say, several images): one result list each, in order; at
        most MAX_BATCH queries and MAX_REQUEST_IMAGES images in all, embedded in batches."""
        body = await _in_thread(_parse, BatchBody, await request.body())

        def run() -> dict[str, Any]:
            snap = svc.snapshot()
            return {"results": svc.query(snap, [b.to_query(snap) for b in body.queries])}

        return await _in_thread(run, limiter=heavy if _check_work(body.queries) else None)

    @app.get("/api/row/{row_id}")
    def row(row_id: RowId) -> dict[str, Any]:
        return svc.row(svc.snapshot(), _row_id(row_id))

    @app.get("/api/image/{row_id}")
    def image(row_id: RowId) -> StreamingResponse:
        # Streamed from the verified open file, never by path; no Range support (so none of
        # Starlette's FileResponse Range parsing, CVE-2025-62727, is reachable).
        fh, path = svc.open_file(svc.snapshot(), _row_id(row_id))
        name = Path(path).name
        kind = mimetypes.guess_type(name)[0]
        return StreamingResponse(
            _chunks(fh),
            media_type=kind or "application/octet-stream",
            headers={
                "Content-Length": str(os.fstat(fh.fileno()).st_size),
                "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @app.get("/api/thumb/{row_id}")
    async def thumb(
        row_id: RowId,
        size: Annotated[
            int, Query(ge=16, le=512, description="longest side in pixels", examples=[160])
        ] = 160,
    ) -> Response:
        rid = _row_id(row_id)
        snap = await _in_thread(svc.snapshot)
        data = svc.cached_thumb(snap, rid, size)  # a lookup, on the loop
        if data is None:
            data = await _in_thread(svc.thumb, snap, rid, size, limiter=thumbs)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/map", response_class=JSONResponse)
    async def embedding_map() -> Response:
        """The map's points, of the commit the searches answer from (computed once each)."""
        snap = await _in_thread(svc.snapshot)
        data = snap.computed_map
        if data is None:  # one computes it, the others wait here, holding no thread
            data = await _in_thread(snap.embedding_map, svc.store, limiter=mapping)
        return Response(data, media_type="application/json")

    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with the JSON bodies parsed in threads (`_parse`) added."""
        if app.openapi_schema is None:
            spec = plain_openapi()
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in (QueryBody, BatchBody):
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI of a JSON body a route reads itself (`_parse`): the model's schema."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    """A JSON body as `model`, parsed and checked here (in a worker thread, not on the event
    loop); else 422 in FastAPI's own shape (`detail`: errors, each `loc` from "body")."""
    if not raw.strip():
        errors = [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        raise RequestValidationError(errors)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = []
        for e in exc.errors(include_url=False):
            e = {**e, "loc": ("body", *e["loc"])}
            if e["type"] == "json_invalid":  # not the body back: it may be megabytes
                e = {**e, "msg": "JSON decode error", "input": {}}
            errors.append(e)
        raise RequestValidationError(errors) from None


def _trim() -> None:
    """Hand memory freed on the heap back to the system (glibc keeps it otherwise)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _NoPandas:
    """An import hook that says pandas is not installed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError("pandas is left out of the search service", name=name)


def without_pandas() -> None:
    """Keep pyarrow from importing pandas in this process (`headstart ui` calls it first).

    pyarrow imports pandas the first time it builds any array, if it can: 48 MB of private
    memory in every search process, which never uses it. pyarrow looks once and remembers:
    told then that pandas is missing, it takes its pandas-free paths from then on (nothing
    else is kept from importing pandas: the hook is gone once pyarrow has looked)."""
    import sys

    import pyarrow as pa

    if "pandas" in sys.modules:
        return
    hook = _NoPandas()
    sys.meta_path.insert(0, hook)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(hook)


async def _in_thread(fn, *args, limiter: anyio.CapacityLimiter | None = None):
    """`fn(*args)` in a worker thread; with `limiter`, waiting for one of its places first (on
    the event loop, holding no thread of the pool the quick requests use)."""
    return await anyio.to_thread.run_sync(lambda: fn(*args), limiter=limiter)
