"""Fixtures of the flows tests: the search service on the shared digits store, over loopback."""

from __future__ import annotations

import httpx
import pytest

from tests.flows.web.live import serving


@pytest.fixture(scope="module")
def server(built_store, tmp_path_factory):
    """`headstart ui` on `built_store`, served for the module (a module may serve its own)."""
    with serving(built_store.path, tmp_path_factory.mktemp("ws")) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c
