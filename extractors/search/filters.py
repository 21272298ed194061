"""Which rows a search may return and which of its ranks: the filters and the page of a query,
declared once. `Query` (extractors/search/query.py), the search service's schemas
(flows/web/schemas.py) and `headstart search`'s options (extractors.settings.SearchSettings)
read their helps and defaults here, and `Filters.of` their values.

The number of results differs by caller, on purpose, as named overrides of `Page.k`: K for a
`Query` built in code, CLI_K for `headstart search`, PAGE_K for the gallery page and its API.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

K = 10  # results of a `Query` built in code
CLI_K = 5  # results `headstart search` prints (extractors.settings.SearchSettings.k)
PAGE_K = 12  # results of a page of the search service (its API and the gallery page)
MAX_RESULTS = 1000  # offset + k at most
MAX_IDS = 100_000  # ids of an id-list filter


def declared(default: Any, help: str, example: Any, spelled: str = "", cli: str = "") -> Any:
    """A field of a search request: its default, its `help` (as the API's JSON body describes
    it), an `example` value, what a query string or the command line adds to the help
    (`spelled`: how they spell the value), and the command line's own help where it words it
    otherwise (`cli`; default: the help, spelled, as a sentence)."""
    meta = {"help": help, "example": example, "spelled": spelled, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Filters:
    """Which rows may be results: all of the given conditions hold."""

    label: str | None = declared(None, "only rows with this label", "cat")
    split: str | None = declared(None, "only rows of this split", "test")
    ids: tuple[int, ...] | None = declared(
        None, "only these rows", ["123", "456"], ": ids, comma-separated"
    )
    path_prefix: str | None = declared(
        None,
        "only rows whose path starts with this",
        "cat/",
        " (absolute, or relative to the source root)",
    )

    @classmethod
    def of(cls, source: Any, **given: Any) -> Filters:
        """The filters of `source` (settings or a request body with these fields), those in
        `given` as given (say, ids already parsed)."""
        return cls(**{f.name: given.get(f.name, getattr(source, f.name)) for f in fields(cls)})

    def record(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if v is not None}
        if "ids" in out:
            out["ids"] = len(out["ids"])
        return out


@dataclass(frozen=True)
class Page:
    """Which ranks of the results: `k` of them from rank `offset` (0 = the best)."""

    k: int = declared(K, "results per page", PAGE_K, cli="Number of results.")
    offset: int = declared(
        0, "rank of the first result", 0, cli="Rank of the first result (paging)."
    )


def field_of(cls: type, name: str) -> dataclasses.Field:
    """The declaration of field `name` of `Filters` or `Page`."""
    return next(f for f in fields(cls) if f.name == name)


def help_of(cls: type, name: str, spelled: bool = False) -> str:
    """The help of a field, as the JSON body says it, or (`spelled`) as a query string says it
    (with how the value is spelled there)."""
    meta = field_of(cls, name).metadata
    return meta["help"] + (meta["spelled"] if spelled else "")


def example_of(cls: type, name: str) -> Any:
    return field_of(cls, name).metadata["example"]


def sentence(cls: type, name: str) -> str:
    """A field's help as the command line shows it: `Only rows with this label.`"""
    if cli := field_of(cls, name).metadata["cli"]:
        return cli
    text = help_of(cls, name, spelled=True)
    return text[0].upper() + text[1:] + "."
