"""The filters and the page of a search, declared once (extractors/search/filters.py): the
command line's options and `Query` read them, each caller's number of results a named override
that stays what users know (5 printed, 10 in code, 12 a page)."""

from __future__ import annotations

import dataclasses

from extractors.search.filters import CLI_K, PAGE_K, Filters, K, Page, sentence
from extractors.search.query import Example, Query
from extractors.settings import SearchSettings


def test_each_caller_keeps_its_number_of_results() -> None:
    assert (CLI_K, K, PAGE_K) == (5, 10, 12)
    assert SearchSettings().k == CLI_K and SearchSettings().offset == Page().offset == 0
    assert Query([Example(id=1)]).k == K == Page().k


def test_the_command_line_options_are_the_declared_filters() -> None:
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(SearchSettings)}
    assert helps == {
        "k": "Number of results.",
        "offset": "Rank of the first result (paging).",
        "label": "Only rows with this label.",
        "split": "Only rows of this split.",
        "ids": "Only these rows: ids, comma-separated.",
        "path_prefix": "Only rows whose path starts with this (absolute, or relative to the "
        "source root).",
    }
    declared = [f.name for f in dataclasses.fields(Page) + dataclasses.fields(Filters)]
    assert list(helps) == declared
    assert all(helps[name] == sentence(Filters, name) for name in ("label", "ids"))


def test_filters_of_settings_take_their_values() -> None:
    s = SearchSettings(label="cat", split="test", ids=(3, 4), path_prefix="cat/")
    assert Filters.of(s) == Filters("cat", "test", (3, 4), "cat/")
    assert Filters.of(s, ids=None).record() == {
        "label": "cat",
        "split": "test",
        "path_prefix": "cat/",
    }
