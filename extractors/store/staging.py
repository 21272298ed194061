"""`staging/`: rows embedded by an update that has not committed yet, as whole Parquet parts
(numbered by the local engine, named by content by a distributed one), written on a
background thread; a re-run after a crash reuses them."""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from extractors.common import write_bytes_atomic
from extractors.store.layout import META_COLUMNS, STAGING, STAGING_TAG, content_id
from extractors.store.plan import Pending

if TYPE_CHECKING:
    from extractors.embedding.backbones import Backbone
    from extractors.embedding.embed import EmbeddedBatch, EmbedStats


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def batch_table(batch: EmbeddedBatch, pending: list[Pending], sch: pa.Schema) -> pa.Table:
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


def remove_temp_files(folder: Path) -> None:
    """Drop temporary files of writers that were killed (the caller holds the lock)."""
    if folder.is_dir():
        for tmp in [*folder.glob(".*.tmp"), *folder.glob(f"{STAGING}/.*.tmp")]:
            tmp.unlink(missing_ok=True)


class Staging:
    """`staging/`: Parquet parts of rows embedded by an update that has not committed yet.

    Parts are complete files renamed into place, so a killed run leaves only whole parts (and
    temp files, removed on the next run). Parts from another backbone or schema are dropped.
    """

    def __init__(self, folder: Path, sch: pa.Schema, backbone: Backbone):
        self.folder = folder
        self.schema = sch
        self.tag = {"backbone": backbone.name, "weights": backbone.weights}
        meta = folder / STAGING_TAG
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


class StagingWriter:
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

    def __enter__(self) -> StagingWriter:
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
                    final = next_part(self.folder)
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


def next_part(folder: Path) -> Path:
    """The next numbered part of the local engine."""
    numbered = sorted(folder.glob("part-*.parquet"))
    n = int(numbered[-1].stem.split("-")[1]) + 1 if numbered else 0
    return folder / f"part-{n:06d}.parquet"
