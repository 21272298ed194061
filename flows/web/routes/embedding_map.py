"""The embedding map's points (flows/web/map.py), of the commit the searches answer from:
computed once per commit, by one request at a time in a place of its own."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from flows.web.service import Service, Waits, in_thread

router = APIRouter()


@router.get("/api/map", response_class=JSONResponse)
async def embedding_map(svc: Service, places: Waits) -> Response:
    """The map's points, of the commit the searches answer from (computed once each)."""
    snap = await in_thread(svc.snapshot)
    data = snap.computed_map
    if data is None:  # one computes it, the others wait here, holding no thread
        data = await in_thread(snap.embedding_map, svc.store, limiter=places.mapping)
    return Response(data, media_type="application/json")
