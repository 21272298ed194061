"""Embedding map: a 2-D projection of a store's embeddings, coloured by label (PNG and page)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from extractors.common import write_bytes_atomic
from extractors.store import Store, StoreError

MAX_POINTS = 3000
PAGE = Path(__file__).parent / "web" / "map.html"


def project(store: Store, max_points: int = MAX_POINTS, seed: int = 0) -> dict[str, Any]:
    """t-SNE (PCA to 50-d first) of up to `max_points` rows sampled with `seed`; PCA alone
    below 50 rows. Returns {"method", "points": [{id, x, y, label, split, path}]}."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x, meta = store.arrays(where_labelled=False)
    if not len(x):
        raise StoreError(f"store {store.path} holds no embeddings yet; run `headstart embed`")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(x), size=min(max_points, len(x)), replace=False))
    x = x[pick] / np.maximum(np.linalg.norm(x[pick], axis=1, keepdims=True), 1e-12)
    if len(x) < 3:
        xy, method = np.zeros((len(x), 2)), "none"
    elif len(x) < 50:
        xy, method = PCA(2, random_state=seed).fit_transform(x), "pca"
    else:
        reduced = PCA(min(50, len(x) - 1, x.shape[1]), random_state=seed).fit_transform(x)
        perplexity = float(min(30, (len(x) - 1) / 3))
        tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
        xy, method = tsne.fit_transform(reduced), "tsne"
    span = np.ptp(xy, axis=0)
    xy = (xy - xy.min(axis=0)) / np.where(span > 0, span, 1)
    rows = meta.take(pick).select(["id", "label", "split", "path"]).to_pylist()
    points = [
        {**r, "x": round(float(px), 5), "y": round(float(py), 5)}
        for r, (px, py) in zip(rows, xy, strict=True)
    ]
    return {"method": method, "rows": len(meta), "points": points}


def write_png(data: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """The map as a scatter plot, one colour per label (grey for unlabelled)."""
    from heads.plots import label_scatter_png

    pts = np.array([[p["x"], p["y"]] for p in data["points"]])
    n, shown = data["rows"], len(data["points"])
    title = title or f"{data['method']} map of {shown:,} of {n:,} embeddings"
    return label_scatter_png(pts, [p["label"] for p in data["points"]], title, path)


def write_html(data: dict[str, Any], path: str | Path) -> Path:
    """A self-contained interactive page (hover for label and path) with the data inline."""
    blob = json.dumps(data).replace("</", "<\\/")
    page = PAGE.read_text().replace("/*MAP_DATA*/null", blob)
    write_bytes_atomic(path, page.encode())
    return Path(path)
