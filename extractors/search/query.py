"""A query over a store, typed: by stored rows, vectors or images; more like these and less like
those; among the rows that pass its `Filters`, paged (extractors/search/filters.py). One JSON
shape for the CLI and the service (`response`).

Protocol of a query with examples (Rocchio's): the query vector is the mean of the normalised
`like` vectors minus UNLIKE_WEIGHT times the mean of the normalised `unlike` vectors,
normalised; rows given as examples are left out of the results. A filter becomes the list of
allowed ids, searched inside the index (`AnnIndex.search`: an exact scan of few rows, widened
probes for more), never by over-fetching. The rows are read by extractors/search/rows.py and
searched by extractors/search/searcher.py.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extractors.common import HeadstartError, normalize
from extractors.search.filters import MAX_RESULTS, Filters, K
from extractors.settings import MAX_ROW_ID

UNLIKE_WEIGHT = 0.5  # how far the unlike examples push the query away (Rocchio's gamma)
MAX_EXAMPLES = 64  # like + unlike examples of one query


class QueryError(HeadstartError, ValueError):
    """A query the store cannot answer as asked; the message says what it takes."""


class NotFound(QueryError):
    """A row, path or file the query names is not in the store."""


def row_id(value: Any, what: str = "a row id") -> int:
    """`value` (an int, or its decimal text) as a row id, or QueryError naming `what`: ids are
    0 to 2**63 - 1, so anything else (a negative number, 24 digits) is refused here, before
    numpy or FAISS sees it."""
    try:
        out = int(value) if isinstance(value, int | str) and not isinstance(value, bool) else None
    except ValueError:
        out = None
    if out is None or not 0 <= out <= MAX_ROW_ID:
        raise QueryError(f"{what} is a whole number from 0 to 2**63 - 1, not {value!r}")
    return out


@dataclass
class Example:
    """One example of a query: a stored row (`id`), a vector, or an image to embed."""

    id: int | None = None
    vector: np.ndarray | None = None
    image: bytes | str | Path | None = None
    name: str = ""


@dataclass
class Query:
    """What to search for, how many results from which rank, among which rows."""

    like: list[Example]
    unlike: list[Example] = field(default_factory=list)
    k: int = K
    offset: int = 0
    filters: Filters = field(default_factory=Filters)

    def check(self) -> None:
        if not self.like:
            raise QueryError("a query needs at least one example to search like")
        if len(self.like) + len(self.unlike) > MAX_EXAMPLES:
            raise QueryError(f"at most {MAX_EXAMPLES} like and unlike examples in one query")
        if self.k < 1 or self.offset < 0 or self.k + self.offset > MAX_RESULTS:
            raise QueryError(
                f"k must be at least 1 and offset at least 0, with k + offset at most "
                f"{MAX_RESULTS} (asked k={self.k}, offset={self.offset})"
            )


def combine(like: np.ndarray, unlike: np.ndarray | None = None) -> np.ndarray:
    """One query vector from examples (see the module docstring)."""
    q = normalize(like).mean(axis=0)
    if unlike is not None and len(unlike):
        q = q - UNLIKE_WEIGHT * normalize(unlike).mean(axis=0)
    return normalize(q[None])[0]


def parse_vector(value: Any, dim: int) -> np.ndarray:
    """A query vector from JSON: a list of `dim` numbers, or base64 of `dim` float32s."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise QueryError("vector_b64 is not valid base64") from None
        if len(raw) != 4 * dim:
            raise QueryError(
                f"vector_b64 holds {len(raw)} bytes; this store's vectors are {dim} float32 "
                f"({4 * dim} bytes, little-endian)"
            )
        vector = np.frombuffer(raw, "<f4").astype(np.float32)
    else:
        if not isinstance(value, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in value
        ):
            raise QueryError("vector must be a list of numbers")
        if len(value) != dim:
            raise QueryError(f"vector has {len(value)} numbers; this store's vectors have {dim}")
        vector = np.asarray(value, np.float32)
    if not np.isfinite(vector).all() or not np.any(vector):
        raise QueryError("vector must be finite and not all zeros")
    return vector


def hit(row: dict[str, Any], score: float) -> dict[str, Any]:
    """One result: the row (id as a string: JSON numbers lose int64 precision in browsers),
    its score, and its addresses on a `headstart ui` service."""
    i = row["id"]
    return {
        "id": str(i),
        "score": round(score, 5),
        "label": row["label"],
        "split": row["split"],
        "path": row["path"],
        "name": Path(row["path"]).name,
        "thumb": f"/api/thumb/{i}",
        "image": f"/api/image/{i}",
        "row": f"/api/row/{i}",
    }


def describe(ex: Example) -> dict[str, Any]:
    if ex.id is not None:
        return {"id": str(ex.id)}
    if ex.image is not None:  # embedded already (`run_many`) or not
        return {"image": ex.name or "upload"}
    return {"vector": len(np.asarray(ex.vector).reshape(-1))}


def response(q: Query, hits: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON of one query's answer, the same from `headstart search --json` and the API."""
    return {
        "query": {
            "like": [describe(e) for e in q.like],
            "unlike": [describe(e) for e in q.unlike],
            "k": q.k,
            "offset": q.offset,
            "filters": q.filters.record(),
        },
        "hits": hits,
    }
