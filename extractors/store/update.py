"""Writing a store, each write under the writer's lock and a `Rollback` (all of its files or
none): `update` from a source (plan -> engine -> staging -> commit -> index), `reindex`,
`move_splits` and `keep_audit`. `Store` (extractors/store/store.py) is their entry point."""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from extractors.common import (
    ROW_GROUP,
    atomic_path,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
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
    EMBEDDINGS,
    MANIFEST,
    STAGING,
    fingerprint,
    schema,
)
from extractors.store.plan import UpdatePlan, plan_update
from extractors.store.rollback import Rollback
from extractors.store.staging import Staging, remove_temp_files
from extractors.store.store import Store, StoreError, UpdateReport

if TYPE_CHECKING:
    from extractors.embedding.backbones import Backbone
    from extractors.embedding.embed import EmbedStats
    from extractors.embedding.engines import Engine


def update(
    store: Store,
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
    with store.lock():
        store.check_backbone(backbone.name, backbone.weights)
        store.check_layers(backbone.layer_dims)
        try:
            return _update(store, source, backbone, seed, engine, index, grouping or Grouping())
        except OSError as exc:
            raise disk_error(str(store.path), exc) from exc


def _update(
    store: Store,
    source: Source,
    backbone: Backbone,
    seed: int,
    engine: Engine,
    index: IndexSettings | None,
    grouping: Grouping,
) -> UpdateReport:
    run = begin_update(store, source, backbone)
    if run.plan.to_embed:
        pending = run.plan.pending()
        run.report.failures.extend(engine(run.staging.folder, backbone, pending, run.stats))
    return commit_update(run, source, seed, index, grouping)


@dataclass
class Underway:
    """An update planned and not yet committed: its store, backbone, staging folder, plan,
    report so far and stage seconds (the engine embeds `plan.pending()` into `staging`)."""

    store: Store
    backbone: Backbone
    staging: Staging
    plan: UpdatePlan
    report: UpdateReport
    stats: EmbedStats
    started: float


def begin_update(
    store: Store,
    source: Source,
    backbone: Backbone,
    hashed: dict[str, tuple[str, int, int]] | None = None,
) -> Underway:
    """The first half of an update (the caller holds the lock): temp files of killed writers
    dropped, the staging folder opened (parts of another backbone dropped), the plan made
    (`hashed`: hashes another store's plan of the same source took, see `plan_update`)."""
    from extractors.embedding.embed import EmbedStats

    started = time.perf_counter()
    sch = schema(backbone.dim, backbone.layer_dims)
    remove_temp_files(store.path)
    staging = Staging(store.path / STAGING, sch, backbone)
    report = UpdateReport(store=str(store.path), scanned=len(source.records))
    plan = plan_update(source, store.metadata(), staging.metadata(), hashed)
    report.failures.extend(plan.failures)
    report.resumed = len(plan.staged) - len(plan.to_embed)
    return Underway(store, backbone, staging, plan, report, EmbedStats(), started)


def commit_update(
    run: Underway,
    source: Source,
    seed: int,
    index: IndexSettings | None,
    grouping: Grouping,
) -> UpdateReport:
    """The second half, once the engine has embedded `run.plan.pending()`: every file checked
    accounted for, the kept and staged rows merged, failures, index and manifest written
    under a `Rollback`, the staging folder removed. The report says what changed."""
    store, backbone, staging = run.store, run.backbone, run.staging
    plan, report = run.plan, run.report
    if plan.to_embed:
        check_accounted(plan, staging, report.failures)
    report.failures.sort()
    report.removed = plan.removed
    report.duplicates = len(plan.duplicate_of)
    report.failed = len(report.failures) - report.duplicates

    previous = store.manifest() if store.exists else {}
    paths = new_paths(plan, staging.metadata())
    grouped_too = plan.keep and grouping.by != "none"
    committed = committed_rows(store, plan, backbone.dim) if grouped_too else None
    splits, grouped = new_splits(plan, paths, staging.parts(), seed, grouping, committed)
    report.grouping = grouped
    if not grouped["groups"] and not grouped["joined"] and "split_groups" in previous:
        grouped = previous["split_groups"] | grouping.record()  # keep the last counts
    with Rollback(store.path) as rollback:
        merged = merge_rows(store.path, staging.schema, plan, staging.parts(), paths, splits)
        write_rows(store)
        report.kept, report.rows = merged.kept, merged.rows
        report.embedded = report.rows - report.kept
        write_failures(store.path, report.failures, plan.duplicate_stat)
        entry = refresh_index(store, previous | {"dim": backbone.dim, "split_seed": seed}, index)
        facts = ManifestInputs(
            source, backbone, seed, report.failed, entry, grouped, report.duplicates
        )
        write_manifest(store.path, merged.table(), facts)
        rollback.done()
    staging.remove()

    run.stats.wall_s = time.perf_counter() - run.started
    report.stats = run.stats.metrics() | {"seconds": run.stats.wall_s}
    report.model_path = run.stats.path
    return report


def disk_error(paths: str, exc: OSError) -> StoreError:
    """A failed write as a person reads it: which store(s), why, and that nothing changed."""
    return StoreError(
        f"cannot write to store {paths}: {exc.strerror or exc}. The store is "
        "unchanged; free disk space or fix permissions, or choose another --store, "
        "then run again (finished batches are kept in staging/ and reused)."
    )


def check_accounted(plan: UpdatePlan, staging: Staging, failures: list[tuple[str, str]]) -> None:
    """Every file the engine was given is now a staged row or a failure; else nothing is
    committed and the run fails loudly (a file never vanishes without a trace)."""
    staged = set(staging.metadata()["path"].to_pylist())
    failed = {p for p, _ in failures}
    lost = sorted({r.path for r in plan.to_embed} - staged - failed)
    if lost:
        raise StoreError(
            f"{len(lost)} file(s) were neither embedded nor recorded as failures, e.g. "
            f"{lost[0]}; nothing was committed (a bug: please report it), and the next run "
            "embeds them again."
        )


def committed_rows(store: Store, plan: UpdatePlan, dim: int) -> Committed:
    """The rows this update keeps, and a search over the committed vectors (the index
    on disk, else an exact copy), for the group-aware split."""
    rows = store.table(["id", "path", "split"])
    rows = rows.filter(pc.is_in(rows["path"], value_set=pa.array(list(plan.keep))))
    ann_index = store.index_if_consistent(mmap=True)  # None when unreadable: rebuilt
    if ann_index is not None:
        return Committed(rows, ann_index.search)
    flat = ann.flat_copy(store.batches(), dim)  # (a crash may have left no manifest)
    return Committed(rows, lambda q, k: flat.search(q, min(k, flat.ntotal)))


def reindex(
    store: Store, settings: IndexSettings | None = None, rebuild: bool = False
) -> dict[str, Any]:
    """Refresh the index (choice, training, recall tuning) and record it in the manifest.

    What `settings` sets overrides the store's saved index settings."""
    m = store.manifest()
    with Rollback(store.path, then="") as rollback:  # a failed rebuild: the old index
        entry = refresh_index(store, m, settings, rebuild)
        text = json.dumps(m | {"index": entry}, indent=2)
        write_bytes_atomic(store.path / MANIFEST, text.encode())
        rollback.done()
    return entry


def refresh_index(
    store: Store, manifest: dict[str, Any], settings: IndexSettings | None, rebuild: bool = False
) -> dict[str, Any]:
    """The index refreshed for the store's rows (extractors/index/maintain.py): its manifest
    entry."""
    previous = manifest.get("index")
    ids = store.table(["id"])["id"].to_numpy()
    return maintain.refresh(
        store.path,
        store.batches,
        ids,
        manifest["dim"],
        previous=previous,
        settings=settings,
        rebuild=rebuild,
        seed=manifest.get("split_seed", 0),
    )


def move_splits(store: Store, moves: dict[int, str], note: dict[str, Any]) -> dict[str, Any]:
    """Put the rows `moves` names (id -> split) in those splits: embeddings.parquet
    rewritten (atomically, row group by row group, under the writer's lock), then the
    manifest's split counts and fingerprint from it (so the next run retrains). `note` is
    recorded in the manifest's split_groups. Returns the new manifest."""
    with store.lock():
        path = store.path / EMBEDDINGS
        with Rollback(store.path, then="") as rollback:  # a failed write: the old files
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
            write_rows(store)  # also after a crash before it: the Parquet's, stamped
            # From the file itself, so a re-run after a crash here completes the manifest.
            meta = pq.read_table(path, columns=["sha256", "label", "split"])
            splits = meta["split"].to_pylist()
            m = store.manifest()
            m["splits"] = {s: splits.count(s) for s in ("train", "val", "test")}
            m["fingerprint"] = fingerprint(meta)
            m["split_groups"] = m.get("split_groups", {}) | note
            m["updated"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            write_bytes_atomic(store.path / MANIFEST, json.dumps(m, indent=2).encode())
            rollback.done()
        return m


def write_rows(store: Store) -> None:
    """rows.arrow for the embeddings file just written (extractors/search/query.py)."""
    from extractors.search.rows import ROW_COLUMNS, write_rows

    write_rows(store.path, store.path / EMBEDDINGS, store.table(ROW_COLUMNS))


def keep_audit(store: Store, findings: pa.Table, summary: dict[str, Any]) -> None:
    """An audit's findings and summary as the store's latest, under the store's lock: both
    files or, when a write fails, neither (the previous audit stays whole)."""
    with store.lock(), Rollback(store.path, then="", files=AUDIT_FILES) as rollback:
        write_parquet_atomic(findings, store.path / AUDIT)
        write_json_atomic(store.path / AUDIT_SUMMARY, summary)
        rollback.done()
