"""Near-duplicate stage: groups of images whose embeddings are almost the same, via FAISS range
search on the store's index (cosine similarity at or above a threshold).

Exact duplicates (same bytes) never reach the store: they are listed in its failures table as
"duplicate content of …". This finds the rest: re-encoded, resized, lightly cropped or
recoloured copies, which leak between train and test splits and inflate a class. Groups are the
connected components of the "similarity >= threshold" graph. Memory: the index plus one batch
of query vectors; the rows are read one Parquet row group at a time.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from extractors.common import atomic_path, normalize
from extractors.index.ann import flat_copy
from extractors.store.grouping import (
    SPLIT_ORDER,
    Grouping,
    Groups,
    components,
    group_rows,
    knn_edges,
)
from extractors.store.layout import EMBEDDINGS, embedding_matrix
from extractors.store.store import Store, StoreError

GROUP_SCHEMA = pa.schema(
    [
        ("group", pa.int32()),
        ("size", pa.int32()),
        ("id", pa.int64()),
        ("path", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("similarity", pa.float32()),  # to the group's first member (1.0 for itself)
    ]
)


def near_duplicate_groups(store: Store, threshold: float = 0.95) -> pa.Table:
    """One row per image that has a near-duplicate, grouped; biggest groups first.

    `threshold` is a cosine similarity in (0, 1]: 0.95 catches re-encodes and resizes of one
    photo; lower values start to group different photos of one scene.
    """
    if not 0 < threshold <= 1:
        raise StoreError(f"threshold must be a cosine similarity in (0, 1], not {threshold}")
    path = store.path / EMBEDDINGS
    if not path.exists():
        raise StoreError(f"store {store.path} holds no embeddings yet; run `headstart embed`")
    ann = store.index()
    # Range search needs an exact index: the store's own when flat, else a copy in memory.
    index = ann.index if ann.kind == "flat" else flat_copy(store.batches(), ann.index.d)
    edges: list[tuple[int, int, float]] = []
    reader = pq.ParquetFile(path)
    for batch in reader.iter_batches(columns=["id", "embedding"], batch_size=4096):
        table = pa.Table.from_batches([batch])
        # Float32 rounding puts a vector's similarity to itself a hair under 1.
        lims, _, hits = index.range_search(
            normalize(embedding_matrix(table)), min(threshold, 1 - 1e-6)
        )
        for row, qid in enumerate(table["id"].to_numpy()):
            for other in hits[lims[row] : lims[row + 1]]:
                if other != qid:
                    edges.append((int(qid), int(other), 1.0))
    linked = {i for e in edges for i in e[:2]}
    meta = {}  # second, cheap pass: the rows of grouped images only, without vectors
    for batch in reader.iter_batches(columns=["id", "path", "label", "split"], batch_size=65536):
        meta.update({r["id"]: r for r in batch.to_pylist() if r["id"] in linked})
    groups = [sorted(g, key=lambda i: meta[i]["path"]) for g in components(linked, edges, 0.0)]
    groups.sort(key=lambda g: (-len(g), meta[g[0]]["path"]))
    rows = []
    for n, group in enumerate(groups):
        vectors = np.stack([index.reconstruct(i) for i in group])  # normalised at indexing
        for i, sim in zip(group, vectors @ vectors[0], strict=True):
            rows.append({"group": n, "size": len(group), **meta[i], "similarity": float(sim)})
    return pa.Table.from_pylist(rows, schema=GROUP_SCHEMA)


def write_groups(table: pa.Table, out: str | Path) -> Path:
    """Write the groups as Parquet, or CSV when the name ends in .csv (atomically)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        if out.suffix.lower() == ".csv":
            import pyarrow.csv as pcsv

            pcsv.write_csv(table, tmp)
        else:
            pq.write_table(table, tmp)
    return out


LEAK_CHECK_MAX_ROWS = 200_000  # above this a training does not range-search the whole store


def leaks(groups: pa.Table) -> dict[str, int]:
    """How the near-duplicate groups straddle splits: groups with members in more than one
    split, the images in them, and those of their images in the test split (each a test
    image with a near-twin the heads trained or were chosen on)."""
    by_group: dict[int, list[dict]] = {}
    for r in groups.select(["group", "split"]).to_pylist():
        by_group.setdefault(r["group"], []).append(r)
    leaky = [g for g in by_group.values() if len({r["split"] for r in g}) > 1]
    return {
        "leaky_groups": len(leaky),
        "leaky_images": sum(len(g) for g in leaky),
        "leaky_test_images": sum(1 for g in leaky for r in g if r["split"] == "test"),
    }


def store_grouping(store: Store) -> Grouping:
    """The grouping the store's split used (its manifest), the default for older stores."""
    kept = store.manifest().get("split_groups") or {}
    if kept.get("by") == "none":
        return Grouping("none")
    return Grouping(threshold=kept.get("threshold") or Grouping().threshold)


