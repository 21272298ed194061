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
                             emb_<module> fixed_size_list<float32>  pooled features of the
                                        extra layers asked for with --layers (manifest "layers")
      failures.parquet     files of the source that are not in the store: path, reason
                           (undecodable, unreadable, duplicate content of another path)
      staging/             part-NNNNNN.parquet rows embedded by an update that has not committed
                           yet, same schema, split null unless given; staging.json its backbone.
                           A re-run after a crash reuses them; removed after the commit.
      index.faiss          FAISS index on L2-normalised embeddings, ids == `id`; its kind (flat,
                           hnsw, ivf_flat, ivf_pq), why it was chosen, the tuned search
                           parameters and the recall curve are the manifest's "index" entry
                           (extractors/indexing.py)
      vectors.f32          ivf_pq only: normalised float32 rows for exact re-ranking, read
      vector_ids.npy       memory-mapped; the ids file says which id each row holds
      heads/               fitted heads (skops) per training run, heads/latest.json -> best
      .lock                held while a writer updates the store

Every file is written to a temporary name and renamed into place, so a reader sees the old or
the new version, never a torn one. The manifest is written last and records the row count and
fingerprint; `ensure_index` rebuilds an index that does not match the Parquet ids, and `verify`
lists anything on disk that is not sound.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import queue
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from extractors import compiled, indexing
from extractors import index as faiss_index
from extractors.atomic import atomic_path, write_bytes_atomic
from extractors.backbones import Backbone
from extractors.embed import EmbeddedBatch, EmbedStats, embed_files
from extractors.images import file_sha256
from extractors.indexing import IndexSettings
from extractors.sources import Source, stratified_split

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.parquet"
FAILURES = "failures.parquet"
INDEX = faiss_index.INDEX_FILE
STAGING = "staging"
CHECKPOINT_ROWS = 1024  # rows per staging part: at most this much work is redone after a crash
ROW_GROUP = 4096  # rows per Parquet row group in embeddings.parquet


class StoreError(ValueError):
    """A store that cannot be used as asked; the message says what to do."""


class StoreBusy(StoreError):
    """Another process holds the store's writer lock: try again when it is done."""


def schema(dim: int, layers: dict[str, int] | None = None) -> pa.Schema:
    """The Parquet schema of the embeddings table; `layers` adds {column: dim} feature columns."""
    extra = [(col, pa.list_(pa.float32(), d)) for col, d in (layers or {}).items()]
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
            *extra,
        ]
    )


META_COLUMNS = ["id", "path", "sha256", "label", "split", "width", "height", "bytes", "mtime_ns"]


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
    resumed: int = 0  # rows reused from the staging/ parts of an interrupted run
    model_path: str = ""  # how the network ran: compiled or eager, and why
    failures: list[tuple[str, str]] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)  # images/s and ms per image per stage

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["failures"] = [list(f) for f in self.failures]
        return d


@dataclass(frozen=True)
class Pending:
    """One file an update has to embed, with what the plan already knows of it."""

    path: str
    sha256: str
    label: str | None
    split: str | None
    bytes: int
    mtime_ns: int


# An engine embeds an update's pending files into staging parts (files in the staging folder,
# each renamed into place whole) and returns the (path, reason) failures. The local one is
# `LocalEngine`; flows/engine.py shards the files over a Dask cluster with `write_shard`.
Engine = Callable[[Path, Backbone, list[Pending], EmbedStats], list[tuple[str, str]]]


