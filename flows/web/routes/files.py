"""A stored row: its Parquet metadata, its image file and a thumbnail, addressed by row id
(never by a path: flows/web/files.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from flows.web.files import image_response, open_file
from flows.web.schemas import RowId, request_row_id
from flows.web.service import Service, Waits, in_thread

router = APIRouter()


@router.get("/api/row/{row_id}")
def row(row_id: RowId, svc: Service) -> dict[str, Any]:
    return svc.row(svc.snapshot(), request_row_id(row_id))


@router.get("/api/image/{row_id}")
def image(row_id: RowId, svc: Service) -> StreamingResponse:
    # Streamed from the verified open file, never by path.
    fh, path = open_file(svc.snapshot(), request_row_id(row_id))
    return image_response(fh, path)


@router.get("/api/thumb/{row_id}")
async def thumb(
    row_id: RowId,
    svc: Service,
    places: Waits,
    size: Annotated[
        int, Query(ge=16, le=512, description="longest side in pixels", examples=[160])
    ] = 160,
) -> Response:
    rid = request_row_id(row_id)
    snap = await in_thread(svc.snapshot)
    data = svc.thumbs.cached(snap, rid, size)  # a lookup, on the loop
    if data is None:
        data = await in_thread(svc.thumbs.make, snap, rid, size, limiter=places.thumbs)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
