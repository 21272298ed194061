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
     {"query": {...}, "hits": [...]}, extractors/query.py)
    GET  /api/row/{id}          the row's Parquet metadata (no vector) and where it lives
    GET  /api/image/{id}        the row's image file;  /api/thumb/{id}?size=  a JPEG thumbnail
    GET  /api/map               the map's points (computed once per process)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import io
import json
import mimetypes
import os
import secrets
import stat
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO
from urllib.parse import quote, urlsplit

import numpy as np
import pyarrow.parquet as pq
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as FPath
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from extractors import DEFAULT_WORKSPACE
from extractors.common import FILE_TIMEOUT_S as DECODE_TIMEOUT_S  # as extraction's
from extractors.images import FORMATS, ImageError, open_rgb
from extractors.layout import AUDIT, AUDIT_ISSUES, AUDIT_SUMMARY, EMBEDDINGS
from extractors.query import (
    MAX_EXAMPLES,
    MAX_RESULTS,
    Example,
    Filters,
    NotFound,
    QueryError,
    hit,
    parse_vector,
    searcher_for,
)
from extractors.query import Query as Search
from extractors.store import Store, StoreError

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOAD_PIXELS = 40_000_000
MAX_K = 100
DECODING = 2  # uploads decoded at once
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
TOKEN_COOKIE = "headstart_token"
WEB = Path(__file__).parent / "web"
META = ["id", "path", "sha256", "label", "split", "width", "height", "bytes", "mtime_ns"]

MAX_QUERY_BYTES = 64 * 2**20  # a JSON query (base64 images included)
MAX_BATCH = 16  # queries of one batch


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
    id_list = None if ids is None else tuple(_row_id(i, 400) for i in ids.split(",") if i.strip())
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

    def example(self, svc: SearchService) -> Example:
        given = [k for k, v in self.__dict__.items() if v is not None]
        if len(given) != 1:
            raise QueryError(
                "each example takes exactly one of id, path, vector, vector_b64, image_b64 "
                f"(this one has {', '.join(given) or 'none'})"
            )
        dim = svc.manifest["dim"]
        if self.id is not None:
            return Example(id=_row_id(self.id, 400))
        if self.path is not None:
            return Example(id=svc.rows.by_path(self.path))
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
        None, description="only these rows", examples=[["123", "456"]]
    )
    path_prefix: str | None = Field(
        None, description="only rows whose path starts with this", examples=["cat/"]
    )

    def to_query(self, svc: SearchService) -> Search:
        ids = None if self.ids is None else tuple(_row_id(i, 400) for i in self.ids)
        return Search(
            [e.example(svc) for e in self.like],
            [e.example(svc) for e in self.unlike],
            k=self.k,
            offset=self.offset,
            filters=Filters(self.label, self.split, ids, self.path_prefix),
        )


class BatchBody(BaseModel):
    """Several queries, answered in order."""

    model_config = ConfigDict(extra="forbid")

    queries: list[QueryBody] = Field(min_length=1, max_length=MAX_BATCH)


