"""The writer of a predictions table (heads/scoring/table.py): the staged rows of a plan
scored part by part, then a row for every file that could not be scored and for every
duplicate (its first file's score), into `<out>`, written to a temporary name and renamed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from extractors.common import atomic_path
from extractors.embedding.objects import stamp
from extractors.store.plan import UpdatePlan
from extractors.store.staging import Staging
from heads.scoring.monitored import Monitored
from heads.scoring.table import (
    PROBA,
    ScoringError,
    corrupt_staging,
    output_schema,
    work_folder,
    writing,
)

if TYPE_CHECKING:
    from heads.scoring.runner import ScoreReport


class Scorer(Protocol):
    """What scores staged rows: class names, its own name, and probabilities per row."""

    classes: list[str]
    name: str

    def proba(self, rows: pa.Table) -> np.ndarray: ...


def write_predictions(
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
    firsts = set(plan.duplicate_of.values())
    kept: dict[str, dict[str, Any]] = {}  # rows of files that have duplicates
    with contextlib.ExitStack() as stack:
        with writing(out):
            tmp = stack.enter_context(atomic_path(out))
            writer = _writer(tmp, fmt, osch)
            stack.callback(writer.close)  # closed before atomic_path renames it
        for rows in _to_score(out, staging, plan, failures, progress):
            table = _scored(rows, facts, scorer, osch)
            with writing(out):
                writer.write_table(table)
            report.scored += table.num_rows
            firsts_here = [i for i, p in enumerate(table["path"].to_pylist()) if p in firsts]
            if firsts_here:
                kept |= {r["path"]: r for r in table.take(firsts_here).to_pylist()}
        errors, dups = _unscored(plan, facts, failures, kept)
        for rows in (errors, dups):
            if rows:
                with writing(out):
                    writer.write_table(pa.Table.from_pylist(rows, schema=osch))
        report.errors = len(errors) + sum(1 for d in dups if d["error"])
        report.duplicates = len(dups)
        report.errors_by_path = dict(sorted(failures.items()))
        report.rows = report.scored + len(errors) + len(dups)
        with writing(out):
            stack.close()  # the last rows, and the rename


def _to_score(
    out: Path, staging: Staging, plan: UpdatePlan, failures: dict[str, str], progress: bool
) -> Iterator[pa.Table]:
    """The staged rows to score, part by part: each file of the plan once, with the content
    it planned, unless it failed. At the end, a ScoringError if a file of the plan was
    neither staged nor failed."""
    wanted = {p: plan.sha[p] for p in plan.staged}
    written: set[str] = set()
    for part in _parts(staging, progress):
        try:
            rows = pq.read_table(part)
        except (OSError, pa.ArrowException) as exc:
            raise corrupt_staging(exc, work_folder(out)) from exc
        paths, shas = rows["path"].to_pylist(), rows["sha256"].to_pylist()
        take = [
            i
            for i, (p, s) in enumerate(zip(paths, shas, strict=True))
            if wanted.get(p) == s and p not in written and p not in failures
        ]
        if not take:
            continue
        written.update(paths[i] for i in take)
        yield rows.take(take)
    missing = [p for p in wanted if p not in written and p not in failures]
    if missing:
        raise ScoringError(
            f"{len(missing)} file(s) were neither scored nor recorded as errors, e.g. "
            f"{missing[0]}; {out} was not written. Run again."
        )


def _unscored(
    plan: UpdatePlan, facts: _Facts, failures: dict[str, str], kept: dict[str, dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of the files not scored: (one per failure, one per duplicate with the score
    of the file it duplicates, `kept`, or that file's error)."""
    errors = [facts.error_row(p, why) for p, why in sorted(failures.items())]
    dups = []
    for path, first in sorted(plan.duplicate_of.items()):
        like = kept.get(first) or facts.error_row(first, failures.get(first, ""))
        dups.append(like | facts.of(path, sha256=like["sha256"]))
    return errors, dups


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
    if isinstance(scorer, Monitored):
        cols |= scorer.ood_columns(rows, proba)
    else:
        cols |= {"ood_score": [None] * len(paths), "ood": [None] * len(paths)}
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
        return stamp(path)
    except OSError:
        return None, None
