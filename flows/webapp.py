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

import io
import tempfile
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from PIL import Image, ImageOps, UnidentifiedImageError

from extractors import DEFAULT_WORKSPACE
from extractors.images import ImageError, open_rgb
from extractors.layout import EMBEDDINGS, embedding_matrix
from extractors.store import Store, StoreError

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOAD_PIXELS = 40_000_000
MAX_K = 100
WEB = Path(__file__).parent / "web"
META = ["id", "path", "sha256", "label", "split", "width", "height", "bytes"]

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
        self._parquet = pq.ParquetFile(store.path / EMBEDDINGS)
        sizes = [
            self._parquet.metadata.row_group(i).num_rows
            for i in range(self._parquet.num_row_groups)
        ]
        self._group_starts = np.cumsum([0, *sizes])[:-1]
        self._backbone = None
        self._lock = threading.Lock()
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
                with Image.open(io.BytesIO(data)) as img:
                    w, h = img.size
        except (
            UnidentifiedImageError,
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ):
            raise HTTPException(
                415, "not an image this service can read (JPEG, PNG, GIF, WebP, TIFF, BMP...)"
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise HTTPException(400, f"corrupt image data: {exc}") from None
        if w * h > MAX_UPLOAD_PIXELS:
            raise HTTPException(
                413, f"image of {w}x{h} pixels is over the {MAX_UPLOAD_PIXELS:,}-pixel limit"
            )
        bb = self.backbone()
        with tempfile.NamedTemporaryFile(suffix=".upload") as tmp:
            tmp.write(data)
            tmp.flush()
            try:
                img = open_rgb(tmp.name, min_side=bb.decode_side)[0]
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
        """Top-k rows, filtered by label/split: over-fetch until k pass or the index is done."""
        total = self.ann.ntotal
        fetch = min(total, k + 1 if label is None and split is None else 4 * k + 1)
        while True:
            scores, ids = self.ann.search(vector, fetch)
            hits = []
            for s, i in zip(scores[0], ids[0], strict=True):
                row = self.rows.get(int(i))
                if row is None or int(i) == exclude:
                    continue
                if (label is None or row["label"] == label) and (
                    split is None or row["split"] == split
                ):
                    hits.append(self.hit(row, float(s)))
            if len(hits) >= k or fetch >= total:
                return hits[:k]
            fetch = min(total, fetch * 4)

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

    def file_of(self, row_id: int) -> Path:
        if row_id not in self.rows:
            raise HTTPException(404, f"no row with id {row_id} in this store")
        path = Path(self.rows[row_id]["path"])
        if not path.is_file():
            raise HTTPException(404, f"the image of row {row_id} is no longer at {path}")
        return path

    def thumb(self, row_id: int, size: int) -> bytes:
        key = (row_id, size)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        try:
            img = open_rgb(self.file_of(row_id), min_side=size)[0]
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


def _row_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise HTTPException(404, f"{text!r} is not a row id") from None


def create_app(
    store: str | Path, workspace: str | Path = DEFAULT_WORKSPACE, mlflow_url: str | None = None
) -> FastAPI:
    """The FastAPI app over `store` (read-only: the index is memory-mapped)."""
    svc = SearchService(Store(store), workspace, mlflow_url)
    app = FastAPI(title="headstart search", docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.state.service = svc

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse((WEB / "index.html").read_text())

    @app.get("/map", response_class=HTMLResponse)
    def map_page() -> HTMLResponse:
        return HTMLResponse((WEB / "map.html").read_text())

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
    def image(row_id: str) -> FileResponse:
        return FileResponse(svc.file_of(_row_id(row_id)))

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
