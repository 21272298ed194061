"""Inference stage: nearest images and what a store holds (labels: flows/steps/scoring.py).
Imports neither MLflow nor Prefect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from extractors import DEFAULT_WORKSPACE
from extractors.ann import search
from extractors.store import StoreError
from flows.workspace import backbone_for, resolve_store


def search_image(
    image: str | Path,
    store: str | Path | None = None,
    k: int = 5,
    workspace: str | Path = DEFAULT_WORKSPACE,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Nearest images in the store to `image`, embedded with the store's own backbone."""
    st = resolve_store(store, workspace)
    m = st.manifest()
    bb = backbone_for(m["backbone"], workspace, device=device)
    if bb.weights != m["weights"]:
        raise StoreError(f"store weights {m['weights']} differ from {bb.weights}")
    query = bb.embed(bb.prepare(image)).numpy()
    index = st.index(mmap=True)
    if index.ntotal == 0:
        return []
    scores, ids = search(index, query, k)
    meta = st.table(["id", "path", "label", "split"])
    rows = {i: r for i, r in zip(meta["id"].to_pylist(), meta.to_pylist(), strict=True)}
    return [
        {
            "id": int(i),
            "path": rows[int(i)]["path"],
            "label": rows[int(i)]["label"],
            "split": rows[int(i)]["split"],
            "score": round(float(s), 6),
        }
        for s, i in zip(scores[0], ids[0], strict=True)
        if i >= 0
    ]


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
    latest = st.path / "heads" / "latest.json"
    if latest.exists():
        info["heads"] = json.loads(latest.read_text())
    return info