@dataclass
class LocalEngine:
    """Embed in this process: decode threads feed the model, a background thread writes parts
    of `checkpoint_rows` rows (so a killed run redoes at most that much)."""

    batch_size: int = 32
    num_workers: int | None = None
    progress: bool = True
    fast_decode: bool = True
    checkpoint_rows: int = CHECKPOINT_ROWS
    compile_model: bool | None = None  # None: extractors.compiled.decide from the job's size

    def __call__(
        self, staging_dir: Path, backbone: Backbone, pending: list[Pending], stats: EmbedStats
    ) -> list[tuple[str, str]]:
        use, why = compiled.decide(backbone, self.batch_size, len(pending), self.compile_model)
        if use and not backbone.compiled:
            backbone.compile(self.batch_size)
        stats.path = why if backbone.compiled or not use else "eager (compiling failed)"
        sch = schema(backbone.dim, backbone.layer_dims)
        failures: list[tuple[str, str]] = []
        paths = [p.path for p in pending]
        with _StagingWriter(staging_dir, sch, self.checkpoint_rows, stats) as writer:
            for batch in embed_files(
                backbone,
                paths,
                self.batch_size,
                self.num_workers,
                self.progress,
                stats=stats,
                fast_decode=self.fast_decode,
            ):
                failures.extend((paths[i], reason) for i, reason in batch.failures)
                if len(batch.indices):
                    writer.put(_batch_table(batch, pending, sch))
        return failures


