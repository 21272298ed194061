"""The searches: by an uploaded image, a stored row, a stored path, and the general query (one
or a batch) by ids, paths, vectors and images. Every one answers {"query": ..., "hits": [...]}
(extractors/search/query.py); images are embedded in worker threads, HEAVY_AT_ONCE requests
at a time, and a query's JSON is parsed and checked in a thread too."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from extractors.search.filters import Filters, Page
from extractors.search.query import Example
from extractors.search.query import Query as Search
from flows.web.schemas import (
    BatchBody,
    QueryBody,
    RowId,
    filters,
    json_body,
    paging,
    parse,
    request_row_id,
)
from flows.web.security import check_work
from flows.web.service import Service, Waits, in_thread

router = APIRouter()
Paged = Annotated[Page, Depends(paging)]
Filtered = Annotated[Filters, Depends(filters)]


@router.post("/api/search")
async def search_upload(
    request: Request, page: Paged, where: Filtered, svc: Service, places: Waits
) -> dict[str, Any]:
    """Rows most like the uploaded image (the request body: the image file's bytes)."""
    data = await request.body()  # within MAX_UPLOAD_BYTES: `BodyLimit`
    q = Search([Example(image=data, name="upload")], k=page.k, offset=page.offset, filters=where)
    return (await in_thread(lambda: svc.query(svc.snapshot(), [q]), limiter=places.heavy))[0]


@router.get("/api/search/id/{row_id}")
def search_id(row_id: RowId, page: Paged, where: Filtered, svc: Service) -> dict[str, Any]:
    """Rows most like a stored row (itself left out)."""
    q = Search([Example(id=request_row_id(row_id))], k=page.k, offset=page.offset, filters=where)
    return svc.query(svc.snapshot(), [q])[0]


@router.get("/api/search/path")
def search_path(
    path: Annotated[
        str,
        Query(
            description="a path that is a row of the store: absolute, or relative to the "
            "source root",
            examples=["cat/chelsea.png"],
        ),
    ],
    page: Paged,
    where: Filtered,
    svc: Service,
) -> dict[str, Any]:
    """Rows most like the stored row of a path (itself left out)."""
    snap = svc.snapshot()
    ex = Example(id=snap.rows.by_path(path))
    return svc.query(snap, [Search([ex], k=page.k, offset=page.offset, filters=where)])[0]


@router.post("/api/query", openapi_extra=json_body(QueryBody))
async def query(request: Request, svc: Service, places: Waits) -> dict[str, Any]:
    """The general query: by row ids, paths, vectors (a list, or base64 float32) and images
    (base64), more like `like` and less like `unlike`, filtered and paged."""
    body = await in_thread(parse, QueryBody, await request.body())

    def run() -> dict[str, Any]:
        snap = svc.snapshot()
        return svc.query(snap, [body.to_query(snap)])[0]

    return await in_thread(run, limiter=places.heavy if check_work([body]) else None)


@router.post("/api/query/batch", openapi_extra=json_body(BatchBody))
async def query_batch(request: Request, svc: Service, places: Waits) -> dict[str, Any]:
    """Several queries at once (say, several images): one result list each, in order; at
    most MAX_BATCH queries and MAX_REQUEST_IMAGES images in all, embedded in batches."""
    body = await in_thread(parse, BatchBody, await request.body())

    def run() -> dict[str, Any]:
        snap = svc.snapshot()
        return {"results": svc.query(snap, [b.to_query(snap) for b in body.queries])}

    return await in_thread(run, limiter=places.heavy if check_work(body.queries) else None)
