"""What the search service's requests carry: the query-string parameters of a GET or upload
query (`paging`, `filters`), the JSON bodies of /api/query and /api/query/batch (`QueryBody`,
`BatchBody`, parsed in a worker thread: `parse`) and a row id in a path (`RowId`). The filters,
their helps and the page's defaults are declared once, in extractors/search/filters.py.
"""

from __future__ import annotations

import base64
import binascii
import inspect
from dataclasses import fields
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, HTTPException, Query
from fastapi import Path as FPath
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from extractors.search.filters import (
    MAX_IDS,
    MAX_RESULTS,
    PAGE_K,
    Filters,
    Page,
    example_of,
    help_of,
)
from extractors.search.query import MAX_EXAMPLES, Example, QueryError, parse_vector, row_id
from extractors.search.query import Query as Search
from flows.web.security import MAX_BATCH, MAX_K

if TYPE_CHECKING:
    from flows.web.service import Snapshot

RowId = Annotated[
    str, FPath(description="a row id (`id` of a hit)", examples=["7383510266719186681"])
]


def paging(
    k: Annotated[
        int,
        Query(ge=1, le=MAX_K, description=help_of(Page, "k"), examples=[example_of(Page, "k")]),
    ] = PAGE_K,
    offset: Annotated[
        int,
        Query(
            ge=0,
            le=MAX_RESULTS - 1,
            description=help_of(Page, "offset"),
            examples=[example_of(Page, "offset")],
        ),
    ] = 0,
) -> Page:
    """The page of a GET or upload query, from its query string."""
    return Page(k, offset)


def filters(**given: str | None) -> Filters:
    """The filters of a GET or upload query, from its query string: one parameter per field of
    `Filters` (its signature, below, is made from them); `ids` comma-separated."""
    ids, id_list = given.get("ids"), None
    if ids is not None:
        listed = [i for i in ids.split(",") if i.strip()]
        if len(listed) > MAX_IDS:
            raise HTTPException(400, f"ids takes at most {MAX_IDS:,} row ids")
        id_list = tuple(request_row_id(i, 400) for i in listed)
    return Filters.of(SimpleNamespace(**given), ids=id_list)


def _spelled(name: str) -> inspect.Parameter:
    """A filter as a query-string parameter: its help and example as a query string spells
    them (a list comma-separated)."""
    example = example_of(Filters, name)
    example = ",".join(example) if isinstance(example, list) else example
    query = Query(description=help_of(Filters, name, spelled=True), examples=[example])
    kind = inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(name, kind, default=None, annotation=Annotated[str | None, query])


filters.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [_spelled(f.name) for f in fields(Filters)], return_annotation=Filters
)


def request_row_id(text: str | int, status: int = 404) -> int:
    """A row id from a request (0 to 2**63 - 1), else `status` with the reason: 404 for an
    address (no such row), 400 for a query's field."""
    try:
        return row_id(text)
    except QueryError:
        raise HTTPException(
            status, f"{text!r} is not a row id (a whole number from 0 to 2**63 - 1)"
        ) from None


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

    def example(self, snap: Snapshot) -> Example:
        given = [k for k, v in self.__dict__.items() if v is not None]
        if len(given) != 1:
            raise QueryError(
                "each example takes exactly one of id, path, vector, vector_b64, image_b64 "
                f"(this one has {', '.join(given) or 'none'})"
            )
        dim = snap.manifest["dim"]
        if self.id is not None:
            return Example(id=request_row_id(self.id, 400))
        if self.path is not None:
            return Example(id=snap.rows.by_path(self.path))
        if self.vector is not None or self.vector_b64 is not None:
            value = self.vector if self.vector is not None else self.vector_b64
            return Example(vector=parse_vector(value, dim))
        try:
            data = base64.b64decode(self.image_b64 or "", validate=True)
        except (binascii.Error, ValueError):
            raise QueryError("image_b64 is not valid base64") from None
        return Example(image=data, name="upload")


def _declared(name: str) -> dict[str, Any]:
    """A filter as a field of a JSON body: its help and example."""
    return {"description": help_of(Filters, name), "examples": [example_of(Filters, name)]}


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
    k: int = Field(PAGE_K, ge=1, le=MAX_K, description=help_of(Page, "k"))
    offset: int = Field(0, ge=0, le=MAX_RESULTS - 1, description=help_of(Page, "offset"))
    label: str | None = Field(None, **_declared("label"))
    split: str | None = Field(None, **_declared("split"))
    ids: list[str | int] | None = Field(None, max_length=MAX_IDS, **_declared("ids"))
    path_prefix: str | None = Field(None, **_declared("path_prefix"))

    def to_query(self, snap: Snapshot) -> Search:
        ids = None if self.ids is None else tuple(request_row_id(i, 400) for i in self.ids)
        return Search(
            [e.example(snap) for e in self.like],
            [e.example(snap) for e in self.unlike],
            k=self.k,
            offset=self.offset,
            filters=Filters.of(self, ids=ids),
        )


class BatchBody(BaseModel):
    """Several queries, answered in order."""

    model_config = ConfigDict(extra="forbid")

    queries: list[QueryBody] = Field(min_length=1, max_length=MAX_BATCH)


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI of a JSON body a route reads itself (`parse`): the model's schema."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """A JSON body as `model`, parsed and checked here (in a worker thread, not on the event
    loop); else 422 in FastAPI's own shape (`detail`: errors, each `loc` from "body")."""
    if not raw.strip():
        errors = [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        raise RequestValidationError(errors)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = []
        for e in exc.errors(include_url=False):
            e = {**e, "loc": ("body", *e["loc"])}
            if e["type"] == "json_invalid":  # not the body back: it may be megabytes
                e = {**e, "msg": "JSON decode error", "input": {}}
            errors.append(e)
        raise RequestValidationError(errors) from None


def document_bodies(app: FastAPI) -> None:
    """Give `app`'s OpenAPI schema the JSON bodies its routes parse themselves (`parse`)."""
    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with the JSON bodies parsed in threads (`parse`) added."""
        if app.openapi_schema is None:
            spec = plain_openapi()
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in (QueryBody, BatchBody):
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
