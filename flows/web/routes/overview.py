"""What the store holds: its summary and limits, its latest audit's suspects, and whether the
service answers at all."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from flows.web.service import Service

router = APIRouter()


@router.get("/api/issues")
def issues(
    svc: Service,
    issue: Annotated[
        str | None,
        Query(description="label, outlier or near_duplicate (default: all)", examples=["label"]),
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=1000, description="findings at most", examples=[200])
    ] = 200,
) -> dict[str, Any]:
    """The latest audit's suspect images (`headstart audit`)."""
    return svc.issues(svc.snapshot(), issue, limit)


@router.get("/api/info")
def info(svc: Service) -> dict[str, Any]:
    return svc.info(svc.snapshot())


@router.get("/api/health")
async def health() -> dict[str, Any]:
    """Whether the service answers (on the event loop: slow requests run in threads)."""
    return {"ok": True}
