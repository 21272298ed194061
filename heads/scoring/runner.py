"""Scoring a source with a classifier: one predictions row per image, resumable, exactly once
(the table: heads/scoring/table.py).

Stages, each a plain function: plan (hash; skip files a previous table already scored) ->
adopt the rows a store already embedded with the same backbone (same content hash) -> embed
the rest (an engine, into staging parts) -> score the staged rows part by part into `<out>`
(heads/scoring/writer.py), written to a temporary name and renamed. Memory stays flat in the
number of images.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from extractors.common import exclusive
from extractors.embedding.backbones import Backbone
from extractors.embedding.embed import EmbedStats
from extractors.embedding.engines import Engine, LocalEngine
from extractors.embedding.sources import Source
from extractors.store.layout import CHECKPOINT_ROWS, EMBEDDINGS, STAGING, schema
from extractors.store.plan import Pending, plan_update
from extractors.store.staging import Staging, StagingWriter, remove_temp_files
from heads.scoring.table import (
    PART,
    PREVIOUS,
    ScoringError,
    corrupt_staging,
    hold_folder,
    output_format,
    read_parts,
    work_folder,
    writing,
)
from heads.scoring.writer import Scorer, write_predictions


@dataclass
class ScoreReport:
    """What one scoring run did."""

    out: str
    model: str
    scanned: int = 0
    rows: int = 0  # rows written: scored + errors + duplicates
    scored: int = 0
    errors: int = 0
    duplicates: int = 0  # same bytes as another file: its score, copied
    unchanged: int = 0  # already scored by an earlier run (a `previous` table)
    reused: int = 0  # embeddings copied from a store instead of computed
    embedded: int = 0
    resumed: int = 0  # rows embedded by an interrupted run, taken from its staging parts
    seconds: float = 0.0
    errors_by_path: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def score_source(
    source: Source,
    backbone: Backbone,
    scorer: Scorer,
    out: str | Path,
    engine: Engine | None = None,
    donor: Path | None = None,
    previous: pa.Table | None = None,
    progress: bool = True,
) -> ScoreReport:
    """Write `out`: a predictions row for every file of `source` (for every new or changed
    one when `previous`, a table of path, sha256, bytes and mtime_ns, says what was scored
    before). `donor` is a store folder whose rows with the same backbone and content are
    reused instead of embedded. A killed run, re-run, continues where it stopped."""
    started = time.perf_counter()
    out = Path(out).expanduser().resolve()
    fmt = output_format(out)
    work = work_folder(out)
    report = ScoreReport(out=str(out), model=scorer.name, scanned=len(source.records))
    _score(source, backbone, scorer, out, fmt, engine, donor, previous, progress, report)
    with contextlib.suppress(OSError):
        work.rmdir()
    report.seconds = time.perf_counter() - started
    return report


def _score(
    source: Source,
    backbone: Backbone,
    scorer: Scorer,
    out: Path,
    fmt: str,
    engine: Engine | None,
    donor: Path | None,
    previous: pa.Table | None,
    progress: bool,
    report: ScoreReport,
) -> None:
    """score_source under the output's lock."""
    work = work_folder(out)
    busy = ScoringError(f"another scoring run is writing {out}; wait for it to finish")
    sch = schema(backbone.dim, backbone.layer_dims)
    with contextlib.ExitStack() as held:
        with writing(out):
            held.enter_context(exclusive(work / ".lock", busy))
            remove_temp_files(work)
            staging = Staging(work / STAGING, sch, backbone)
        plan = plan_update(source, previous, _staged(staging, work))
        report.unchanged = len(plan.keep)
        report.resumed = len(plan.staged) - len(plan.to_embed)
        pending = plan.pending()
        if donor is not None and pending:
            pending, report.reused = adopt(Path(donor), backbone, sch, pending, staging.folder)
        failures = [f for f in plan.failures if f[0] not in plan.duplicate_of]
        if pending:
            engine = engine or LocalEngine(progress=progress)
            with writing(out):  # it records unreadable images as failures: these are writes
                lost = engine(staging.folder, backbone, pending, EmbedStats())
            failures += lost
            report.embedded = len(pending) - len(lost)
        labels = {r.path: r.label for r in source.records}
        write_predictions(out, fmt, staging, plan, labels, dict(failures), scorer, report, progress)
        with writing(out):
            staging.remove()
            (work / ".lock").unlink(missing_ok=True)


def _staged(staging: Staging, work: Path) -> pa.Table:
    try:
        return staging.metadata()
    except (OSError, pa.ArrowException) as exc:
        raise corrupt_staging(exc, work) from exc


def score_into_folder(
    source: Source,
    backbone: Backbone,
    scorer: Scorer,
    folder: str | Path,
    engine: Engine | None = None,
    donor: Path | None = None,
    progress: bool = True,
) -> tuple[ScoreReport, Path | None, pa.Table | None]:
    """Score the files of `source` that the predictions folder has not scored yet (new, or
    changed since) into its next part: (report, the part or None for nothing new, the
    earlier parts). The folder's lock (`hold_folder`) is held from reading its parts to the
    new part's rename, so a second run into the folder waits for the first, then scores
    only what it did not: two runs never pick the same part. An interrupted run's part
    keeps its number, so the next run continues it."""
    with hold_folder(folder) as folder:
        previous = read_parts(folder)
        out = folder / PART.format(len(list(folder.glob("part-*.parquet"))))
        known = None if previous is None else previous.select(PREVIOUS)
        report = score_source(source, backbone, scorer, out, engine, donor, known, progress)
        if report.rows == 0:
            out.unlink(missing_ok=True)
            return report, None, previous
        return report, out, previous


def adopt(
    donor: Path, backbone: Backbone, sch: pa.Schema, pending: list[Pending], staging: Path
) -> tuple[list[Pending], int]:
    """Copy the rows `donor` (a store) holds for pending files' contents into staging parts,
    with these files' paths and labels; return what is left to embed and how many were
    copied. Only a store of the same backbone, weights and feature columns is used."""
    from extractors.store.store import Store

    store = Store(donor)
    path = store.path / EMBEDDINGS
    if not store.exists or not path.exists():
        return pending, 0
    m = store.manifest()
    have = pq.read_schema(path)
    if (m.get("backbone"), m.get("weights")) != (backbone.name, backbone.weights) or any(
        f.name not in have.names or have.field(f.name).type != f.type for f in sch
    ):
        return pending, 0
    want = {p.sha256: p for p in pending}
    copied = 0
    with contextlib.ExitStack() as stack:
        with writing(staging):
            writer = stack.enter_context(StagingWriter(staging, sch, CHECKPOINT_ROWS, EmbedStats()))
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=sch.names):
            shas = batch.column("sha256").to_pylist()
            take = [i for i, s in enumerate(shas) if s in want]
            if not take:
                continue
            rows = pa.Table.from_batches([batch]).take(take)
            recs = [want.pop(s) for s in rows["sha256"].to_pylist()]
            for name in ("path", "label", "split", "bytes", "mtime_ns"):
                values = pa.array([getattr(r, name) for r in recs], sch.field(name).type)
                rows = rows.set_column(rows.schema.get_field_index(name), name, values)
            with writing(staging):
                writer.put(rows.cast(sch))
            copied += len(recs)
        with writing(staging):
            stack.close()  # the last staged part
    return [p for p in pending if p.sha256 in want], copied
