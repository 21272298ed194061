"""The commit of an update: kept and staged rows merged into a new embeddings file, streaming
(row group by row group), then the failures table and the manifest. Each file is written to a
temporary name and renamed into place; the caller holds the store's lock and refreshes the
index between the rows and the manifest."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from extractors.common import (
    ROW_GROUP,
    atomic_path,
    normalize,
    write_bytes_atomic,
    write_parquet_atomic,
)
from extractors.embedding.sources import Source
from extractors.store.grouping import (
    Edge,
    Grouping,
    assign_splits,
    exact_search,
    group_rows,
    knn_edges,
)
from extractors.store.layout import (
    EMBEDDINGS,
    FAILURE_SCHEMA,
    FAILURES,
    FORMAT_VERSION,
    MANIFEST,
    content_id,
    embedding_matrix,
    fingerprint,
)
from extractors.store.plan import UpdatePlan

if TYPE_CHECKING:
    from extractors.embedding.backbones import Backbone


@dataclass
class Merged:
    """What the merge wrote: rows kept from the old file, rows in all, and every row's
    (sha256, label, split) for the fingerprint and the manifest."""

    kept: int = 0
    rows: int = 0
    meta: dict[str, list] = field(default_factory=lambda: {"sha256": [], "label": [], "split": []})

    def table(self) -> pa.Table:
        return pa.table(self.meta)


class _Writer:
    """Appends rows to the new embeddings file, each path once, with its label, split and stat
    from the plan."""

    def __init__(self, writer: pq.ParquetWriter, sch: pa.Schema, plan: UpdatePlan):
        self.writer, self.schema, self.plan = writer, sch, plan
        self.written: set[str] = set()
        self.merged = Merged()

    def emit(self, table: pa.Table, labels: list, splits: list) -> None:
        keep = [p not in self.written for p in table["path"].to_pylist()]
        if not all(keep):
            table = table.filter(pa.array(keep))
            labels = [x for x, k in zip(labels, keep, strict=True) if k]
            splits = [x for x, k in zip(splits, keep, strict=True) if k]
        if not table.num_rows:
            return
        paths = table["path"].to_pylist()
        table = _set_columns(
            table,
            label=pa.array(labels, pa.string()),
            split=pa.array(splits, pa.string()),
            bytes=pa.array([self.plan.stat[p][0] for p in paths], pa.int64()),
            mtime_ns=pa.array([self.plan.stat[p][1] for p in paths], pa.int64()),
        )
        self.writer.write_table(table.select(self.schema.names).cast(self.schema), ROW_GROUP)
        self.written.update(paths)
        self.merged.rows = len(self.written)
        self.merged.meta["sha256"] += table["sha256"].to_pylist()
        self.merged.meta["label"] += labels
        self.merged.meta["split"] += splits


def new_paths(plan: UpdatePlan, staged: pa.Table) -> list[str]:
    """The paths that become new rows: those the plan stages, one row each (the first)."""
    use = pc.is_in(staged["path"], value_set=pa.array(list(plan.staged), pa.string()))
    staged = staged.filter(use) if staged.num_rows else staged
    return list(dict.fromkeys(staged["path"].to_pylist()))


@dataclass
class Committed:
    """The store's rows before this update that it keeps (id, path, label, split), and a
    search over their vectors (scores, ids), for new rows to join their groups."""

    rows: pa.Table
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None


def new_splits(
    plan: UpdatePlan,
    paths: list[str],
    parts: list[Path],
    seed: int,
    grouping: Grouping,
    committed: Committed | None = None,
) -> tuple[dict[str, str | None], dict[str, Any]]:
    """The split of each new row, and what the grouping did (extractors/store/grouping.py): the one
    the source gives, else a seeded stratified one that keeps near-duplicate groups (and a
    manifest's groups) in one split, committed rows' groups included."""
    given = {p: plan.staged[p][1] for p in paths}
    auto = [p for p in paths if given[p] is None]
    record: dict[str, Any] = grouping.record() | {"groups": 0, "grouped_rows": 0, "joined": 0}
    if not auto:
        return given, record
    ids = {p: content_id(plan.sha[p]) for p in paths}
    labels = {ids[p]: plan.staged[p][0] for p in paths}
    fixed = {ids[p]: s for p, s in given.items() if s is not None}
    keys = {ids[p]: plan.sha[p] for p in paths}
    edges: list[Edge] = []
    same: dict[int, str] = {}
    sizes = Counter(lab for lab in labels.values() if lab is not None)
    if grouping.by != "none":
        same = {ids[p]: plan.groups[p] for p in paths if p in plan.groups}
        vec_ids, vectors = _new_vectors(parts, plan, paths)
        auto_ids = {ids[p] for p in auto}
        queries = np.isin(vec_ids, np.fromiter(auto_ids, np.int64, len(auto_ids)))
        q_ids, q_vectors = vec_ids[queries], vectors[queries]
        edges = knn_edges(exact_search(vectors, vec_ids), q_vectors, q_ids, grouping.threshold)
        if committed is not None and committed.rows.num_rows:
            old = committed.rows.to_pydict()
            old_split = dict(zip(old["id"], old["split"], strict=True))
            old_path = dict(zip(old["id"], old["path"], strict=True))
            sizes.update(plan.keep[p][0] for p in old["path"] if plan.keep[p][0] is not None)
            if committed.search is not None:
                found = knn_edges(committed.search, q_vectors, q_ids, grouping.threshold)
                edges += [e for e in found if e[1] in old_split]
            keyed = set(same.values())
            for i, p in zip(old["id"], old["path"], strict=True):
                if plan.groups.get(p) in keyed:
                    same[i] = plan.groups[p]
            for i in {e[1] for e in edges} | set(same):
                if i in old_split:
                    fixed[i] = old_split[i]
                    labels.setdefault(i, plan.keep[old_path[i]][0])
    groups = group_rows(labels, edges, grouping.threshold, same, sizes)
    assigned, joined = assign_splits(groups, labels, keys, fixed, seed)
    splits = {p: given[p] or assigned[ids[p]] for p in paths}
    multi = [g for g in groups.members if len(g) > 1]
    record |= {
        "groups": len(multi),
        "grouped_rows": sum(len(g) for g in multi),
        "joined": joined,
        "regrouped": groups.regrouped,
        "note": groups.note(grouping.threshold),
    }
    return splits, record


def _new_vectors(
    parts: list[Path], plan: UpdatePlan, paths: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, normalised embeddings) of the new rows, read from the staged parts."""
    wanted = set(paths)
    seen: set[str] = set()
    ids, vectors = [], []
    for part in parts:
        t = pq.read_table(part, columns=["id", "path", "sha256", "embedding"])
        keep = []
        for p, h in zip(t["path"].to_pylist(), t["sha256"].to_pylist(), strict=True):
            ok = p in wanted and p not in seen and plan.sha.get(p) == h
            keep.append(ok)
            if ok:
                seen.add(p)
        t = t.filter(pa.array(keep, pa.bool_()))
        if t.num_rows:
            ids.append(t["id"].to_numpy())
            vectors.append(normalize(embedding_matrix(t)))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, 1), np.float32)
    return np.concatenate(ids), np.concatenate(vectors)


