"""The embedding store: one directory per (source, backbone), Parquet + manifest + FAISS index
(the layout: extractors/store/layout.py). `Store` reads it, checks what may go into it, and
updates it from a source: plan (store/plan.py) -> engine (embedding/engines.py) -> staging
(store/staging.py) -> commit (store/commit.py) -> index (index/maintain.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from extractors.common import (
    ROW_GROUP,
    HeadstartError,
    atomic_path,
    exclusive,
    normalize,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from extractors.embedding.images import file_sha256
from extractors.embedding.sources import Source
from extractors.index import ann, maintain
from extractors.settings import IndexSettings
from extractors.store.commit import (
    Committed,
    ManifestInputs,
    merge_rows,
    new_paths,
    new_splits,
    write_failures,
    write_manifest,
)
from extractors.store.grouping import Grouping
from extractors.store.layout import (
    AUDIT,
    AUDIT_FILES,
    AUDIT_SUMMARY,
    COMMIT_FILES,
    EMBEDDINGS,
    FAILURE_SCHEMA,
    FAILURES,
    GROWN_IN_PLACE,
    INDEX,
    MANIFEST,
    META_COLUMNS,
    STAGING,
    VECTORS,
    embedding_matrix,
    fingerprint,
    os_path,
    schema,
)
from extractors.store.plan import DUPLICATE, UpdatePlan, plan_update
from extractors.store.staging import Staging, remove_temp_files

if TYPE_CHECKING:
    from extractors.embedding.backbones import Backbone
    from extractors.embedding.engines import Engine


class StoreError(HeadstartError, ValueError):
    """A store that cannot be used as asked; the message says what to do."""


class StoreBusy(StoreError):
    """Another process holds the store's writer lock: try again when it is done."""


@dataclass
class UpdateReport:
    """What one `update` did."""

    store: str
    scanned: int = 0
    embedded: int = 0
    kept: int = 0
    removed: int = 0
    failed: int = 0
    duplicates: int = 0  # files with the same bytes as another file of the source (not rows)
    rows: int = 0
    resumed: int = 0  # rows reused from the staging/ parts of an interrupted run
    model_path: str = ""  # how the network ran: compiled or eager, and why
    failures: list[tuple[str, str]] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)  # images/s and ms per image per stage
    grouping: dict[str, Any] = field(default_factory=dict)  # what the group-aware split did

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["failures"] = [list(f) for f in self.failures]
        return d


