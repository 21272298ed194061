"""The predictions table: its columns, its format, where an unfinished run keeps its rows, and
the predictions folder of the `score` flow (its parts and its lock). On disk, beside the output
file `<out>` (Parquet, or CSV by its extension):

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
                                 ood_score    float64  how unusual the image is for the model's
                                                       training data: its percentile among
                                                       held-out training images (null: not
                                                       measured; extractors/monitor/ood.py)
                                 ood          bool     flagged out of distribution at the
                                                       stated level
                                 proba_<class> float64 the probability of every class
    <folder>/part-NNNNNN.parquet  the `score` flow's predictions folder: one such table per
                               run that found new files (`score_into_folder`, under the
                               folder's .lock, so two runs never pick one part)
    .<out name>.scoring/       a run that has not finished: staging/ (embedded rows, in a
                               store's layout: extractors/store/layout.py) and .lock. A re-run
                               continues from it; it is removed once <out> is in place.

The runner is heads/scoring/runner.py, the writer of the rows heads/scoring/writer.py.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from extractors.common import HeadstartError, exclusive

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
PROBA = "proba_"  # prefix of the per-class probability columns


class ScoringError(HeadstartError, ValueError):
    """A scoring run that cannot start or finish; the message says what to do."""


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
            ("ood_score", pa.float64()),
            ("ood", pa.bool_()),
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


@contextlib.contextmanager
def writing(out: Path) -> Iterator[None]:
    """An OSError of the block (writes only: a full, read-only or foreign disk) as one line
    naming `out`. Reads stay outside it, so a corrupt part is not reported as "cannot write"."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (*WRITE_ERRORS, None):  # (pyarrow's IO errors may have none)
            raise
        raise write_error(exc, out) from exc


def corrupt_staging(exc: BaseException, work: Path) -> ScoringError:
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
            raise write_error(exc, folder) from exc
        held.add(folder)
        try:
            yield folder
        finally:
            held.discard(folder)


PREVIOUS = ["path", "sha256", "bytes", "mtime_ns"]  # what says a file was scored before
WRITE_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)


def write_error(exc: OSError, out: Path) -> HeadstartError:
    """A disk that is full, read-only or not ours, as one line naming the file."""
    where = exc.filename or out
    return ScoringError(
        f"cannot write {where}: {exc.strerror or exc}. Nothing was written to {out}; free "
        "disk space or fix permissions, or give another --out, then run again."
    )
