"""Scoring a source with a classifier: one predictions row per image, resumable, exactly once.

On disk, beside the output file `<out>` (Parquet, or CSV by its extension):

    <out>                      one row per image of the source:
                                 path         string   the image file
                                 prediction   string   the most probable class (null: error)
                                 probability  float64  its probability
                                 model        string   who scored it: `<registered>/<version>`,
                                                       `finetuned:<id>` or a head file
                                 error        string   why the file could not be scored, else
                                                       null (such files are listed, not dropped)
                                 label        string   the source's own label, if it has one
                                 sha256       string   content hash (duplicates share a score)
                                 bytes, mtime_ns       what the file was when it was scored
                                 proba_<class> float64 the probability of every class
    <folder>/part-NNNNNN.parquet  the `score` flow's predictions folder: one such table per
                               run that found new files (`score_into_folder`, under the
                               folder's .lock, so two runs never pick one part)
    .<out name>.scoring/       a run that has not finished: staging/ (embedded rows, in a
                               store's layout: extractors/store/layout.py) and .lock. A re-run
                               continues from it; it is removed once <out> is in place.

Stages, each a plain function: plan (hash; skip files a previous table already scored) ->
adopt the rows a store already embedded with the same backbone (same content hash) -> embed
the rest (an engine, into staging parts) -> score the staged rows part by part into `<out>`,
written to a temporary name and renamed. Memory stays flat in the number of images.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from extractors.common import HeadstartError, atomic_path, exclusive
from extractors.embedding.backbones import Backbone
from extractors.embedding.embed import EmbedStats
from extractors.embedding.engines import Engine, LocalEngine
from extractors.embedding.sources import Source
from extractors.store.layout import CHECKPOINT_ROWS, EMBEDDINGS, STAGING, os_path, schema
from extractors.store.plan import Pending, UpdatePlan, plan_update
from extractors.store.staging import Staging, StagingWriter, remove_temp_files

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
PROBA = "proba_"  # prefix of the per-class probability columns


class ScoringError(HeadstartError, ValueError):
    """A scoring run that cannot start or finish; the message says what to do."""


class Scorer(Protocol):
    """What scores staged rows: class names, its own name, and probabilities per row."""

    classes: list[str]
    name: str

    def proba(self, rows: pa.Table) -> np.ndarray: ...


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


def output_schema(classes: list[str]) -> pa.Schema:
    """The predictions table's columns (see the module docstring)."""
    return pa.schema(
        [
            ("path", pa.string()),
            ("prediction", pa.string()),
            ("probability", pa.float64()),
            ("model", pa.string()),
            ("error", pa.string()),
            ("label", pa.string()),
            ("sha256", pa.string()),
            ("bytes", pa.int64()),
            ("mtime_ns", pa.int64()),
            *[(f"{PROBA}{c}", pa.float64()) for c in classes],
        ]
    )


def output_format(out: str | Path) -> str:
    """parquet or csv, from the file's extension."""
    fmt = FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise ScoringError(
            f"--out {out}: give a .parquet or .csv file name (the extension picks the format)"
        )
    return fmt