def split_groups(store: Store, grouping: Grouping | None = None) -> tuple[Groups, pa.Table]:
    """The groups a split keeps together over the whole store (its own grouping unless
    given: near-duplicate links, too-large guard included, as each update applies them), and
    the rows' id, path, label and split. A manifest's group keys are the source's, not the
    store's: they are not part of this."""
    grouping = grouping or store_grouping(store)
    labels, edges, meta = _links(store, grouping)
    if grouping.by == "none" or not meta.num_rows:
        return Groups([[i] for i in labels]), meta
    return group_rows(labels, edges, grouping.threshold), meta


def _links(store: Store, grouping: Grouping) -> tuple[dict[int, Any], list, pa.Table]:
    """The rows' labels, their near-duplicate links at the grouping's threshold (none for
    `by="none"`), and the rows' id, path, label and split."""
    meta = store.table(["id", "path", "label", "split"])
    labels = dict(zip(meta["id"].to_pylist(), meta["label"].to_pylist(), strict=True))
    if grouping.by == "none" or not meta.num_rows:
        return labels, [], meta
    index = flat_copy(store.batches(), store.manifest()["dim"])
    search = lambda q, k: index.search(q, min(k, index.ntotal))  # noqa: E731
    edges = []
    for vectors, ids in store.batches():
        edges += knn_edges(search, vectors, ids, grouping.threshold)
    return labels, edges, meta


def leak_check(store: Store, grouping: Grouping) -> dict[str, Any]:
    """Leaks measured at the grouping's own threshold: the near-duplicate groups (connected
    components of the links, before the too-large guard of extractors/store/grouping.py cuts
    any) whose images sit in more than one split (`leaks`); of those, the ones the guard cuts
    (`too_large_groups`: too large to keep in one split, so the split cannot be leak-free);
    and the groups `dedup --fix-splits` would move (`groups_to_move`, the guard's pieces that
    span splits). `twinned_test_images` counts the test images linked directly to a train or
    val image: a chain of similar images (handwritten digits) makes one large group whose test
    images are not all near-twins of training images."""
    labels, edges, meta = _links(store, grouping)
    base = Groups(sorted(components(labels, edges, grouping.threshold), key=lambda g: g[0]))
    found = leaks(groups_table(base, meta))
    guarded = group_rows(labels, edges, grouping.threshold)
    split_of = dict(zip(meta["id"].to_pylist(), meta["split"].to_pylist(), strict=True))
    piece_of = guarded.of()
    spanning = [g for g in base.members if len({split_of[i] for i in g}) > 1]
    splits = Counter(s for s in split_of.values() if s)
    twinned = {
        i
        for a, b, _ in edges
        for i, j in ((a, b), (b, a))
        if split_of.get(i) == "test" and split_of.get(j) not in (None, "test")
    }
    return found | {
        # test images with a near-twin of their own in train or val: pairs, not chains
        "twinned_test_images": len(twinned),
        "too_large_groups": sum(len({piece_of[i] for i in g}) > 1 for g in spanning),
        "groups_to_move": len({m["group"] for m in split_moves(guarded, meta)}),
        "threshold": grouping.threshold,
        "split_sizes": {s: splits.get(s, 0) for s in SPLIT_ORDER},
    }


def groups_table(groups: Groups, meta: pa.Table) -> pa.Table:
    """The groups of more than one row, one row per member (group, id, path, label, split)."""
    of = {i: g for g, group in enumerate(groups.members) if len(group) > 1 for i in group}
    rows = [dict(r, group=of[r["id"]]) for r in meta.to_pylist() if r["id"] in of]
    names = ["group", "id", "path", "label", "split"]
    return (
        pa.Table.from_pylist([{k: r[k] for k in names} for r in rows])
        if rows
        else pa.table({"group": pa.array([], pa.int32()), "split": pa.array([], pa.string())})
    )


def split_moves(groups: Groups, meta: pa.Table) -> list[dict]:
    """The moves that put each group spanning splits into one: the split most of its rows
    outside test have (ties: train, then val), so test rows move out, never in."""
    split_of = dict(zip(meta["id"].to_pylist(), meta["split"].to_pylist(), strict=True))
    path_of = dict(zip(meta["id"].to_pylist(), meta["path"].to_pylist(), strict=True))
    moves = []
    for n, group in enumerate(groups.members):
        splits = [split_of[i] for i in group]
        if len(set(splits)) < 2:
            continue
        outside = [s for s in splits if s != "test"]
        target = min(set(outside), key=lambda s: (-outside.count(s), SPLIT_ORDER.index(s)))
        moves += [
            {"id": i, "path": path_of[i], "group": n, "from": split_of[i], "to": target}
            for i in group
            if split_of[i] != target
        ]
    return moves
