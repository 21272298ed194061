"""The embedding store: one directory per (source, backbone), Parquet + manifest + FAISS index
(the layout: extractors/store/layout.py). `Store` is its entry point: it reads it here, judges
it (extractors/store/check.py) and updates it (extractors/store/update.py): plan (store/plan.py)
-> engine (embedding/engines.py) -> staging (store/staging.py) -> commit (store/commit.py) ->
index (index/maintain.py), under a rollback (store/rollback.py).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from extractors.common import ROW_GROUP, HeadstartError, exclusive
from extractors.embedding.sources import Source
from extractors.index import ann, maintain
from extractors.settings import IndexSettings
from extractors.store import check
from extractors.store.grouping import Grouping
from extractors.store.layout import (
    EMBEDDINGS,
    FAILURE_SCHEMA,
    FAILURES,
    INDEX,
    MANIFEST,
    META_COLUMNS,
    embedding_matrix,
    schema,
)

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
        an index whose ids differ from the Parquet ids, a manifest that disagrees
        (extractors/store/check.py)."""
        return check.verify(self)

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
        """True when an update from `source` would leave the store exactly as it is (built
        with `backbone`, and `layers`, None = the store's own): reads only, and needs no model
        (extractors/store/check.py)."""
        return check.unchanged(self, source, backbone, layers)

    def metadata(self) -> pa.Table | None:
        """Every column but the embeddings, or None when nothing was committed yet."""
        path = self.path / EMBEDDINGS
        if not path.exists():
            return None
        return pq.read_table(path, columns=META_COLUMNS)

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
        from extractors.store import update

        update.keep_audit(self, findings, summary)

    def reindex(
        self, settings: IndexSettings | None = None, rebuild: bool = False
    ) -> dict[str, Any]:
        """Refresh the index (choice, training, recall tuning) and record it in the manifest.

        What `settings` sets overrides the store's saved index settings."""
        from extractors.store import update

        return update.reindex(self, settings, rebuild)

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
        """Bring the store in line with `source`: embed new or changed files, drop deleted ones,
        exactly once, in bounded memory, under the writer's lock (extractors/store/update.py)."""
        from extractors.store import update

        return update.update(self, source, backbone, seed, progress, index, engine, grouping)

    def move_splits(self, moves: dict[int, str], note: dict[str, Any]) -> dict[str, Any]:
        """Put the rows `moves` names (id -> split) in those splits, recording `note` in the
        manifest's split_groups (extractors/store/update.py). Returns the new manifest."""
        from extractors.store import update

        return update.move_splits(self, moves, note)
