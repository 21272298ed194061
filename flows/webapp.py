"""Search service over one store: a JSON API and two pages (gallery, embedding map).

`headstart ui` serves it. Safe by construction: images and thumbnails are addressed by the
store's row `id`, never by a path, so only files that are rows of the store can be read;
search by path accepts only paths that are rows of the store. Uploads are capped in bytes and
pixels and decoded with the same checks as extraction; a bad one gets a 4xx with a reason.

    GET  /                      gallery page (drop, pick or paste an image; click to re-query)
    GET  /map                   interactive embedding map (t-SNE), coloured by label
    GET  /api/info              store summary: rows, classes, splits, backbone, index
    POST /api/search            body: the image bytes; ?k=&label=&split=
    GET  /api/search/id/{id}    neighbours of a stored row; ?k=&label=&split=
    GET  /api/search/path       ?path= a path that is a row of the store (absolute, or
                                relative to the source root)
    GET  /api/row/{id}          the row's Parquet metadata (no vector) and where it lives
    GET  /api/image/{id}        the row's image file;  /api/thumb/{id}?size=  a JPEG thumbnail
    GET  /api/map               the map's points (computed once per process)
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Annotated, Any, BinaryIO
from urllib.parse import quote, urlsplit

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image, ImageOps, UnidentifiedImageError

from extractors import DEFAULT_WORKSPACE
from extractors.embed import DECODE_TIMEOUT_S
from extractors.images import FORMATS, ImageError, open_rgb
from extractors.layout import AUDIT, AUDIT_ISSUES, AUDIT_SUMMARY, EMBEDDINGS, embedding_matrix
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

K = Annotated[int, Query(ge=1, le=MAX_K, description="number of neighbours")]
LabelQ = Annotated[str | None, Query(description="only rows with this label")]
SplitQ = Annotated[str | None, Query(description="only rows of this split")]


class SearchService:
    """The store's index (memory-mapped), its row metadata, and the backbone (loaded lazily)."""

    def __init__(self, store: Store, workspace: str | Path, mlflow_url: str | None = None):
        self.store, self.workspace, self.mlflow_url = store, Path(workspace), mlflow_url
        self.manifest = store.manifest()
        if not (store.path / EMBEDDINGS).exists():
            raise StoreError(f"store {store.path} holds no images yet; run `headstart embed`")
        self.ann = store.index(mmap=True)
        meta = store.table(META)
        self.rows = {r["id"]: r for r in meta.to_pylist()}
        self.by_path = {r["path"]: r["id"] for r in self.rows.values()}
        self.position = {i: n for n, i in enumerate(meta["id"].to_pylist())}
        all_ids = meta["id"].to_numpy()
        self.ids_of = {
            column: {
                value: all_ids[np.asarray(meta[column].to_pylist(), dtype=object) == value]
                for value in set(meta[column].to_pylist()) - {None}
            }
            for column in ("label", "split")
        }
        self._parquet = pq.ParquetFile(store.path / EMBEDDINGS)
        sizes = [
            self._parquet.metadata.row_group(i).num_rows
            for i in range(self._parquet.num_row_groups)
        ]
        self._group_starts = np.cumsum([0, *sizes])[:-1]
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

    def vector_of(self, row_id: int) -> np.ndarray:
        if row_id not in self.rows:
            raise HTTPException(404, f"no row with id {row_id} in this store")
        # Read just the row group that holds the row (ids are hashes: no statistics to prune).
        pos = self.position[row_id]
        group = int(np.searchsorted(self._group_starts, pos, side="right") - 1)
        table = self._parquet.read_row_group(group, columns=["id", "embedding"])
        return embedding_matrix(table.filter(pc.equal(table["id"], row_id)))

    def search(
        self,
        vector: np.ndarray,
        k: int,
        label: str | None = None,
        split: str | None = None,
        exclude: int | None = None,
    ) -> list[dict[str, Any]]:
        """Top-k rows, filtered by label/split inside FAISS (extractors.ann.AnnIndex.search):
        a filter costs about what no filter does. A label or split the store does not have
        is refused (400), never searched for."""
        allowed = None
        for column, value in (("label", label), ("split", split)):
            if value is None:
                continue
            known = self.ids_of[column]
            if value not in known:
                names = ", ".join(sorted(known)[:20]) or "none"
                raise HTTPException(400, f"no {column} {value!r} in this store; it has {names}")
            allowed = known[value] if allowed is None else np.intersect1d(allowed, known[value])
        scores, ids = self.ann.search(vector, k + (exclude is not None), allowed=allowed)
        hits = [
            self.hit(self.rows[int(i)], float(s))
            for s, i in zip(scores[0], ids[0], strict=True)
            if int(i) in self.rows and int(i) != exclude
        ]
        return hits[:k]

    def hit(self, row: dict[str, Any], score: float) -> dict[str, Any]:
        i = row["id"]
        return {
            "id": str(i),  # JSON numbers lose int64 precision in browsers
            "score": round(score, 5),
            "label": row["label"],
            "split": row["split"],
            "path": row["path"],
            "name": Path(row["path"]).name,
            "thumb": f"/api/thumb/{i}",
            "image": f"/api/image/{i}",
            "row": f"/api/row/{i}",
        }

    def row(self, row_id: int) -> dict[str, Any]:
        if row_id not in self.rows:
            raise HTTPException(404, f"no row with id {row_id} in this store")
        r = self.rows[row_id]
        out = {**r, "id": str(r["id"]), "row_number": self.position[row_id]}
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
        if row_id not in self.rows:
            raise HTTPException(404, f"no row with id {row_id} in this store")
        row = self.rows[row_id]
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

    def by_store_path(self, path: str) -> int:
        root = Path(self.manifest["source"]["root"])
        p = Path(path).expanduser()
        candidate = str((p if p.is_absolute() else root / p).resolve(strict=False))
        if candidate not in self.by_path:
            raise HTTPException(404, f"{path} is not an image of this store")
        return self.by_path[candidate]

    def issues(self, issue: str | None, limit: int) -> dict[str, Any]:
        """The store's latest audit (`headstart audit`): findings, most suspect first within
        each kind, as gallery cards with their related image; stale when the store changed."""
        path = self.store.path / AUDIT
        if not path.exists():
            return {"summary": None, "stale": False, "findings": []}
        summary = json.loads((self.store.path / AUDIT_SUMMARY).read_text())
        table = pq.read_table(path).to_pylist()
        if issue is not None:
            if issue not in AUDIT_ISSUES:
                raise HTTPException(400, f"issue takes {', '.join(AUDIT_ISSUES)}, not {issue!r}")
            table = [r for r in table if r["issue"] == issue]
        cards = []
        for r in table[:limit]:
            if r["id"] not in self.rows:
                continue  # removed from the store since the audit
            card = self.hit(self.rows[r["id"]], r["score"])
            card |= {"issue": r["issue"], "suggested_label": r["suggested_label"]}
            related = self.by_path.get(r["related"]) if r["related"] else None
            card["related"] = None if related is None else self.hit(self.rows[related], 0.0)
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