class SearchService:
    """The store's index (memory-mapped), its row metadata, and the backbone (loaded lazily)."""

    def __init__(self, store: Store, workspace: str | Path, mlflow_url: str | None = None):
        self.store, self.workspace, self.mlflow_url = store, Path(workspace), mlflow_url
        self.manifest = store.manifest()
        if not (store.path / EMBEDDINGS).exists():
            raise StoreError(f"store {store.path} holds no images yet; run `headstart embed`")
        self.searcher = searcher_for(store, self.embed_image)
        self.ann, self.rows = self.searcher.index, self.searcher.rows
        _trim()  # the opening checks' temporaries, back to the system
        self._backbone = None
        self._lock = threading.Lock()
        self._decoding = threading.BoundedSemaphore(DECODING)
        self._map_lock = threading.Lock()
        self._thumbs: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._map: dict[str, Any] | None = None

    # --- queries -------------------------------------------------------------------------
    def backbone(self):
        with self._lock:
            if self._backbone is None:
                from flows.workspace import backbone_for

                bb = backbone_for(self.manifest["backbone"], self.workspace, device="cpu")
                if bb.weights != self.manifest["weights"]:
                    raise HTTPException(500, f"backbone weights {bb.weights} differ from store")
                self._backbone = bb
            return self._backbone

    def embed_upload(self, data: bytes) -> np.ndarray:
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
        bb = self.backbone()
        # At most DECODING uploads decode at once (each bounded by MAX_UPLOAD_PIXELS), each
        # within extraction's time limit; a slow one is answered 408 and keeps its slot
        # until its decoder returns, so memory stays bounded.
        if not self._decoding.acquire(timeout=DECODE_TIMEOUT_S):
            raise HTTPException(503, "too many uploads are decoding; try again shortly")
        pool = ThreadPoolExecutor(max_workers=1)
        future = pool.submit(open_rgb, io.BytesIO(data), bb.decode_side)
        future.add_done_callback(lambda _: self._decoding.release())
        pool.shutdown(wait=False)
        try:
            img = future.result(timeout=DECODE_TIMEOUT_S)[0]
        except FutureTimeout:
            raise HTTPException(408, f"decoding took over {DECODE_TIMEOUT_S:.0f} s") from None
        except ImageError as exc:
            raise HTTPException(400, f"cannot decode the image: {exc}") from None
        with self._lock:
            return bb.embed(bb.prepare(img)).numpy()

    def embed_image(self, image: bytes | str | Path) -> np.ndarray:
        if not isinstance(image, bytes):
            raise QueryError("this service embeds uploaded images only, not paths")
        return self.embed_upload(image)

    def query(self, q: Search) -> dict[str, Any]:
        """One query (extractors/query.py), filtered inside FAISS: a filter costs about what
        no filter does; a label or split the store does not have is refused (400)."""
        return self.searcher.run(q)

    def row(self, row_id: int) -> dict[str, Any]:
        r = self.searcher.vector_of.read(row_id, META).to_pylist()[0]  # NotFound: 404
        out = {**r, "id": str(r["id"]), "row_number": self.rows.parquet_row(row_id)}
        out["parquet"] = str(self.store.path / EMBEDDINGS)
        out["store"] = str(self.store.path)
        if self.mlflow_url:
            out["mlflow"] = f"{self.mlflow_url.rstrip('/')}/#/experiments"
        return out

    def open_file(self, row_id: int) -> BinaryIO:
        """The row's file, opened only if it is still the file that was embedded: the same
        path, not a symbolic link now (opened with O_NOFOLLOW, so a link swapped in after a
        check is not followed either), a regular file of the recorded size and mtime. Else
        404 (gone) or 410 (replaced), with the reason."""
        row = self.rows.get(row_id)  # NotFound: 404
        path = Path(row["path"])
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
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
        return fh

    def thumb(self, row_id: int, size: int) -> bytes:
        key = (row_id, size)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        try:
            with self.open_file(row_id) as fh:
                img = open_rgb(fh, min_side=size)[0]
        except ImageError as exc:
            raise HTTPException(404, f"cannot read the image of row {row_id}: {exc}") from None
        img = ImageOps.contain(img, (size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        with self._lock:
            self._thumbs[key] = buf.getvalue()
            while len(self._thumbs) > 2000:
                self._thumbs.popitem(last=False)
        return buf.getvalue()

    def issues(self, issue: str | None, limit: int) -> dict[str, Any]:
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
        for r in table[:limit]:
            if r["id"] not in self.rows:
                continue  # removed from the store since the audit
            card = hit(self.rows.get(r["id"]), r["score"])
            card |= {"issue": r["issue"], "suggested_label": r["suggested_label"]}
            try:
                related = self.rows.by_path(r["related"]) if r["related"] else None
            except NotFound:
                related = None
            card["related"] = None if related is None else hit(self.rows.get(related), 0.0)
            cards.append(card)
        stale = summary.get("fingerprint") != self.manifest["fingerprint"]
        return {"summary": summary, "stale": stale, "findings": cards}

    def info(self) -> dict[str, Any]:
        m = self.manifest
        entry = m.get("index") or {}
        return {
            "store": str(self.store.path),
            "source": m["source"],
            "backbone": m["backbone"],
            "rows": m["rows"],
            "classes": m.get("classes", []),
            "splits": m.get("splits", {}),
            "index": {
                "type": entry.get("type"),
                "reason": entry.get("choice", {}).get("reason"),
                "params": entry.get("tuning", {}).get("params"),
                "recall_at_10": entry.get("tuning", {}).get("recall"),
            },
            "limits": {"max_upload_bytes": MAX_UPLOAD_BYTES, "max_pixels": MAX_UPLOAD_PIXELS},
        }

    def embedding_map(self) -> dict[str, Any]:
        from flows.embedding_map import project

        with self._map_lock:
            if self._map is None:
                self._map = project(self.store)
                for p in self._map["points"]:
                    p["id"] = str(p["id"])
            return self._map


def _chunks(fh: BinaryIO, size: int = 1 << 20):
    with fh:
        while block := fh.read(size):
            yield block


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def _row_id(text: str | int, status: int = 404) -> int:
    try:
        return int(text)
    except ValueError:
        raise HTTPException(status, f"{text!r} is not a row id") from None


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
) -> FastAPI:
    """The FastAPI app over `store` (read-only: the index is memory-mapped).

    Who may ask: requests whose Host is one of `hosts` (loopback names by default: a page
    that re-points its own domain to 127.0.0.1, DNS rebinding, is refused), no POST from
    another origin, and, with `token` (required off loopback), only requests that carry it:
    `?token=` once (it is then kept in an HttpOnly, SameSite=Strict cookie), the cookie, or
    `Authorization: Bearer <token>`."""
    svc = SearchService(Store(store), workspace, mlflow_url)
    app = FastAPI(
        title="headstart search",
        docs_url=None,  # Swagger UI loads from a CDN; /api/docs below needs nothing
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.service = svc
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
        if request.method == "POST" and request.url.path.startswith("/api/query"):
            length = request.headers.get("content-length", "")
            if not length.isdigit():
                return JSONResponse({"detail": "send the query with a Content-Length"}, 411)
            if int(length) > MAX_QUERY_BYTES:
                limit = MAX_QUERY_BYTES // 2**20
                return JSONResponse({"detail": f"a query body is at most {limit} MB"}, 413)
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
        from flows.api_docs import render

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
        return svc.issues(issue, limit)

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return svc.info()

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
        data = await _body(request, MAX_UPLOAD_BYTES)
        q = Search(
            [Example(image=data, name="upload")], k=page.k, offset=page.offset, filters=where
        )
        return await _in_thread(svc.query, q)

    @app.get("/api/search/id/{row_id}")
    def search_id(
        row_id: RowId,
        page: Annotated[Page, Depends(paging)],
        where: Annotated[Filters, Depends(filters)],
    ) -> dict[str, Any]:
        """Rows most like a stored row (itself left out)."""
        q = Search([Example(id=_row_id(row_id))], k=page.k, offset=page.offset, filters=where)
        return svc.query(q)

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
        ex = Example(id=svc.rows.by_path(path))
        return svc.query(Search([ex], k=page.k, offset=page.offset, filters=where))

    @app.post("/api/query")
    async def query(request: Request, body: QueryBody) -> dict[str, Any]:
        """The general query: by row ids, paths, vectors (a list, or base64 float32) and images
        (base64), more like `like` and less like `unlike`, filtered and paged."""
        return await _in_thread(svc.query, body.to_query(svc))

    @app.post("/api/query/batch")
    async def query_batch(request: Request, body: BatchBody) -> dict[str, Any]:
        """Several queries at once (say, several images): one result list each, in order."""
        queries = [b.to_query(svc) for b in body.queries]
        return {"results": [await _in_thread(svc.query, q) for q in queries]}

    @app.get("/api/row/{row_id}")
    def row(row_id: RowId) -> dict[str, Any]:
        return svc.row(_row_id(row_id))

    @app.get("/api/image/{row_id}")
    def image(row_id: RowId) -> StreamingResponse:
        # Streamed from the verified open file, never by path; no Range support (so none of
        # Starlette's FileResponse Range parsing, CVE-2025-62727, is reachable).
        fh = svc.open_file(_row_id(row_id))
        name = Path(svc.rows.get(_row_id(row_id))["path"]).name
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
    def thumb(
        row_id: RowId,
        size: Annotated[
            int, Query(ge=16, le=512, description="longest side in pixels", examples=[160])
        ] = 160,
    ) -> Response:
        data = svc.thumb(_row_id(row_id), size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/map")
    def embedding_map() -> dict[str, Any]:
        return svc.embedding_map()

    return app


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


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is over `limit` bytes."""
    if int(request.headers.get("content-length") or 0) > limit:
        raise HTTPException(413, f"request body over {limit // 2**20} MB")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise HTTPException(413, f"request body over {limit // 2**20} MB")
    return bytes(data)


async def _in_thread(fn, *args):
    import anyio

    return await anyio.to_thread.run_sync(lambda: fn(*args))
