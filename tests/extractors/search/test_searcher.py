"""Searching a real store: pages follow on from each other and examples are left out."""

from __future__ import annotations

import pytest

from extractors.search.query import Example, Query, QueryError
from extractors.search.searcher import searcher_for


def test_pages_follow_on_and_examples_are_left_out(built_store) -> None:
    searcher = searcher_for(built_store)
    a = int(searcher.rows.ids[10])
    full = searcher.run(Query([Example(id=a)], k=30))["hits"]
    pages = [searcher.run(Query([Example(id=a)], k=10, offset=o))["hits"] for o in (0, 10, 20)]
    assert [h["id"] for p in pages for h in p] == [h["id"] for h in full]
    assert str(a) not in [h["id"] for h in full]
    with pytest.raises(QueryError, match="k \\+ offset at most 1000"):
        searcher.run(Query([Example(id=a)], k=10, offset=995))
    with pytest.raises(QueryError, match="cannot embed images"):
        searcher.run(Query([Example(image=b"\x89PNG")]))