def _row_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise HTTPException(404, f"{text!r} is not a row id") from None


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
    app = FastAPI(title="headstart search", docs_url="/api/docs", openapi_url="/api/openapi.json")
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

    @app.get("/issues", response_class=HTMLResponse)
    def issues_page() -> HTMLResponse:
        return HTMLResponse((WEB / "issues.html").read_text())

    @app.get("/api/issues")
    def issues(
        issue: Annotated[
            str | None, Query(description="label, outlier or near_duplicate (default: all)")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="findings at most")] = 200,
    ) -> dict[str, Any]:
        """The latest audit's suspect images (`headstart audit`)."""
        return svc.issues(issue, limit)

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return svc.info()

    @app.post("/api/search")
    async def search_upload(
        request: Request, k: K = 12, label: LabelQ = None, split: SplitQ = None
    ) -> dict[str, Any]:
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"upload over {MAX_UPLOAD_BYTES // 2**20} MB")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_UPLOAD_BYTES:
                raise HTTPException(413, f"upload over {MAX_UPLOAD_BYTES // 2**20} MB")
        vector = await _in_thread(svc.embed_upload, bytes(data))
        return {"query": "upload", "hits": await _in_thread(svc.search, vector, k, label, split)}

    @app.get("/api/search/id/{row_id}")
    def search_id(row_id: str, k: K = 12, label: LabelQ = None, split: SplitQ = None):
        rid = _row_id(row_id)
        hits = svc.search(svc.vector_of(rid), k, label, split, exclude=rid)
        return {"query": svc.hit(svc.rows[rid], 1.0), "hits": hits}

    @app.get("/api/search/path")
    def search_path(path: str, k: K = 12, label: LabelQ = None, split: SplitQ = None):
        rid = svc.by_store_path(path)
        hits = svc.search(svc.vector_of(rid), k, label, split, exclude=rid)
        return {"query": svc.hit(svc.rows[rid], 1.0), "hits": hits}

    @app.get("/api/row/{row_id}")
    def row(row_id: str) -> dict[str, Any]:
        return svc.row(_row_id(row_id))

    @app.get("/api/image/{row_id}")
    def image(row_id: str) -> StreamingResponse:
        # Streamed from the verified open file, never by path; no Range support (so none of
        # Starlette's FileResponse Range parsing, CVE-2025-62727, is reachable).
        fh = svc.open_file(_row_id(row_id))
        name = Path(svc.rows[_row_id(row_id)]["path"]).name
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
    def thumb(row_id: str, size: Annotated[int, Query(ge=16, le=512)] = 160) -> Response:
        data = svc.thumb(_row_id(row_id), size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/map")
    def embedding_map() -> dict[str, Any]:
        return svc.embedding_map()

    return app


async def _in_thread(fn, *args):
    import anyio

    return await anyio.to_thread.run_sync(lambda: fn(*args))