def write_shard(
    staging_dir: str | Path,
    backbone: Backbone,
    pending: list[Pending],
    batch_size: int = 32,
    num_workers: int | None = 0,
    fast_decode: bool = True,
    stats: EmbedStats | None = None,
) -> list[tuple[str, str]]:
    """Embed one shard of an update into one staging part and return its failures.

    The part is named after the shard's content hashes and renamed into place whole, so a
    shard that runs twice (its worker died after writing) replaces the part with the same
    rows, and a shard whose worker died before writing leaves nothing behind."""
    sch = schema(backbone.dim, backbone.layer_dims)
    key = hashlib.sha256("".join(sorted(p.sha256 for p in pending)).encode()).hexdigest()[:20]
    paths = [p.path for p in pending]
    tables, failures = [], []
    for batch in embed_files(
        backbone, paths, batch_size, num_workers, False, stats=stats, fast_decode=fast_decode
    ):
        failures.extend((paths[i], reason) for i, reason in batch.failures)
        if len(batch.indices):
            tables.append(_batch_table(batch, pending, sch))
    if tables:
        with atomic_path(Path(staging_dir) / f"shard-{key}.parquet") as tmp:
            pq.write_table(pa.concat_tables(tables), tmp, compression="zstd")
    return failures


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
            m = self.manifest() if self.exists else {}
            layers = {c: v["dim"] for c, v in m.get("layers", {}).items()}
            empty = schema(max(m.get("dim", 0), 1), layers).empty_table()
            return empty.select(list(columns)) if columns else empty
        return pq.read_table(path, columns=list(columns) if columns else None)

    def failures(self) -> pa.Table:
        path = self.path / FAILURES
        return pq.read_table(path) if path.exists() else FAILURE_SCHEMA.empty_table()

    def features(self) -> list[str]:
        """Feature columns: `embedding` (penultimate) and any `--layers` columns."""
        return ["embedding", *self.manifest().get("layers", {})] if self.exists else ["embedding"]

    def arrays(
        self, where_labelled: bool = True, feature: str = "embedding"
    ) -> tuple[np.ndarray, pa.Table]:
        """(one feature column as a float32 matrix, the metadata) for labelled rows by default."""
        if feature not in self.features():
            raise StoreError(
                f"store {self.path} has no feature column {feature!r}; it has "
                f"{', '.join(self.features())} (add layers with `headstart embed --layers`)"
            )
        table = self.table([*META_COLUMNS, feature])
        if where_labelled:
            table = table.filter(pc.is_valid(table["label"]))
        return embedding_matrix(table, feature), table.drop_columns([feature])

    def index(self, mmap: bool = False) -> faiss_index.AnnIndex:
        """The FAISS index with its tuned search parameters, rebuilt first if it does not
        match the Parquet ids. `mmap=True` maps it read-only, shared between processes."""
        idx = self.index_if_consistent(mmap=mmap)
        if idx is None:
            self.reindex(rebuild=True)
            idx = indexing.open_index(self.path, self.manifest().get("index"), mmap=mmap)
        return idx

    def index_if_consistent(self, mmap: bool = False) -> faiss_index.AnnIndex | None:
        """The index on disk when it holds exactly the Parquet ids; else None."""
        if not (self.path / INDEX).exists():
            return None
        ids = self.table(["id"])["id"].to_numpy()
        entry = self.manifest().get("index") if self.exists else None
        idx = indexing.open_index(self.path, entry, mmap=mmap)
        return idx if indexing.consistent(idx, ids) else None

    def batches(self, rows: int = ROW_GROUP) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(embeddings, ids) of every row, one batch at a time (memory: one batch)."""
        path = self.path / EMBEDDINGS
        if not path.exists():
            return
        for rb in pq.ParquetFile(path).iter_batches(rows, columns=["id", "embedding"]):
            t = pa.Table.from_batches([rb])
            yield embedding_matrix(t), t["id"].to_numpy()

    def verify(self) -> list[str]:
        """Problems found on disk (empty when sound): unreadable files, duplicate ids or paths,
        an index whose ids differ from the Parquet ids, a manifest that disagrees."""
        problems: list[str] = []
        try:
            meta = self.table(["id", "path"])
        except (OSError, pa.ArrowException) as exc:
            return [f"{EMBEDDINGS} is unreadable: {exc}"]
        ids, paths = meta["id"].to_numpy(), meta["path"].to_pylist()
        if len(np.unique(ids)) != len(ids):
            problems.append(f"{len(ids) - len(np.unique(ids))} duplicate ids")
        if len(set(paths)) != len(paths):
            problems.append(f"{len(paths) - len(set(paths))} duplicate paths")
        try:
            if self.index_if_consistent() is None:
                problems.append(f"{INDEX} is missing or its ids differ from the Parquet ids")
        except RuntimeError as exc:
            problems.append(f"{INDEX} is unreadable: {exc}")
        if self.exists and self.manifest().get("rows") != len(ids):
            problems.append("manifest row count differs from the Parquet file")
        return problems

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

    def check_layers(self, layer_dims: dict[str, int]) -> None:
        """Refuse to add rows whose extra layer columns differ from the store's."""
        if not self.exists:
            return
        have = {c: v["dim"] for c, v in self.manifest().get("layers", {}).items()}
        if have != dict(layer_dims):
            raise StoreError(
                f"store {self.path} holds layer columns {sorted(have) or 'none'}, not "
                f"{sorted(layer_dims) or 'none'}. Omit --layers to keep the store's own, or "
                "use another --store for a different set of layers."
            )

    def unchanged(self, source: Source, backbone: str, layers: Sequence[str] | None = None) -> bool:
        """True when an update from `source` would leave the store exactly as it is: built
        with `backbone` (and `layers`, None = the store's own), from the same source, every
        file of it already a row with the same size, modification time, label and given
        split, no row left over, no failed file to retry, nothing staged, the index in line.
        Reads only, and needs no model: an unchanged scheduled run costs a listing and a few
        `stat` calls."""
        if not self.exists or (self.path / STAGING).exists():
            return False
        m = self.manifest()
        own_layers = [v["module"] for v in m.get("layers", {}).values()]
        src = {"root": source.root, "kind": source.kind, "name": source.name}
        if (
            m["backbone"] != backbone
            or (layers is not None and list(layers) != own_layers)
            or m.get("source") != src
            or m.get("failures")
            or m.get("rows") != len(source.records)
            or len({r.path for r in source.records}) != len(source.records)
        ):
            return False
        old = self._metadata()
        if old is None:
            return not source.records
        cols = [old[c].to_pylist() for c in ("path", "label", "split", "bytes", "mtime_ns")]
        rows = {p: (lab, s, b, t) for p, lab, s, b, t in zip(*cols, strict=True)}
        for rec in source.records:
            row = rows.get(rec.path)
            if row is None or row[0] != rec.label or rec.split not in (None, row[1]):
                return False
            try:
                st = os.stat(rec.path)
            except OSError:
                return False
            if (st.st_size, st.st_mtime_ns) != row[2:]:
                return False
        try:
            return self.index_if_consistent(mmap=True) is not None
        except RuntimeError:  # an unreadable index: the update rebuilds it
            return False

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
                raise StoreBusy(
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
        self.reindex(rebuild=True)
        return True

    def reindex(
        self, settings: dict[str, Any] | None = None, rebuild: bool = False
    ) -> dict[str, Any]:
        """Refresh the index (choice, training, recall tuning) and record it in the manifest.

        `settings` overrides the store's saved index settings: max_memory, recall, kind."""
        m = self.manifest()
        entry = self._refresh_index(m, settings, rebuild)
        text = json.dumps(m | {"index": entry}, indent=2)
        write_bytes_atomic(self.path / MANIFEST, text.encode())
        return entry

    def _refresh_index(
        self, manifest: dict[str, Any], settings: dict[str, Any] | None, rebuild: bool = False
    ) -> dict[str, Any]:
        previous = manifest.get("index")
        ids = self.table(["id"])["id"].to_numpy()
        return indexing.refresh(
            self.path,
            self.batches,
            ids,
            manifest["dim"],
            previous=previous,
            settings=IndexSettings.of(previous, **(settings or {})),
            rebuild=rebuild,
            seed=manifest.get("split_seed", 0),
        )

    def update(
        self,
        source: Source,
        backbone: Backbone,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int | None = None,
        progress: bool = True,
        fast_decode: bool = True,
        checkpoint_rows: int = CHECKPOINT_ROWS,
        index_settings: dict[str, Any] | None = None,
        engine: Engine | None = None,
    ) -> UpdateReport:
        """Bring the store in line with `source`: embed new or changed files, drop deleted ones.

        Exactly once, in bounded memory: new rows stream into `staging/` parts (each renamed
        into place every `checkpoint_rows` rows, so a crashed run resumes where it stopped),
        then one pass merges the kept rows and the staged rows into a new Parquet file and
        index, row group by row group. Rows of unchanged files (same path and content) keep
        their embedding, with label and given split refreshed from the source; new rows
        without a given split get a seeded stratified split. The Parquet, the failures
        table, the index and the manifest are replaced atomically, in that order; the staging
        folder is removed last. Disk errors leave the previous store as it was.

        `engine` embeds the new files (default: `LocalEngine` with the arguments above); any
        engine's staged parts go through the same commit, so exactly-once holds for all.
        """
        engine = engine or LocalEngine(
            batch_size, num_workers, progress, fast_decode, checkpoint_rows
        )
        with self.lock():
            self.check_backbone(backbone.name, backbone.weights)
            self.check_layers(backbone.layer_dims)
            try:
                return self._update(source, backbone, seed, engine, index_settings)
            except OSError as exc:
                raise StoreError(
                    f"cannot write to store {self.path}: {exc.strerror or exc}. The store is "
                    "unchanged; free disk space or fix permissions, or choose another --store, "
                    "then run again (finished batches are kept in staging/ and reused)."
                ) from exc

    def _update(
        self,
        source: Source,
        backbone: Backbone,
        seed: int,
        engine: Engine,
        index_settings: dict[str, Any] | None,
    ) -> UpdateReport:
        started = time.perf_counter()
        sch = schema(backbone.dim, backbone.layer_dims)
        _remove_temp_files(self.path)
        staging = _Staging(self.path / STAGING, sch, backbone)
        report = UpdateReport(store=str(self.path), scanned=len(source.records))
        old = self._metadata()
        plan = _plan(source, old, staging.metadata())
        report.failures.extend(plan.failures)
        report.resumed = len(plan.staged) - len(plan.to_embed)

        stats = EmbedStats()
        if plan.to_embed:
            report.failures.extend(engine(staging.folder, backbone, plan.pending(), stats))
        report.failures.sort()
        report.removed = plan.removed
        report.failed = len(report.failures)
        self._commit(source, backbone, plan, staging, sch, seed, report, index_settings)
        stats.wall_s = time.perf_counter() - started
        report.stats = stats.metrics() | {"seconds": stats.wall_s}
        report.model_path = stats.path
        return report

    def _metadata(self) -> pa.Table | None:
        """Every column but the embeddings, or None when nothing was committed yet."""
        path = self.path / EMBEDDINGS
        if not path.exists():
            return None
        return pq.read_table(path, columns=META_COLUMNS)

    def _commit(
        self,
        source: Source,
        backbone: Backbone,
        plan: _Plan,
        staging: _Staging,
        sch: pa.Schema,
        seed: int,
        report: UpdateReport,
        index_settings: dict[str, Any] | None,
    ) -> None:
        """Merge kept and staged rows into new files, streaming, refresh the index (in place
        where it can be: extractors/indexing.py), then drop the staging folder."""
        staged = staging.metadata()
        use = pc.is_in(staged["path"], value_set=pa.array(list(plan.staged), pa.string()))
        staged = staged.filter(use) if staged.num_rows else staged
        # One row per path: the first staged row of each path.
        first: dict[str, int] = {}
        for i, p in enumerate(staged["path"].to_pylist()):
            first.setdefault(p, i)
        new_paths = list(first)
        new_sha = [plan.sha[p] for p in new_paths]
        given = [plan.staged[p][1] for p in new_paths]
        auto = [i for i, g in enumerate(given) if g is None]
        splits = dict(zip(new_paths, given, strict=True))
        if auto:
            assigned = stratified_split(
                [new_sha[i] for i in auto], [plan.staged[new_paths[i]][0] for i in auto], seed
            )
            splits.update({new_paths[i]: s for i, s in zip(auto, assigned, strict=True)})

        meta: dict[str, list] = {"sha256": [], "label": [], "split": []}
        written: set[str] = set()

        def emit(writer: pq.ParquetWriter, table: pa.Table, labels, splits_) -> None:
            keep = [p not in written for p in table["path"].to_pylist()]
            if not all(keep):
                table = table.filter(pa.array(keep))
                labels = [x for x, k in zip(labels, keep, strict=True) if k]
                splits_ = [x for x, k in zip(splits_, keep, strict=True) if k]
            if not table.num_rows:
                return
            paths = table["path"].to_pylist()
            table = _set_columns(
                table,
                label=pa.array(labels, pa.string()),
                split=pa.array(splits_, pa.string()),
                bytes=pa.array([plan.stat[p][0] for p in paths], pa.int64()),
                mtime_ns=pa.array([plan.stat[p][1] for p in paths], pa.int64()),
            )
            writer.write_table(table.select(sch.names).cast(sch), row_group_size=ROW_GROUP)
            written.update(paths)
            meta["sha256"] += table["sha256"].to_pylist()
            meta["label"] += labels
            meta["split"] += splits_

        with atomic_path(self.path / EMBEDDINGS) as tmp:
            writer = pq.ParquetWriter(tmp, sch, compression="zstd")
            try:
                if plan.keep:
                    old_file = pq.ParquetFile(self.path / EMBEDDINGS)
                    for rb in old_file.iter_batches(ROW_GROUP):
                        t = pa.Table.from_batches([rb])
                        t = t.filter(pc.is_in(t["path"], value_set=pa.array(list(plan.keep))))
                        ps, old_splits = t["path"].to_pylist(), t["split"].to_pylist()
                        labels = [plan.keep[p][0] for p in ps]
                        splits_ = [
                            plan.keep[p][1] or s for p, s in zip(ps, old_splits, strict=True)
                        ]
                        emit(writer, t, labels, splits_)
                report.kept = len(written)
                for part in staging.parts():
                    t = pq.read_table(part)
                    t = t.filter(pc.is_in(t["path"], value_set=pa.array(new_paths, pa.string())))
                    ok = [
                        plan.sha.get(p) == h
                        for p, h in zip(t["path"].to_pylist(), t["sha256"].to_pylist(), strict=True)
                    ]
                    t = t.filter(pa.array(ok, pa.bool_()))
                    ps = t["path"].to_pylist()
                    emit(writer, t, [plan.staged[p][0] for p in ps], [splits[p] for p in ps])
            finally:
                writer.close()
        report.rows = len(written)
        report.embedded = report.rows - report.kept
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
        previous = self.manifest() if self.exists else {}
        entry = self._refresh_index(
            previous | {"dim": backbone.dim, "split_seed": seed}, index_settings
        )
        self._write_manifest(source, backbone, pa.table(meta), seed, report, entry)
        staging.remove()

    def _write_manifest(
        self,
        source: Source,
        backbone: Backbone,
        table: pa.Table,
        seed: int,
        report: UpdateReport,
        index_entry: dict[str, Any],
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
            "layers": {
                col: {"module": backbone.layers[col], "dim": d}
                for col, d in backbone.layer_dims.items()
            },
            "index": index_entry,
            "created": created,
            "updated": now,
        }
        write_bytes_atomic(self.path / MANIFEST, json.dumps(manifest, indent=2).encode())


def embedding_matrix(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """A fixed-size-list column as a (rows, dim) float32 matrix, without a Python loop."""
    col = table[column].combine_chunks()
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


def _set_columns(table: pa.Table, **columns: pa.Array) -> pa.Table:
    for name, col in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, col)
    return table


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def _batch_table(batch: EmbeddedBatch, pending: list[Pending], sch: pa.Schema) -> pa.Table:
    """The rows of one embedded batch, in the store schema (split null unless given)."""
    recs = [pending[i] for i in batch.indices]
    cols: dict[str, Any] = {
        "id": [content_id(r.sha256) for r in recs],
        "path": [r.path for r in recs],
        "sha256": [r.sha256 for r in recs],
        "label": [r.label for r in recs],
        "split": [r.split for r in recs],
        "width": batch.widths,
        "height": batch.heights,
        "bytes": [r.bytes for r in recs],
        "mtime_ns": [r.mtime_ns for r in recs],
    }
    arrays = [pa.array(cols[f.name], f.type) for f in sch if f.name in cols]
    arrays.append(_fixed_list(batch.embeddings))
    arrays += [_fixed_list(batch.layers[f.name]) for f in sch if f.name.startswith("emb_")]
    return pa.Table.from_arrays(arrays, schema=sch)


def _remove_temp_files(folder: Path) -> None:
    """Drop temporary files of writers that were killed (the caller holds the lock)."""
    if folder.is_dir():
        for tmp in [*folder.glob(".*.tmp"), *folder.glob(f"{STAGING}/.*.tmp")]:
            tmp.unlink(missing_ok=True)


class _Staging:
    """`staging/`: Parquet parts of rows embedded by an update that has not committed yet.

    Parts are complete files renamed into place, so a killed run leaves only whole parts (and
    temp files, removed on the next run). Parts from another backbone or schema are dropped.
    """

    def __init__(self, folder: Path, sch: pa.Schema, backbone: Backbone):
        self.folder = folder
        self.schema = sch
        self.tag = {"backbone": backbone.name, "weights": backbone.weights}
        meta = folder / "staging.json"
        if folder.exists():
            try:
                same = json.loads(meta.read_text()) == self.tag and all(
                    pq.read_schema(p).equals(sch) for p in self.parts()
                )
            except (OSError, ValueError, pa.ArrowException):
                same = False
            if not same:
                shutil.rmtree(folder)
        if not folder.exists():
            folder.mkdir(parents=True)
            write_bytes_atomic(meta, json.dumps(self.tag).encode())

    def parts(self) -> list[Path]:
        """Parts of the local engine (numbered) and shards of a distributed one (hashed)."""
        return sorted(self.folder.glob("part-*.parquet")) + sorted(
            self.folder.glob("shard-*.parquet")
        )

    def metadata(self) -> pa.Table:
        tables = [pq.read_table(p, columns=META_COLUMNS) for p in self.parts()]
        empty = self.schema.empty_table().select(META_COLUMNS)
        return pa.concat_tables([empty, *tables]) if tables else empty

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class _StagingWriter:
    """Writes batches to staging parts on a background thread, so the model never waits on disk.

    A part is closed and renamed into place every `rows_per_part` rows, and on exit (also after
    an error in the caller, so finished batches survive for the next run). An error in the
    writer thread (disk full) is raised in the caller at its next `put` or at exit.
    """

    def __init__(self, folder: Path, sch: pa.Schema, rows_per_part: int, stats: EmbedStats):
        self.folder = folder
        self.schema = sch
        self.rows_per_part = max(1, rows_per_part)
        self.stats = stats
        self.queue: queue.Queue[pa.Table | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="staging-writer", daemon=True)

    def __enter__(self) -> _StagingWriter:
        self.thread.start()
        return self

    def put(self, table: pa.Table) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(table)

    def __exit__(self, *exc: object) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error

    def _run(self) -> None:
        writer: pq.ParquetWriter | None = None
        tmp = final = None
        rows = 0
        try:
            while (table := self.queue.get()) is not None:
                t0 = time.perf_counter()
                if writer is None:
                    final = _next_part(self.folder)
                    tmp = final.with_name(f".{final.name}.tmp")
                    writer = pq.ParquetWriter(tmp, self.schema, compression="zstd")
                writer.write_table(table)
                rows += table.num_rows
                if rows >= self.rows_per_part:
                    self._seal(writer, tmp, final)
                    writer, rows = None, 0
                self.stats.write_s += time.perf_counter() - t0
        except BaseException as exc:  # handed to the caller
            self.error = exc
            while self.queue.get() is not None:
                pass
        finally:
            if writer is not None:
                try:
                    self._seal(writer, tmp, final) if self.error is None else writer.close()
                except OSError as exc:
                    self.error = self.error or exc
                if tmp is not None:
                    tmp.unlink(missing_ok=True)

    @staticmethod
    def _seal(writer: pq.ParquetWriter, tmp: Path, final: Path) -> None:
        writer.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)