def merge_rows(
    folder: Path,
    sch: pa.Schema,
    plan: UpdatePlan,
    parts: list[Path],
    paths: list[str],
    splits: dict[str, str | None],
) -> Merged:
    """Write `folder`/embeddings.parquet anew: the old file's kept rows (labels and given
    splits refreshed from the source), then each new path's first staged row whose content
    is still the planned one (`paths`, see `new_paths`), with its split from `splits`, in bounded
    memory."""
    new_paths = paths
    with atomic_path(folder / EMBEDDINGS) as tmp:
        out = _Writer(pq.ParquetWriter(tmp, sch, compression="zstd"), sch, plan)
        try:
            if plan.keep:
                for rb in pq.ParquetFile(folder / EMBEDDINGS).iter_batches(ROW_GROUP):
                    t = pa.Table.from_batches([rb])
                    t = t.filter(pc.is_in(t["path"], value_set=pa.array(list(plan.keep))))
                    ps, old_splits = t["path"].to_pylist(), t["split"].to_pylist()
                    labels = [plan.keep[p][0] for p in ps]
                    given = [plan.keep[p][1] or s for p, s in zip(ps, old_splits, strict=True)]
                    out.emit(t, labels, given)
            out.merged.kept = len(out.written)
            for part in parts:
                t = pq.read_table(part)
                t = t.filter(pc.is_in(t["path"], value_set=pa.array(new_paths, pa.string())))
                cols = zip(t["path"].to_pylist(), t["sha256"].to_pylist(), strict=True)
                t = t.filter(pa.array([plan.sha.get(p) == h for p, h in cols], pa.bool_()))
                ps = t["path"].to_pylist()
                out.emit(t, [plan.staged[p][0] for p in ps], [splits[p] for p in ps])
        finally:
            out.writer.close()
    return out.merged


