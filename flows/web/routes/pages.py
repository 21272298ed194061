"""The HTML pages: the gallery, the embedding map, the audit's suspects and the API reference
(rendered here from the OpenAPI schema: Swagger UI would load from a CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from extractors.search.filters import PAGE_K
from flows.web.security import MAX_K

WEB = Path(__file__).parent.parent  # where the pages are
router = APIRouter()


@router.get("/", response_class=HTMLResponse)
def page() -> HTMLResponse:
    # The gallery, with the page's number of results and its limit filled in (no docstring:
    # it would be the route's description in the OpenAPI schema).
    html = (WEB / "index.html").read_text()
    return HTMLResponse(html.replace("{{PAGE_K}}", str(PAGE_K)).replace("{{MAX_K}}", str(MAX_K)))


@router.get("/map", response_class=HTMLResponse)
def map_page() -> HTMLResponse:
    return HTMLResponse((WEB / "map.html").read_text())


@router.get("/api/docs", response_class=HTMLResponse, include_in_schema=False)
def api_docs(request: Request) -> HTMLResponse:
    from flows.web.api_docs import render

    return HTMLResponse(render(request.app.openapi()))


@router.get("/issues", response_class=HTMLResponse)
def issues_page() -> HTMLResponse:
    return HTMLResponse((WEB / "issues.html").read_text())