def work_folder(out: str | Path) -> Path:
    """Where an unfinished run keeps its staged rows: beside `out`, hidden."""
    out = Path(out)
    return out.parent / f".{out.name}.scoring"


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
        with _writing(out):
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
            with _writing(out):  # it records unreadable images as failures: these are writes
                lost = engine(staging.folder, backbone, pending, EmbedStats())
            failures += lost
            report.embedded = len(pending) - len(lost)
        labels = {r.path: r.label for r in source.records}
        _write(out, fmt, staging, plan, labels, dict(failures), scorer, report, progress)
        with _writing(out):
            staging.remove()
            (work / ".lock").unlink(missing_ok=True)


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """An OSError of the block (writes only: a full, read-only or foreign disk) as one line
    naming `out`. Reads stay outside it, so a corrupt part is not reported as "cannot write"."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (*WRITE_ERRORS, None):  # (pyarrow's IO errors may have none)
            raise
        raise _write_error(exc, out) from exc


def _staged(staging: Staging, work: Path) -> pa.Table:
    try:
        return staging.metadata()
    except (OSError, pa.ArrowException) as exc:
        raise _corrupt_staging(exc, work) from exc


def _corrupt_staging(exc: BaseException, work: Path) -> ScoringError:
    return ScoringError(
        f"a staged part of an earlier scoring run in {work} cannot be read ({exc}); delete "
        f"{work} and run again"
    )


PART = "part-{:06d}.parquet"  # the parts of a predictions folder (the `score` flow's)
FOLDER_WAIT_S = 600.0  # how long a run waits for another run into the same folder, then fails
_local = threading.local()  # .folders: predictions folders this thread holds the lock of


def read_parts(folder: str | Path) -> pa.Table | None:
    """Every part of a predictions folder, or None when there is none."""
    parts = sorted(Path(folder).glob("part-*.parquet"))
    if not parts:
        return None
    tables = []
    for part in parts:
        try:
            tables.append(pq.read_table(part))
        except (OSError, pa.ArrowException) as exc:
            raise ScoringError(
                f"cannot read {part}, an earlier part of {folder} ({exc}): restore it, or move "
                "it away to score its files again"
            ) from exc
    return pa.concat_tables(tables, promote_options="default")


@contextlib.contextmanager
def hold_folder(folder: str | Path) -> Iterator[Path]:
    """Hold the lock of a predictions folder (created if need be) for the block, re-entrant in
    a thread: a second run into it waits up to FOLDER_WAIT_S, then fails with one line. Take
    it before loading a model, so that waiting runs (an hourly schedule) hold no model."""
    folder = Path(folder).expanduser().resolve()
    held: set[Path] = _local.__dict__.setdefault("folders", set())
    if folder in held:
        yield folder
        return
    busy = ScoringError(
        f"another run is scoring into {folder} (waited {FOLDER_WAIT_S / 60:g} minutes); run "
        "again when it is done"
    )
    with contextlib.ExitStack() as stack:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            stack.enter_context(exclusive(folder / ".lock", busy, wait_s=FOLDER_WAIT_S))
        except OSError as exc:
            raise _write_error(exc, folder) from exc
        held.add(folder)
        try:
            yield folder
        finally:
            held.discard(folder)


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


PREVIOUS = ["path", "sha256", "bytes", "mtime_ns"]  # what says a file was scored before
WRITE_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)


def _write_error(exc: OSError, out: Path) -> HeadstartError:
    """A disk that is full, read-only or not ours, as one line naming the file."""
    where = exc.filename or out
    return ScoringError(
        f"cannot write {where}: {exc.strerror or exc}. Nothing was written to {out}; free "
        "disk space or fix permissions, or give another --out, then run again."
    )


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
        with _writing(staging):
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
            with _writing(staging):
                writer.put(rows.cast(sch))
            copied += len(recs)
        with _writing(staging):
            stack.close()  # the last staged part
    return [p for p in pending if p.sha256 in want], copied


def _write(
    out: Path,
    fmt: str,
    staging: Staging,
    plan: UpdatePlan,
    labels: dict[str, str | None],
    failures: dict[str, str],
    scorer: Scorer,
    report: ScoreReport,
    progress: bool,
) -> None:
    """Score the staged rows of this plan part by part, then list the errors and duplicates."""
    osch = output_schema(list(scorer.classes))
    facts = _Facts(plan, labels)
    wanted = {p: plan.sha[p] for p in plan.staged}
    firsts = set(plan.duplicate_of.values())
    kept: dict[str, dict[str, Any]] = {}  # rows of files that have duplicates
    written: set[str] = set()
    with contextlib.ExitStack() as stack:
        with _writing(out):
            tmp = stack.enter_context(atomic_path(out))
            writer = _writer(tmp, fmt, osch)
            stack.callback(writer.close)  # closed before atomic_path renames it
        for part in _parts(staging, progress):
            try:
                rows = pq.read_table(part)
            except (OSError, pa.ArrowException) as exc:
                raise _corrupt_staging(exc, work_folder(out)) from exc
            paths, shas = rows["path"].to_pylist(), rows["sha256"].to_pylist()
            take = [
                i
                for i, (p, s) in enumerate(zip(paths, shas, strict=True))
                if wanted.get(p) == s and p not in written and p not in failures
            ]
            if not take:
                continue
            rows = rows.take(take)
            table = _scored(rows, facts, scorer, osch)
            done = table["path"].to_pylist()
            written.update(done)
            with _writing(out):
                writer.write_table(table)
            report.scored += table.num_rows
            firsts_here = [i for i, p in enumerate(done) if p in firsts]
            if firsts_here:
                kept |= {r["path"]: r for r in table.take(firsts_here).to_pylist()}
        missing = [p for p in wanted if p not in written and p not in failures]
        if missing:
            raise ScoringError(
                f"{len(missing)} file(s) were neither scored nor recorded as errors, e.g. "
                f"{missing[0]}; {out} was not written. Run again."
            )
        errors = [facts.error_row(p, why) for p, why in sorted(failures.items())]
        dups = []
        for path, first in sorted(plan.duplicate_of.items()):
            like = kept.get(first) or facts.error_row(first, failures.get(first, ""))
            dups.append(like | facts.of(path, sha256=like["sha256"]))
        for rows in (errors, dups):
            if rows:
                with _writing(out):
                    writer.write_table(pa.Table.from_pylist(rows, schema=osch))
        report.errors = len(errors) + sum(1 for d in dups if d["error"])
        report.duplicates = len(dups)
        report.errors_by_path = dict(sorted(failures.items()))
        report.rows = report.scored + len(errors) + len(dups)
        with _writing(out):
            stack.close()  # the last rows, and the rename


def _parts(staging: Staging, progress: bool) -> Iterator[Path]:
    parts = staging.parts()
    if not progress or len(parts) < 2:
        yield from parts
        return
    from tqdm.auto import tqdm

    yield from tqdm(parts, desc="scoring", unit="part")


def _writer(tmp: Path, fmt: str, osch: pa.Schema) -> Any:
    if fmt == "csv":
        return pacsv.CSVWriter(str(tmp), osch)
    return pq.ParquetWriter(tmp, osch, compression="zstd")


def _scored(rows: pa.Table, facts: _Facts, scorer: Scorer, osch: pa.Schema) -> pa.Table:
    proba = np.asarray(scorer.proba(rows), dtype=np.float64)
    best = proba.argmax(axis=1)
    classes = np.asarray(scorer.classes, dtype=object)
    paths = rows["path"].to_pylist()
    each = [facts.of(p) for p in paths]
    cols: dict[str, Any] = {
        "path": paths,
        "prediction": classes[best].tolist(),
        "probability": proba[np.arange(len(best)), best],
        "model": [scorer.name] * len(paths),
        "error": [None] * len(paths),
        **{c: [e[c] for e in each] for c in ("label", "sha256", "bytes", "mtime_ns")},
    }
    for j, c in enumerate(scorer.classes):
        cols[f"{PROBA}{c}"] = proba[:, j]
    return pa.Table.from_pydict(cols, schema=osch)


class _Facts:
    """What the plan and the source know of a file: label, content hash, size and mtime."""

    def __init__(self, plan: UpdatePlan, labels: dict[str, str | None]):
        self.plan, self.labels = plan, labels

    def of(self, path: str, sha256: str | None = None) -> dict[str, Any]:
        size, mtime = self.plan.stat.get(path) or _stat(path)
        return {
            "path": path,
            "label": self.labels.get(path),
            "sha256": self.plan.sha.get(path, sha256),
            "bytes": size,
            "mtime_ns": mtime,
        }

    def error_row(self, path: str, why: str) -> dict[str, Any]:
        return {
            "prediction": None,
            "probability": None,
            "model": None,
            "error": why or "not scored",
            **self.of(path),
        }


def _stat(path: str) -> tuple[int | None, int | None]:
    try:
        st = os.stat(os_path(path))
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns
