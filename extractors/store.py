"""The embedding store: one directory per (source, backbone), Parquet + manifest + FAISS index.

On-disk layout (the one place it is documented; the README points here):

    <store>/
      manifest.json        backbone, weights, preprocessing, dim, rows, created/updated,
                           source, split seed, labels, dataset fingerprint, index summary
      embeddings.parquet   one row per image:
                             id         int64   first 63 bits of the content SHA-256 (stable)
                             path       string  absolute path of the file
                             sha256     string  hex SHA-256 of the file's bytes
                             label      string  class name, null when unlabelled
                             split      string  train | val | test
                             width      int32   decoded size, EXIF orientation applied
                             height     int32
                             bytes      int64   file size and modification time, used to skip
                             mtime_ns   int64   re-hashing unchanged files on re-runs
                             embedding  fixed_size_list<float32>[dim]  pooled penultimate features
      failures.parquet     files of the source that are not in the store: path, reason
                           (undecodable, unreadable, duplicate content of another path)
      index.faiss          IndexIDMap2(IndexFlatIP) on L2-normalised embeddings; ids == `id`
      heads/               fitted heads (skops) per training run, heads/latest.json -> best
      .lock                held while a writer updates the store

Every file is written to a temporary name and renamed into place, so a reader sees the old or
the new version, never a torn one. The manifest is written last and records the row count and
fingerprint; `ensure_index` rebuilds an index that does not match the Parquet ids.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from extractors import index as faiss_index
from extractors.atomic import atomic_path, write_bytes_atomic
from extractors.backbones import Backbone
from extractors.embed import embed_files
from extractors.images import file_sha256
from extractors.sources import Source, stratified_split

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.parquet"
FAILURES = "failures.parquet"
INDEX = "index.faiss"


class StoreError(ValueError):
    """A store that cannot be used as asked; the message says what to do."""


def schema(dim: int) -> pa.Schema:
    """The Parquet schema of the embeddings table."""
    return pa.schema(
        [
            ("id", pa.int64()),
            ("path", pa.string()),
            ("sha256", pa.string()),
            ("label", pa.string()),
            ("split", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("bytes", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("embedding", pa.list_(pa.float32(), dim)),
        ]
    )


FAILURE_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])


def content_id(sha256_hex: str) -> int:
    """Stable int64 id from a content hash (first 63 bits, so it is never negative)."""
    return int(sha256_hex[:16], 16) >> 1


def slug(text: str) -> str:
    """File-system-safe short name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def default_store_dir(workspace: str | Path, source_root: str, backbone: str) -> Path:
    """data/stores/<source name>-<path hash>__<backbone>: one store per (source, backbone)."""
    tag = hashlib.sha256(str(Path(source_root).resolve()).encode()).hexdigest()[:6]
    return Path(workspace) / "stores" / f"{slug(Path(source_root).stem)}-{tag}__{slug(backbone)}"


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file under a temporary name, fsync it, then rename it into place."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=8192)


@dataclass
class UpdateReport:
    """What one `update` did."""

    store: str
    scanned: int = 0
    embedded: int = 0
    kept: int = 0
    removed: int = 0
    failed: int = 0
    rows: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["failures"] = [list(f) for f in self.failures]
        return d


class Store:
    """A store directory; cheap to open, reads lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()

    # --- reading -------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except FileNotFoundError:
            raise StoreError(
                f"{self.path} is not a headstart store (no {MANIFEST}); "
                "create one with `headstart embed SOURCE --store DIR`"
            ) from None

    def table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The embeddings table (all rows), or an empty table if nothing was embedded yet."""
        path = self.path / EMBEDDINGS
        if not path.exists():
            dim = self.manifest().get("dim", 0) if self.exists else 0
            empty = schema(max(dim, 1)).empty_table()
            return empty.select(list(columns)) if columns else empty
        return pq.read_table(path, columns=list(columns) if columns else None)

    def failures(self) -> pa.Table:
        path = self.path / FAILURES
        return pq.read_table(path) if path.exists() else FAILURE_SCHEMA.empty_table()

    def arrays(self, where_labelled: bool = True) -> tuple[np.ndarray, pa.Table]:
        """(embeddings as float32 matrix, the other columns) for labelled rows by default."""
        table = self.table()
        if where_labelled:
            table = table.filter(pc.is_valid(table["label"]))
        return embedding_matrix(table), table.drop_columns(["embedding"])

    def index(self, mmap: bool = False):
        """The FAISS index (read once), rebuilt first if it does not match the Parquet ids."""
        idx = self.index_if_consistent(mmap=mmap)
        if idx is None:
            self.ensure_index()
            idx = faiss_index.read_index(self.path / INDEX, mmap=mmap)
        return idx

    def index_if_consistent(self, mmap: bool = False):
        """The index on disk when its ids equal the Parquet ids, in order; else None."""
        path = self.path / INDEX
        if not path.exists():
            return None
        ids = self.table(["id"])["id"].to_numpy()
        idx = faiss_index.read_index(path, mmap=mmap)
        if idx.ntotal == len(ids) and np.array_equal(faiss_index.index_ids(idx), ids):
            return idx
        return None

    def check_backbone(self, backbone: str, weights: str | None = None) -> None:
        """Refuse to mix embeddings of two backbones in one store."""
        if not self.exists:
            return
        m = self.manifest()
        if m["backbone"] != backbone or (weights is not None and m["weights"] != weights):
            raise StoreError(
                f"store {self.path} was built with backbone {m['backbone']} ({m['weights']}), "
                f"not {backbone}" + (f" ({weights})" if weights else "") + ". Use another "
                "--store for this backbone, or omit --backbone to keep using the store's own."
            )

    # --- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive writer lock; a second writer is refused with a clear message."""
        self.path.mkdir(parents=True, exist_ok=True)
        fh = open(self.path / ".lock", "a+")  # noqa: SIM115 (held across the yield)
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(
                    f"another headstart process is writing to {self.path}; wait for it to "
                    "finish, or use another --store"
                ) from None
            yield
        finally:
            fh.close()

    def ensure_index(self) -> bool:
        """Rebuild index.faiss when it is missing or its ids differ from the Parquet ids."""
        if self.index_if_consistent() is not None:
            return False
        self._write_index(self.table())
        return True

    def _write_index(self, table: pa.Table) -> None:
        index = faiss_index.build_index(embedding_matrix(table), table["id"].to_numpy())
        faiss_index.write_index(index, self.path / INDEX)

    def update(
        self,
        source: Source,
        backbone: Backbone,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int | None = None,
        progress: bool = True,
    ) -> UpdateReport:
        """Bring the store in line with `source`: embed new or changed files, drop deleted ones.

        Rows of unchanged files (same path and content) are kept as they are, with label and
        given split refreshed from the source; new rows without a given split get a seeded
        stratified split. Then the Parquet, the failures table, the index and the manifest
        are replaced atomically, in that order.
        """
        with self.lock():
            self.check_backbone(backbone.name, backbone.weights)
            report = UpdateReport(store=str(self.path), scanned=len(source.records))
            old = self.table() if (self.path / EMBEDDINGS).exists() else None
            plan = _plan(source, old)
            report.failures.extend(plan.failures)

            new_rows: dict[str, list] = {k: [] for k in schema(backbone.dim).names}
            paths = [r.path for r in plan.to_embed]
            embedded_parts: list[np.ndarray] = []
            for batch in embed_files(backbone, paths, batch_size, num_workers, progress):
                for i, reason in batch.failures:
                    report.failures.append((paths[i], reason))
                for j, i in enumerate(batch.indices):
                    rec = plan.to_embed[i]
                    new_rows["id"].append(content_id(plan.sha[rec.path]))
                    new_rows["path"].append(rec.path)
                    new_rows["sha256"].append(plan.sha[rec.path])
                    new_rows["label"].append(rec.label)
                    new_rows["split"].append(rec.split)
                    new_rows["width"].append(int(batch.widths[j]))
                    new_rows["height"].append(int(batch.heights[j]))
                    new_rows["bytes"].append(plan.stat[rec.path][0])
                    new_rows["mtime_ns"].append(plan.stat[rec.path][1])
                embedded_parts.append(batch.embeddings)
            report.embedded = len(new_rows["id"])

            # Splits for new rows without a given one: stratified among the new rows.
            missing = [i for i, s in enumerate(new_rows["split"]) if s is None]
            if missing:
                assigned = stratified_split(
                    [new_rows["sha256"][i] for i in missing],
                    [new_rows["label"][i] for i in missing],
                    seed=seed,
                )
                for i, s in zip(missing, assigned, strict=True):
                    new_rows["split"][i] = s

            emb = (
                np.concatenate(embedded_parts)
                if embedded_parts
                else np.zeros((0, backbone.dim), np.float32)
            )
            fresh = _table_from_rows(new_rows, emb, backbone.dim)
            kept = plan.kept_table(old, backbone.dim)
            report.kept = kept.num_rows
            report.removed = plan.removed
            table = pa.concat_tables([kept, fresh]).sort_by([("path", "ascending")])
            report.rows = table.num_rows
            report.failed = len(report.failures)

            write_parquet_atomic(table, self.path / EMBEDDINGS)
            write_parquet_atomic(
                pa.table(
                    {
                        "path": [p for p, _ in report.failures],
                        "reason": [r for _, r in report.failures],
                    },
                    schema=FAILURE_SCHEMA,
                ),
                self.path / FAILURES,
            )
            self._write_index(table)  # from the table in hand, not re-read from disk
            self._write_manifest(source, backbone, table, seed, report)
            return report

    def _write_manifest(
        self, source: Source, backbone: Backbone, table: pa.Table, seed: int, report: UpdateReport
    ) -> None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        created = self.manifest().get("created", now) if self.exists else now
        labels = table["label"].drop_null().to_pylist()
        splits = table["split"].to_pylist()
        manifest = {
            "format_version": FORMAT_VERSION,
            "backbone": backbone.name,
            "weights": backbone.weights,
            "preprocessing": backbone.preprocessing,
            "dim": backbone.dim,
            "rows": table.num_rows,
            "labelled_rows": len(labels),
            "classes": sorted(set(labels)),
            "splits": {s: splits.count(s) for s in ("train", "val", "test")},
            "failures": report.failed,
            "fingerprint": fingerprint(table),
            "source": {"root": source.root, "kind": source.kind, "name": source.name},
            "split_seed": seed,
            "index": {"type": "IndexIDMap2(IndexFlatIP)", "metric": "cosine", "ntotal": len(table)},
            "created": created,
            "updated": now,
        }
        write_bytes_atomic(self.path / MANIFEST, json.dumps(manifest, indent=2).encode())


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The `embedding` column as a (rows, dim) float32 matrix, without a Python loop."""
    col = table["embedding"].combine_chunks()
    dim = col.type.list_size
    if len(col) == 0:
        return np.zeros((0, dim), np.float32)
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), dim)


def fingerprint(table: pa.Table) -> str:
    """Dataset fingerprint: hash of the sorted (sha256, label, split) triples."""
    h = hashlib.sha256()
    rows = sorted(
        zip(
            table["sha256"].to_pylist(),
            table["label"].to_pylist(),
            table["split"].to_pylist(),
            strict=True,
        ),
        key=lambda r: r[0],
    )
    for sha, label, split in rows:
        h.update(f"{sha}\t{label}\t{split}\n".encode())
    return h.hexdigest()[:16]


def _table_from_rows(rows: dict[str, list], emb: np.ndarray, dim: int) -> pa.Table:
    sch = schema(dim)
    cols = {k: pa.array(v, type=sch.field(k).type) for k, v in rows.items() if k != "embedding"}
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(
        pa.array(emb.reshape(-1), type=pa.float32()), dim
    )
    return pa.table(cols, schema=sch)


@dataclass
class _Plan:
    to_embed: list = field(default_factory=list)
    keep: dict[str, Any] = field(default_factory=dict)  # path -> (label, split|None)
    sha: dict[str, str] = field(default_factory=dict)
    stat: dict[str, tuple[int, int]] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    removed: int = 0

    def kept_table(self, old: pa.Table | None, dim: int) -> pa.Table:
        if old is None or not self.keep:
            return schema(dim).empty_table()
        mask = pc.is_in(old["path"], value_set=pa.array(list(self.keep)))
        kept = old.filter(mask)
        paths = kept["path"].to_pylist()
        old_splits = kept["split"].to_pylist()
        labels = [self.keep[p][0] for p in paths]
        splits = [self.keep[p][1] or s for p, s in zip(paths, old_splits, strict=True)]
        fresh_cols = {
            "label": pa.array(labels, pa.string()),
            "split": pa.array(splits, pa.string()),
            "bytes": pa.array([self.stat[p][0] for p in paths], pa.int64()),
            "mtime_ns": pa.array([self.stat[p][1] for p in paths], pa.int64()),
        }
        for name, col in fresh_cols.items():
            kept = kept.set_column(kept.schema.get_field_index(name), name, col)
        return kept


def _plan(source: Source, old: pa.Table | None) -> _Plan:
    """Hash the source (reusing stored hashes of files whose size and mtime are unchanged) and
    decide per file: keep its row, embed it, or record it as a failure or duplicate."""
    plan = _Plan()
    previous: dict[str, tuple[str, int, int]] = {}
    if old is not None:
        for p, s, b, m in zip(
            old["path"].to_pylist(),
            old["sha256"].to_pylist(),
            old["bytes"].to_pylist(),
            old["mtime_ns"].to_pylist(),
            strict=True,
        ):
            previous[p] = (s, b, m)
    first_path_of: dict[str, str] = {}
    for rec in sorted(source.records, key=lambda r: r.path):
        try:
            st = os.stat(rec.path)
            prev = previous.get(rec.path)
            if prev and prev[1] == st.st_size and prev[2] == st.st_mtime_ns:
                sha = prev[0]
            else:
                sha = file_sha256(rec.path)
        except FileNotFoundError:
            plan.failures.append((rec.path, "file not found (moved or deleted after listing?)"))
            continue
        except PermissionError:
            plan.failures.append((rec.path, "permission denied: the file is not readable"))
            continue
        except OSError as exc:
            plan.failures.append((rec.path, f"cannot read file: {exc}"))
            continue
        if sha in first_path_of:
            plan.failures.append((rec.path, f"duplicate content of {first_path_of[sha]}"))
            continue
        first_path_of[sha] = rec.path
        plan.sha[rec.path] = sha
        plan.stat[rec.path] = (st.st_size, st.st_mtime_ns)
        if rec.path in previous and previous[rec.path][0] == sha:
            plan.keep[rec.path] = (rec.label, rec.split)
        else:
            plan.to_embed.append(rec)
    plan.removed = sum(1 for p in previous if p not in plan.sha)
    return plan
