"""A query's vector: made of its examples (Rocchio's), and read from JSON or base64."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from extractors.search.query import QueryError, combine, parse_vector


def test_the_query_vector_of_examples() -> None:
    like = np.array([[3.0, 0, 0], [0, 4.0, 0]], np.float32)
    unlike = np.array([[0, 0, 2.0]], np.float32)
    q = combine(like, unlike)
    expected = np.array([0.5, 0.5, -0.5]) / np.linalg.norm([0.5, 0.5, -0.5])
    assert np.allclose(q, expected) and np.isclose(np.linalg.norm(q), 1)
    v = np.arange(1, 5, dtype="<f4")
    assert np.array_equal(parse_vector(base64.b64encode(v.tobytes()).decode(), 4), v)
    assert np.array_equal(parse_vector([1, 2, 3, 4], 4), v)
    bad_vectors = [
        ([1, 2], "has 2 numbers"),
        ([0, 0, 0, 0], "not all zeros"),
        (["a", 1, 2, 3], "list of numbers"),
        ([True, 1, 2, 3], "list of"),
        ([float("nan"), 1, 2, 3], "finite"),
        ("AAAA", "holds 3 bytes"),
    ]
    for bad, message in bad_vectors:
        with pytest.raises(QueryError, match=message):
            parse_vector(bad, 4)