def _next_part(folder: Path) -> Path:
    numbered = sorted(folder.glob("part-*.parquet"))
    n = int(numbered[-1].stem.split("-")[1]) + 1 if numbered else 0
    return folder / f"part-{n:06d}.parquet"


@dataclass
class _Plan:
    to_embed: list = field(default_factory=list)
    keep: dict[str, Any] = field(default_factory=dict)  # path -> (label, split|None), old rows
    staged: dict[str, Any] = field(default_factory=dict)  # path -> (label, split|None), new rows
    sha: dict[str, str] = field(default_factory=dict)
    stat: dict[str, tuple[int, int]] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    removed: int = 0

    def pending(self) -> list[Pending]:
        return [
            Pending(r.path, self.sha[r.path], r.label, r.split, *self.stat[r.path])
            for r in self.to_embed
        ]


def _known_hashes(*tables: pa.Table | None) -> dict[str, tuple[str, int, int]]:
    known: dict[str, tuple[str, int, int]] = {}
    for t in tables:
        if t is None:
            continue
        cols = [t[c].to_pylist() for c in ("path", "sha256", "bytes", "mtime_ns")]
        for p, s, b, m in zip(*cols, strict=True):
            known.setdefault(p, (s, b, m))
    return known


def _plan(source: Source, old: pa.Table | None, staged: pa.Table) -> _Plan:
    """Hash the source (reusing stored hashes of files whose size and mtime are unchanged) and
    decide per file: keep its committed row, use its staged row, embed it, or record it as a
    failure or duplicate."""
    plan = _Plan()
    committed = _known_hashes(old)
    known = _known_hashes(old, staged)
    staged_pairs = set(zip(staged["path"].to_pylist(), staged["sha256"].to_pylist(), strict=True))
    first_path_of: dict[str, str] = {}
    for rec in sorted(source.records, key=lambda r: r.path):
        try:
            st = os.stat(rec.path)
            if not stat.S_ISREG(st.st_mode):
                plan.failures.append(
                    (rec.path, "not a regular file (a folder, pipe or device named like an image)")
                )
                continue
            prev = known.get(rec.path)
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
            plan.failures.append((rec.path, f"cannot read file: {exc.strerror or exc}"))
            continue
        if sha in first_path_of:
            plan.failures.append((rec.path, f"duplicate content of {first_path_of[sha]}"))
            continue
        first_path_of[sha] = rec.path
        plan.sha[rec.path] = sha
        plan.stat[rec.path] = (st.st_size, st.st_mtime_ns)
        if rec.path in committed and committed[rec.path][0] == sha:
            plan.keep[rec.path] = (rec.label, rec.split)
        elif (rec.path, sha) in staged_pairs:
            plan.staged[rec.path] = (rec.label, rec.split)
        else:
            plan.to_embed.append(rec)
            plan.staged[rec.path] = (rec.label, rec.split)
    plan.removed = sum(1 for p in committed if p not in plan.sha)
    return plan
