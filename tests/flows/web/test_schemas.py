"""The search service's request schemas read the declared filters and page
(extractors/search/filters.py): a page of results is PAGE_K, and the query string takes one
parameter per filter."""

from __future__ import annotations

import dataclasses
import inspect

from extractors.search.filters import PAGE_K, Filters
from flows.web.schemas import QueryBody, filters, paging


def test_a_page_of_results_is_the_declared_page() -> None:
    assert PAGE_K == 12
    assert QueryBody.model_fields["k"].default == PAGE_K
    assert inspect.signature(paging).parameters["k"].default == PAGE_K
    body = QueryBody.model_validate({"like": [{"id": "1"}], "label": "cat", "ids": ["3"]})
    assert [n for n in QueryBody.model_fields if n not in ("like", "unlike", "k", "offset")] == [
        f.name for f in dataclasses.fields(Filters)
    ]
    assert (body.k, body.label, body.ids) == (12, "cat", ["3"])


def test_the_query_string_takes_the_declared_filters() -> None:
    params = inspect.signature(filters).parameters
    assert list(params) == [f.name for f in dataclasses.fields(Filters)]
    got = filters(label="cat", split=None, ids="3, 4,", path_prefix="cat/")
    assert got == Filters("cat", None, (3, 4), "cat/")
