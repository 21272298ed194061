"""The commit of an update: kept and staged rows merged into a new embeddings file, streaming
(row group by row group), then the failures table and the manifest. Each file is written to a
temporary name and renamed into place; the caller holds the store's lock and refreshes the
index between the rows and the manifest."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from extractors.backbones import Backbone
from extractors.common import ROW_GROUP, atomic_path, write_bytes_atomic, write_parquet_atomic
from extractors.layout import (
    EMBEDDINGS,
    FAILURE_SCHEMA,
    FAILURES,
    FORMAT_VERSION,
    MANIFEST,
    fingerprint,
)
from extractors.plan import UpdatePlan
from extractors.sources import Source, stratified_split


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


def new_splits(plan: UpdatePlan, new_paths: list[str], seed: int) -> dict[str, str | None]:
    """The split of each new row: the one the source gives, else a seeded stratified one."""
    given = [plan.staged[p][1] for p in new_paths]
    splits = dict(zip(new_paths, given, strict=True))
    auto = [i for i, g in enumerate(given) if g is None]
    if auto:
        assigned = stratified_split(
            [plan.sha[new_paths[i]] for i in auto],
            [plan.staged[new_paths[i]][0] for i in auto],
            seed,
        )
        splits.update({new_paths[i]: s for i, s in zip(auto, assigned, strict=True)})
    return splits


def merge_rows(
    folder: Path, sch: pa.Schema, plan: UpdatePlan, parts: list[Path], staged: pa.Table, seed: int
) -> Merged:
    """Write `folder`/embeddings.parquet anew: the old file's kept rows (labels and given
    splits refreshed from the source), then each new path's first staged row whose content
    is still the planned one, in bounded memory."""
    use = pc.is_in(staged["path"], value_set=pa.array(list(plan.staged), pa.string()))
    staged = staged.filter(use) if staged.num_rows else staged
    new_paths = list(dict.fromkeys(staged["path"].to_pylist()))  # one row per path, first kept
    splits = new_splits(plan, new_paths, seed)
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


def write_failures(folder: Path, failures: list[tuple[str, str]]) -> None:
    """failures.parquet: every file of the source that is not a row, with its reason."""
    table = pa.table(
        {"path": [p for p, _ in failures], "reason": [r for _, r in failures]},
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
        "fingerprint": fingerprint(rows),
        "source": {"root": source.root, "kind": source.kind, "name": source.name},
        "split_seed": what.seed,
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
