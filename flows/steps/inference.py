"""Inference stage: nearest images and what a store holds (labels: flows/steps/scoring.py).
Imports neither MLflow nor Prefect."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from extractors import DEFAULT_WORKSPACE
from extractors.search.filters import Filters
from extractors.search.query import Example, Query, QueryError, parse_vector, row_id
from extractors.search.searcher import embed_batches, searcher_for
from extractors.settings import EmbedSettings, SearchSettings
from extractors.store.layout import LATEST_HEADS, stored_path
from extractors.store.store import StoreError
from extractors.workspace import backbone_for, resolve_store


def search_store(
    images: list[str],
    like: list[str] = (),
    unlike: list[str] = (),
    vector: str | Path | None = None,
    search: SearchSettings | None = None,
    store: str | Path | None = None,
    workspace: str | Path = DEFAULT_WORKSPACE,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Answers in the search service's shape (extractors/search/query.py), one per query: each image
    alone, or, with `like`/`unlike` (row ids or stored paths) or a `vector`, one query of them
    all. Images are embedded with the store's own backbone."""
    st = resolve_store(store, workspace)
    m = st.manifest()
    backbone = None

    def embed(images: Sequence[bytes | str | Path]) -> np.ndarray:
        nonlocal backbone
        if backbone is None:
            backbone = backbone_for(m["backbone"], workspace, device=device)
            if backbone.weights != m["weights"]:
                raise StoreError(f"store weights {m['weights']} differ from {backbone.weights}")
        return embed_batches(backbone, images, EmbedSettings().batch_size)

    searcher = searcher_for(st, embed)
    s = search or SearchSettings()
    where = Filters.of(s)
    k, offset = s.k, s.offset

    def stored(ref: str) -> Example:
        """A stored row by id, or by path: from here if it exists, else from the source root."""
        if ref.lstrip("-").isdigit():
            return Example(id=row_id(ref, "a row id of --like or --unlike"))
        here = Path(ref).expanduser()
        path = stored_path(str(here.resolve())) if here.exists() else ref
        return Example(id=searcher.rows.by_path(path))

    examples = [Example(image=p, name=str(p)) for p in images]
    if vector is not None:
        examples.append(Example(vector=_read_vector(vector, m["dim"]), name=str(vector)))
    if like or unlike or vector is not None:
        q = Query([*examples, *map(stored, like)], list(map(stored, unlike)), k, offset, where)
        return [searcher.run(q)]
    if not examples:
        raise QueryError("give query images, --like/--unlike stored images, or --vector")
    return searcher.run_many([Query([ex], k=k, offset=offset, filters=where) for ex in examples])


def _read_vector(path: str | Path, dim: int) -> np.ndarray:
    """A query vector from a .npy file or a file holding a JSON list of numbers."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            value = np.load(path, allow_pickle=False).astype(np.float32).reshape(-1).tolist()
        else:
            value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise QueryError(f"cannot read a vector from {path}: {exc}") from None
    return parse_vector(value, dim)


def store_info(
    store: str | Path | None = None, workspace: str | Path = DEFAULT_WORKSPACE
) -> dict[str, Any]:
    """What a store holds: manifest, counts, failures, index consistency, heads."""
    st = resolve_store(store, workspace)
    info = {
        "store": str(st.path),
        **st.manifest(),
        # Checked as found on disk (search rebuilds an inconsistent index before using it).
        "index_consistent": st.index_if_consistent() is not None,
        "failures_table": st.failures().to_pylist(),
    }
    latest = st.path / LATEST_HEADS
    if latest.exists():
        info["heads"] = json.loads(latest.read_text())
    return info
