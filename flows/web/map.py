"""Embedding map: a 2-D projection of a store's embeddings, coloured by label (PNG and page)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from extractors.common import write_bytes_atomic
from extractors.store.layout import EMBEDDINGS, embedding_matrix
from extractors.store.store import Store, StoreError

MAX_POINTS = 3000
PAGE = Path(__file__).parent / "map.html"


def sample(
    store: Store, max_points: int, seed: int = 0, parquet: pq.ParquetFile | None = None
) -> tuple[np.ndarray, pa.Table, int]:
    """(vectors, id/label/split/path, rows in all) of up to `max_points` rows drawn uniformly
    with `seed`, read one Parquet row group at a time, only the groups that hold a drawn row:
    memory is one row group plus the sample, never the whole matrix. `parquet`: the store's
    embeddings file as opened already (the search service's snapshot), else opened here."""
    path = store.path / EMBEDDINGS
    if parquet is None and not path.exists():
        raise StoreError(f"store {store.path} holds no embeddings yet; run `headstart embed`")
    reader = parquet if parquet is not None else pq.ParquetFile(path)
    n = reader.metadata.num_rows
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, size=min(max_points, n), replace=False))
    vectors, metas, start = [], [], 0
    for g in range(reader.num_row_groups):
        size = reader.metadata.row_group(g).num_rows
        inside = pick[(pick >= start) & (pick < start + size)] - start
        if len(inside):
            t = reader.read_row_group(g, columns=["id", "label", "split", "path", "embedding"])
            t = t.take(pa.array(inside))
            vectors.append(embedding_matrix(t))
            metas.append(t.drop_columns(["embedding"]))
        start += size
    if not vectors:
        return np.zeros((0, 1), np.float32), pa.table({}), n
    return np.concatenate(vectors), pa.concat_tables(metas), n


def project(
    store: Store,
    max_points: int = MAX_POINTS,
    seed: int = 0,
    parquet: pq.ParquetFile | None = None,
) -> dict[str, Any]:
    """t-SNE (PCA to 50-d first) of up to `max_points` rows sampled with `seed` (`sample`, of
    `parquet` when given); PCA alone below 50 rows. Returns {"method", "points": [{id, x, y,
    label, split, path}]}."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x, meta, n = sample(store, max_points, seed, parquet)
    if not len(x):
        raise StoreError(f"store {store.path} holds no embeddings yet; run `headstart embed`")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
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
    rows = meta.select(["id", "label", "split", "path"]).to_pylist()
    points = [
        {**r, "x": round(float(px), 5), "y": round(float(py), 5)}
        for r, (px, py) in zip(rows, xy, strict=True)
    ]
    return {"method": method, "rows": n, "points": points}


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
