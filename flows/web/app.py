"""Search service over one store: a JSON API and its pages (gallery, embedding map, issues),
assembled here from the modules of flows/web/ (`create_app`).

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
    (every search takes k, offset, label, split, ids and path_prefix: extractors/search/
     filters.py; one answer shape: {"query": {...}, "hits": [...]}, extractors/search/query.py)
    GET  /api/row/{id}          the row's Parquet metadata (no vector) and where it lives
    GET  /api/image/{id}        the row's image file;  /api/thumb/{id}?size=  a JPEG thumbnail
    GET  /api/map               the map's points (computed once per store commit)
    GET  /api/health            {"ok": true}, answered on the event loop, never queued

The parts, one job each: who may ask and what a request may cost (security.py), what requests
carry (schemas.py), decoding uploads (uploads.py), serving files and thumbnails (files.py),
the state the routes share, the store's live snapshot among it (service.py), the process's
memory (memory.py), and the routes, one router per concern (routes/). Everything slow runs in
worker threads, never on the event loop: images are embedded HEAVY_AT_ONCE requests at a time;
the map is computed by one request at a time in a place of its own, so uploads and image
queries never wait for it, and once computed it is answered at once; a cached thumbnail waits
for no decoding one.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware.base import BaseHTTPMiddleware

from extractors import DEFAULT_WORKSPACE
from extractors.search.query import NotFound, QueryError
from extractors.store.store import Store
from flows.web.routes import embedding_map, files, overview, pages, search
from flows.web.schemas import document_bodies
from flows.web.security import LOOPBACK, BodyLimit, who_may_ask
from flows.web.service import Places, SearchService


def create_app(
    store: str | Path,
    workspace: str | Path = DEFAULT_WORKSPACE,
    mlflow_url: str | None = None,
    hosts: tuple[str, ...] = LOOPBACK,
    token: str | None = None,
    batch_size: int | None = None,
) -> FastAPI:
    """The FastAPI app over `store` (read-only: the index is memory-mapped).

    Who may ask: requests whose Host is one of `hosts`, and with `token` (required off
    loopback) only requests that carry it (flows/web/security.py). Uploaded images run through
    the backbone `batch_size` at a time (default: extraction's, `EmbedSettings.batch_size`)."""
    svc = SearchService(Store(store), workspace, mlflow_url, batch_size)
    app = FastAPI(
        title="headstart search",
        docs_url=None,  # Swagger UI loads from a CDN; /api/docs (routes/pages.py) needs nothing
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.service = svc
    app.state.places = Places()
    app.add_middleware(BodyLimit, limits=svc.limits)  # inside `guard`: who may ask, first
    app.add_middleware(BaseHTTPMiddleware, dispatch=who_may_ask(hosts, token))
    app.add_exception_handler(Exception, unexpected)
    app.add_exception_handler(QueryError, bad_query)
    for router in (pages, overview, search, files, embedding_map):
        app.include_router(router.router)
    document_bodies(app)
    return app


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, 500)


async def bad_query(request: Request, exc: QueryError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, 404 if isinstance(exc, NotFound) else 400)
