"""Who may ask the search service, and what one request may cost.

Who may ask (`who_may_ask`): requests whose Host is one of the served names (loopback by
default: a page that re-points its own domain to 127.0.0.1, DNS rebinding, is refused), no POST
from another origin, and, with a token (required off loopback), only requests that carry it:
`?token=` once (then kept in an HttpOnly, SameSite=Strict cookie), the cookie, or
`Authorization: Bearer <token>`.

What one request may cost is bounded where it arrives: a body over its route's limit (made from
the `MAX_*` below and the store's dimension: `Limits`) is refused, 413, before any of it is
parsed, by its Content-Length or, for a chunked body, as the bytes arrive; a JSON body with
more values than a legitimate query can hold is refused before it is parsed too (`BodyLimit`).
Then a request may ask for at most MAX_BATCH queries, MAX_REQUEST_IMAGES images, MAX_EXAMPLES
examples and MAX_IDS filter ids, all of its queries together (`check_work`).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response

from extractors.search.filters import MAX_IDS
from extractors.search.query import MAX_EXAMPLES

if TYPE_CHECKING:
    from flows.web.schemas import QueryBody

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
TOKEN_COOKIE = "headstart_token"
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOAD_PIXELS = 40_000_000
MAX_K = 100

# What one request may ask for, declared once: the body limits (`Limits`) and the checks
# of a query (`check_work`) are made from these.
MAX_BATCH = 16  # queries of one batch
MAX_REQUEST_IMAGES = 16  # images one request embeds, all its queries together
MAX_REQUEST_IMAGE_BYTES = MAX_UPLOAD_BYTES  # the files of those images, together
MAX_TEXT_BYTES = 4096  # a path, label, split or path prefix
JSON_NUMBER_BYTES = 32  # a number as JSON text with its separator and indentation, at most
MAX_OTHER_BODY = 1024  # a request to any other route carries no real body
Dispatch = Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]


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


def check_work(queries: Sequence[QueryBody]) -> int:
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


class BodyLimit:
    """ASGI middleware: a request body within its route's `BodyRule` (`Limits.rule`), or 413
    before any of it is parsed: refused by its Content-Length, or, sent without one (chunked),
    as soon as the bytes read pass the limit; a JSON body with more values than the rule's is
    refused before it is parsed as well. A body within its limit is read here and handed on
    whole (so it is in memory once, bounded by the limit)."""

    def __init__(self, app: Any, limits: Limits) -> None:
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


def bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def who_may_ask(hosts: tuple[str, ...], token: str | None) -> Dispatch:
    """The middleware that answers, first, who may ask (the module docstring): requests for a
    host not in `hosts` (without a token), POSTs from another origin, and requests without the
    token (with one) are refused."""
    allowed = {host_name(h) for h in hosts}

    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
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
            given = request.cookies.get(TOKEN_COOKIE) or bearer(request)
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

    return guard