class Store:
    """A store directory (extractors/store/layout.py); cheap to open, reads lazily."""

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
        # ParquetFile, not read_table: read_table goes through pyarrow.dataset, which imports
        # pandas (~30 MB in every process that only reads a store, the search service's too).
        return pq.ParquetFile(path).read(columns=list(columns) if columns else None)

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

    def index(self, mmap: bool = False) -> ann.AnnIndex:
        """The FAISS index with its tuned search parameters. `mmap=True` maps it read-only,
        shared between processes.

        An index that is missing, unreadable (a truncated or corrupt `index.faiss`,
        `vectors.f32` or `vector_ids.npy`) or out of line with the Parquet ids is rebuilt,
        under the writer's lock and with a warning: a reader never writes beside a writer
        (StoreBusy while another process updates the store)."""
        idx = self.index_if_consistent(mmap)
        if idx is None:
            with self.lock():
                idx = self.index_if_consistent(mmap)  # a writer that just finished fixed it
                if idx is None:
                    warnings.warn(
                        f"the search index of {self.path} was missing, unreadable or out of "
                        "line with its rows: rebuilt",
                        stacklevel=2,
                    )
                    self.reindex(rebuild=True)
                    idx = maintain.open_index(self.path, self.manifest().get("index"), mmap)
        return idx

    def index_if_consistent(self, mmap: bool = False) -> ann.AnnIndex | None:
        """The index on disk when it holds exactly the Parquet ids (and, for ivf_pq, re-rank
        files in line with it); else None, also when it is unreadable."""
        if not (self.path / INDEX).exists():
            return None
        ids = self.table(["id"])["id"].to_numpy()
        entry = self.manifest().get("index") if self.exists else None
        try:
            idx = maintain.open_index(self.path, entry, mmap=mmap)
            return idx if maintain.consistent(idx, ids) else None
        except (RuntimeError, OSError, ValueError):  # unreadable: FAISS's error, or files cut
            return None  # short (a truncated memory-mapped file)

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
            problems.extend(self._index_problems(ids))
        except RuntimeError as exc:
            problems.append(f"{INDEX} is unreadable: {exc}")
        if self.exists and self.manifest().get("rows") != len(ids):
            problems.append("manifest row count differs from the Parquet file")
        return problems

    def _index_problems(self, ids: np.ndarray, sample: int = 64) -> list[str]:
        """What is wrong with the index (RuntimeError: unreadable): missing, other ids than
        the Parquet's (`ids`, in its row order), or (ivf_pq) re-rank files out of line with it
        or holding, for a sample of rows, another row's vector (only the Parquet row groups
        holding the sample are read)."""
        if not (self.path / INDEX).exists():
            return [f"{INDEX} is missing"]
        idx = maintain.open_index(self.path, self.manifest().get("index") if self.exists else None)
        if not maintain.consistent(idx, ids):
            have = ann.index_ids(idx.index)
            if len(have) != len(ids) or not np.array_equal(np.sort(have), np.sort(ids)):
                return [f"{INDEX}'s ids differ from the Parquet ids"]
            return [maintain.rerank_problem(idx.reranker, have) or "re-rank files differ"]
        rr = idx.reranker
        if rr is None or not len(rr.ids) or not len(ids):
            return []
        have = np.intersect1d(rr.ids, ids)  # (rows of deleted ids stay until the next build)
        probe = np.unique(have[np.linspace(0, len(have) - 1, sample).astype(int)])
        at = np.flatnonzero(np.isin(ids, probe))  # their rows in the Parquet file
        reader = pq.ParquetFile(self.path / EMBEDDINGS)
        wrong, start = 0, 0
        for g in range(reader.num_row_groups):
            size = reader.metadata.row_group(g).num_rows
            inside = at[(at >= start) & (at < start + size)] - start
            start += size
            if not len(inside):
                continue
            t = reader.read_row_group(g, columns=["id", "embedding"]).take(pa.array(inside))
            mine = np.asarray(rr.vectors[rr.rows(t["id"].to_numpy())], np.float32)
            theirs = normalize(embedding_matrix(t))
            wrong += int((~np.isclose(mine, theirs, atol=1e-4).all(1)).sum())
        if wrong:
            return [
                f"{VECTORS}: {wrong} of {len(probe)} sampled rows hold another row's vector "
                "(rebuild with `headstart index --rebuild`)"
            ]
        return []

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
        split (or still a duplicate of one, with the size and time it had then), no row left
        over, no failed file to retry, nothing staged, the index in line. Reads only, and needs no
        model: an unchanged scheduled run costs a listing and a few `stat` calls."""
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
            or m.get("rows", 0) + m.get("duplicates", 0) != len(source.records)
            or len({r.path for r in source.records}) != len(source.records)
        ):
            return False
        old = self._metadata()
        if old is None:
            return not source.records
        cols = [old[c].to_pylist() for c in ("path", "label", "split", "bytes", "mtime_ns")]
        rows = {p: (lab, s, b, t) for p, lab, s, b, t in zip(*cols, strict=True)}
        dups = self._duplicates(old) if m.get("duplicates") else {}
        for rec in source.records:
            row = rows.get(rec.path)
            if row is None and rec.path in dups:  # still the bytes of the row it duplicates
                sha, was = dups[rec.path]
                try:
                    st = os.stat(os_path(rec.path))
                    if was is not None and (st.st_size, st.st_mtime_ns) == was:
                        continue  # not touched since it was found a duplicate
                    if file_sha256(rec.path) != sha:  # touched: hashed, as an update would
                        return False
                except OSError:
                    return False
                continue
            if row is None or row[0] != rec.label or rec.split not in (None, row[1]):
                return False
            try:
                st = os.stat(os_path(rec.path))
            except OSError:
                return False
            if (st.st_size, st.st_mtime_ns) != row[2:]:
                return False
        return self.index_if_consistent(mmap=True) is not None  # unreadable: rebuilt

    # --- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive writer lock; a second writer is refused with a clear message, and a lock
        file that cannot be made (a full or read-only disk) is a StoreError, not a crash."""
        busy = StoreBusy(
            f"another headstart process is writing to {self.path}; wait for it to "
            "finish, or use another --store"
        )
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(exclusive(self.path / ".lock", busy))
            except OSError as exc:
                raise StoreError(
                    f"cannot write to store {self.path}: {exc.strerror or exc} (its lock file "
                    f"{self.path / '.lock'}). The store is unchanged; free disk space or fix "
                    "permissions, or choose another --store."
                ) from exc
            yield

    def keep_audit(self, findings: pa.Table, summary: dict[str, Any]) -> None:
        """An audit's findings and summary as the store's latest, under the store's lock: both
        files or, when a write fails, neither (the previous audit stays whole)."""
        with self.lock(), _Rollback(self.path, then="", files=AUDIT_FILES) as rollback:
            write_parquet_atomic(findings, self.path / AUDIT)
            write_json_atomic(self.path / AUDIT_SUMMARY, summary)
            rollback.done()

    def reindex(
        self, settings: IndexSettings | None = None, rebuild: bool = False
    ) -> dict[str, Any]:
        """Refresh the index (choice, training, recall tuning) and record it in the manifest.

        What `settings` sets overrides the store's saved index settings."""
        m = self.manifest()
        with _Rollback(self.path, then="") as rollback:  # a failed rebuild: the old index
            entry = self._refresh_index(m, settings, rebuild)
            text = json.dumps(m | {"index": entry}, indent=2)
            write_bytes_atomic(self.path / MANIFEST, text.encode())
            rollback.done()
        return entry

    def _refresh_index(
        self, manifest: dict[str, Any], settings: IndexSettings | None, rebuild: bool = False
    ) -> dict[str, Any]:
        previous = manifest.get("index")
        ids = self.table(["id"])["id"].to_numpy()
        return maintain.refresh(
            self.path,
            self.batches,
            ids,
            manifest["dim"],
            previous=previous,
            settings=settings,
            rebuild=rebuild,
            seed=manifest.get("split_seed", 0),
        )

    def update(
        self,
        source: Source,
        backbone: Backbone,
        seed: int = 0,
        progress: bool = True,
        index: IndexSettings | None = None,
        engine: Engine | None = None,
        grouping: Grouping | None = None,
    ) -> UpdateReport:
        """Bring the store in line with `source`: embed new or changed files, drop deleted ones.

        Exactly once, in bounded memory: the plan (extractors/store/plan.py) decides per file; the
        engine (default: `LocalEngine`, else extractors/embedding/engines.py) streams new rows into
        `staging/` parts, each renamed into place every `checkpoint_rows` rows, so a crashed
        run resumes where it stopped; then the commit (extractors/store/commit.py) merges the kept
        rows and the staged rows into a new Parquet file, row group by row group. Rows of
        unchanged files (same path and content) keep their embedding, with label and given
        split refreshed from the source; new rows without a given split get a seeded
        stratified split that keeps near-duplicate groups in one split (`grouping`, see
        extractors/store/grouping.py; committed rows keep their splits, and new rows that join
        their groups take them). The Parquet, the failures table, the index (`index`: what to change
        of the store's index settings) and the manifest are replaced atomically, in that
        order; the staging folder is removed last. Disk errors leave the previous store as it
        was. Any engine's staged parts go through the same commit, so exactly-once holds for
        all.
        """
        from extractors.embedding.engines import LocalEngine  # torch: only where rows are embedded

        engine = engine or LocalEngine(progress=progress)
        with self.lock():
            self.check_backbone(backbone.name, backbone.weights)
            self.check_layers(backbone.layer_dims)
            try:
                return self._update(source, backbone, seed, engine, index, grouping or Grouping())
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
        index: IndexSettings | None,
        grouping: Grouping,
    ) -> UpdateReport:
        started = time.perf_counter()
        sch = schema(backbone.dim, backbone.layer_dims)
        remove_temp_files(self.path)
        staging = Staging(self.path / STAGING, sch, backbone)
        report = UpdateReport(store=str(self.path), scanned=len(source.records))
        plan = plan_update(source, self._metadata(), staging.metadata())
        report.failures.extend(plan.failures)
        report.resumed = len(plan.staged) - len(plan.to_embed)

        from extractors.embedding.embed import EmbedStats

        stats = EmbedStats()
        if plan.to_embed:
            report.failures.extend(engine(staging.folder, backbone, plan.pending(), stats))
            _check_accounted(plan, staging, report.failures)
        report.failures.sort()
        report.removed = plan.removed
        report.duplicates = len(plan.duplicate_of)
        report.failed = len(report.failures) - report.duplicates

        previous = self.manifest() if self.exists else {}
        paths = new_paths(plan, staging.metadata())
        grouped_too = plan.keep and grouping.by != "none"
        committed = self._committed(plan, backbone.dim) if grouped_too else None
        splits, grouped = new_splits(plan, paths, staging.parts(), seed, grouping, committed)
        report.grouping = grouped
        if not grouped["groups"] and not grouped["joined"] and "split_groups" in previous:
            grouped = previous["split_groups"] | grouping.record()  # keep the last counts
        with _Rollback(self.path) as rollback:
            merged = merge_rows(self.path, sch, plan, staging.parts(), paths, splits)
            self._write_rows()
            report.kept, report.rows = merged.kept, merged.rows
            report.embedded = report.rows - report.kept
            write_failures(self.path, report.failures, plan.duplicate_stat)
            entry = self._refresh_index(previous | {"dim": backbone.dim, "split_seed": seed}, index)
            facts = ManifestInputs(
                source, backbone, seed, report.failed, entry, grouped, report.duplicates
            )
            write_manifest(self.path, merged.table(), facts)
            rollback.done()
        staging.remove()

        stats.wall_s = time.perf_counter() - started
        report.stats = stats.metrics() | {"seconds": stats.wall_s}
        report.model_path = stats.path
        return report

    def move_splits(self, moves: dict[int, str], note: dict[str, Any]) -> dict[str, Any]:
        """Put the rows `moves` names (id -> split) in those splits: embeddings.parquet
        rewritten (atomically, row group by row group, under the writer's lock), then the
        manifest's split counts and fingerprint from it (so the next run retrains). `note` is
        recorded in the manifest's split_groups. Returns the new manifest."""
        with self.lock():
            path = self.path / EMBEDDINGS
            with _Rollback(self.path, then="") as rollback:  # a failed write: the old files
                reader = pq.ParquetFile(path)
                if moves:
                    out = atomic_path(path)
                    schema_ = reader.schema_arrow
                    with out as tmp, pq.ParquetWriter(tmp, schema_, compression="zstd") as w:
                        for rb in reader.iter_batches(ROW_GROUP):
                            t = pa.Table.from_batches([rb])
                            ids, old = t["id"].to_pylist(), t["split"].to_pylist()
                            new = [moves.get(i, s) for i, s in zip(ids, old, strict=True)]
                            at = t.schema.get_field_index("split")
                            w.write_table(t.set_column(at, "split", pa.array(new, pa.string())))
                self._write_rows()  # also after a crash before it: the Parquet's, stamped
                # From the file itself, so a re-run after a crash here completes the manifest.
                meta = pq.read_table(path, columns=["sha256", "label", "split"])
                splits = meta["split"].to_pylist()
                m = self.manifest()
                m["splits"] = {s: splits.count(s) for s in ("train", "val", "test")}
                m["fingerprint"] = fingerprint(meta)
                m["split_groups"] = m.get("split_groups", {}) | note
                m["updated"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
                write_bytes_atomic(self.path / MANIFEST, json.dumps(m, indent=2).encode())
                rollback.done()
            return m

    def _write_rows(self) -> None:
        """rows.arrow for the embeddings file just written (extractors/search/query.py)."""
        from extractors.search.query import ROW_COLUMNS, write_rows

        write_rows(self.path, self.path / EMBEDDINGS, self.table(ROW_COLUMNS))

    def _committed(self, plan: UpdatePlan, dim: int) -> Committed:
        """The rows this update keeps, and a search over the committed vectors (the index
        on disk, else an exact copy), for the group-aware split."""
        rows = self.table(["id", "path", "split"])
        rows = rows.filter(pc.is_in(rows["path"], value_set=pa.array(list(plan.keep))))
        ann_index = self.index_if_consistent(mmap=True)  # None when unreadable: rebuilt
        if ann_index is not None:
            return Committed(rows, ann_index.search)
        flat = ann.flat_copy(self.batches(), dim)  # (a crash may have left no manifest)
        return Committed(rows, lambda q, k: flat.search(q, min(k, flat.ntotal)))

    def _duplicates(self, rows: pa.Table) -> dict[str, tuple[str, tuple[int, int] | None]]:
        """path -> (sha256, (bytes, mtime_ns) or None) of the files the last update found to
        duplicate a row's bytes (no stat in a store written before it was recorded)."""
        sha = dict(zip(rows["path"].to_pylist(), rows["sha256"].to_pylist(), strict=True))
        out = {}
        for f in self.failures().to_pylist():
            first = f["reason"].removeprefix(DUPLICATE)
            if first != f["reason"] and first in sha:
                known = f.get("bytes") is not None and f.get("mtime_ns") is not None
                out[f["path"]] = (sha[first], (f["bytes"], f["mtime_ns"]) if known else None)
        return out

    def _metadata(self) -> pa.Table | None:
        """Every column but the embeddings, or None when nothing was committed yet."""
        path = self.path / EMBEDDINGS
        if not path.exists():
            return None
        return pq.read_table(path, columns=META_COLUMNS)


STAGED_KEPT = "; finished batches are kept in staging/ and reused"


def _check_accounted(plan: UpdatePlan, staging: Staging, failures: list[tuple[str, str]]) -> None:
    """Every file the engine was given is now a staged row or a failure; else nothing is
    committed and the run fails loudly (a file never vanishes without a trace)."""
    staged = set(staging.metadata()["path"].to_pylist())
    failed = {p for p, _ in failures}
    lost = sorted({r.path for r in plan.to_embed} - staged - failed)
    if lost:
        raise StoreError(
            f"{len(lost)} file(s) were neither embedded nor recorded as failures, e.g. "
            f"{lost[0]}; nothing was committed. With --engine dask, every worker must see the "
            f"store's staging folder ({staging.folder}) at the same path."
        )


class _Rollback:
    """The commit as one step: the committed files as they were (hard links: no copy, no
    space) are put back if any write of the commit fails, a full disk included (FAISS says so
    with RuntimeError, not OSError). The files are the layout's `COMMIT_FILES`, every file a
    commit may write for every index kind; those grown in place (the re-rank vectors) are cut
    back to their old length. Then the store is wholly the old one, and says so; the staged
    rows stay for the next run."""

    def __init__(
        self, folder: Path, then: str = STAGED_KEPT, files: tuple[str, ...] = COMMIT_FILES
    ):
        self.folder, self.then, self.files = folder, then, files
        self.saved: dict[str, Path | None] = {}
        self.sizes: dict[str, int] = {}
        self.committed = False

    def __enter__(self) -> _Rollback:
        try:
            for name in self.files:
                path, keep = self.folder / name, self.folder / f".{name}.before-commit"
                keep.unlink(missing_ok=True)
                self.saved[name] = None
                if path.exists():
                    os.link(path, keep)
                    self.saved[name] = keep
                    if name in GROWN_IN_PLACE:
                        self.sizes[name] = path.stat().st_size
        except OSError as exc:
            self._drop_links()
            raise self._error(exc) from exc
        return self

    def done(self) -> None:
        self.committed = True

    def _drop_links(self) -> None:
        """Best effort: a link left behind costs nothing and the next commit replaces it (a
        failure here must not report a commit that happened as rolled back)."""
        for keep in self.saved.values():
            if keep is not None:
                with contextlib.suppress(OSError):
                    keep.unlink(missing_ok=True)

    def _restore(self) -> None:
        for name, keep in self.saved.items():
            path = self.folder / name
            if keep is None:
                path.unlink(missing_ok=True)
                continue
            os.replace(keep, path)
            size = self.sizes.get(name)
            if size is not None and path.stat().st_size > size:
                os.truncate(path, size)  # rows appended in place by the failed commit

    def _error(self, exc: BaseException) -> StoreError:
        why = getattr(exc, "strerror", None) or exc
        return StoreError(
            f"cannot write to store {self.folder}: {why}. The store is unchanged (the "
            f"commit was rolled back{self.then}): free disk space or fix permissions, or "
            "choose another --store, then run again."
        )

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        if not self.committed:
            self._restore()
        self._drop_links()
        if not self.committed and isinstance(exc, OSError | RuntimeError):
            raise self._error(exc) from exc