def write_failures(
    folder: Path,
    failures: list[tuple[str, str]],
    stats: dict[str, tuple[int, int]] | None = None,
) -> None:
    """failures.parquet: every file of the source that is not a row, with its reason, and the
    (bytes, mtime_ns) of those in `stats` (duplicates), null for the others."""
    stats = stats or {}
    got = [stats.get(p) for p, _ in failures]
    table = pa.table(
        {
            "path": [p for p, _ in failures],
            "reason": [r for _, r in failures],
            "bytes": [s[0] if s else None for s in got],
            "mtime_ns": [s[1] if s else None for s in got],
        },
        schema=FAILURE_SCHEMA,
    )
    write_parquet_atomic(table, folder / FAILURES)


@dataclass(frozen=True)
class ManifestInputs:
    """What the manifest records of one update besides the rows themselves."""

    source: Source
    backbone: Backbone
    seed: int
    failed: int
    index: dict[str, Any]
    split_groups: dict[str, Any] = field(default_factory=dict)
    duplicates: int = 0  # files with the bytes of another (in failures.parquet, not failed)


def write_manifest(folder: Path, rows: pa.Table, what: ManifestInputs) -> None:
    """manifest.json, written last: backbone, counts, classes, splits, fingerprint, index."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    try:
        created = json.loads((folder / MANIFEST).read_text()).get("created", now)
    except FileNotFoundError:
        created = now
    bb, source = what.backbone, what.source
    labels = rows["label"].drop_null().to_pylist()
    splits = rows["split"].to_pylist()
    manifest = {
        "format_version": FORMAT_VERSION,
        "backbone": bb.name,
        "weights": bb.weights,
        "preprocessing": bb.preprocessing,
        "dim": bb.dim,
        "rows": rows.num_rows,
        "labelled_rows": len(labels),
        "classes": sorted(set(labels)),
        "splits": {s: splits.count(s) for s in ("train", "val", "test")},
        "failures": what.failed,
        "duplicates": what.duplicates,
        "fingerprint": fingerprint(rows),
        "source": {"root": source.root, "kind": source.kind, "name": source.name},
        "split_seed": what.seed,
        "split_groups": {k: v for k, v in what.split_groups.items() if k != "note"},
        "layers": {col: {"module": bb.layers[col], "dim": d} for col, d in bb.layer_dims.items()},
        "index": what.index,
        "created": created,
        "updated": now,
    }
    write_bytes_atomic(folder / MANIFEST, json.dumps(manifest, indent=2).encode())


def _set_columns(table: pa.Table, **columns: pa.Array) -> pa.Table:
    for name, col in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, col)
    return table
