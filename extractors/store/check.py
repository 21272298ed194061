"""Reading a store to judge it: `verify` (is what is on disk sound?) and `unchanged` (would an
update from this source leave it as it is?). Reads only: no lock, no model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from extractors.common import normalize
from extractors.embedding.images import file_sha256
from extractors.embedding.objects import stamps
from extractors.embedding.sources import Source
from extractors.index import maintain
from extractors.index.ann import index_ids
from extractors.store.layout import (
    DUPLICATE,
    EMBEDDINGS,
    INDEX,
    STAGING,
    VECTORS,
    embedding_matrix,
)

if TYPE_CHECKING:
    from extractors.store.store import Store


def verify(store: Store) -> list[str]:
    """Problems found on disk (empty when sound): unreadable files, duplicate ids or paths,
    an index whose ids differ from the Parquet ids, a manifest that disagrees."""
    problems: list[str] = []
    try:
        meta = store.table(["id", "path"])
    except (OSError, pa.ArrowException) as exc:
        return [f"{EMBEDDINGS} is unreadable: {exc}"]
    ids, paths = meta["id"].to_numpy(), meta["path"].to_pylist()
    if len(np.unique(ids)) != len(ids):
        problems.append(f"{len(ids) - len(np.unique(ids))} duplicate ids")
    if len(set(paths)) != len(paths):
        problems.append(f"{len(paths) - len(set(paths))} duplicate paths")
    try:
        problems.extend(index_problems(store, ids))
    except RuntimeError as exc:
        problems.append(f"{INDEX} is unreadable: {exc}")
    if store.exists and store.manifest().get("rows") != len(ids):
        problems.append("manifest row count differs from the Parquet file")
    return problems


def index_problems(store: Store, ids: np.ndarray, sample: int = 64) -> list[str]:
    """What is wrong with the index (RuntimeError: unreadable): missing, other ids than
    the Parquet's (`ids`, in its row order), or (ivf_pq) re-rank files out of line with it
    or holding, for a sample of rows, another row's vector (only the Parquet row groups
    holding the sample are read)."""
    if not (store.path / INDEX).exists():
        return [f"{INDEX} is missing"]
    idx = maintain.open_index(store.path, store.manifest().get("index") if store.exists else None)
    if not maintain.consistent(idx, ids):
        have = index_ids(idx.index)
        if len(have) != len(ids) or not np.array_equal(np.sort(have), np.sort(ids)):
            return [f"{INDEX}'s ids differ from the Parquet ids"]
        return [maintain.rerank_problem(idx.reranker, have) or "re-rank files differ"]
    rr = idx.reranker
    if rr is None or not len(rr.ids) or not len(ids):
        return []
    have = np.intersect1d(rr.ids, ids)  # (rows of deleted ids stay until the next build)
    probe = np.unique(have[np.linspace(0, len(have) - 1, sample).astype(int)])
    at = np.flatnonzero(np.isin(ids, probe))  # their rows in the Parquet file
    reader = pq.ParquetFile(store.path / EMBEDDINGS)
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


def unchanged(
    store: Store, source: Source, backbone: str, layers: Sequence[str] | None = None
) -> bool:
    """True when an update from `source` would leave the store exactly as it is: built
    with `backbone` (and `layers`, None = the store's own), from the same source, every
    file of it already a row with the same size, modification time, label and given
    split (or still a duplicate of one, with the size and time it had then), no row left
    over, no failed file to retry, nothing staged, the index in line. Reads only, and needs no
    model: an unchanged scheduled run costs a listing and a few `stat` calls."""
    if not store.exists or (store.path / STAGING).exists():
        return False
    m = store.manifest()
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
    old = store.metadata()
    if old is None:
        return not source.records
    cols = [old[c].to_pylist() for c in ("path", "label", "split", "bytes", "mtime_ns")]
    rows = {p: (lab, s, b, t) for p, lab, s, b, t in zip(*cols, strict=True)}
    dups = duplicates(store, old) if m.get("duplicates") else {}
    now = stamps([r.path for r in source.records], source.stamps)  # objects': in parallel
    for rec in source.records:
        row = rows.get(rec.path)
        if row is None and rec.path in dups:  # still the bytes of the row it duplicates
            sha, was = dups[rec.path]
            try:
                if was is not None and now[rec.path] == was:
                    continue  # not touched since it was found a duplicate
                if file_sha256(rec.path) != sha:  # touched: hashed, as an update would
                    return False
            except OSError:
                return False
            continue
        if row is None or row[0] != rec.label or rec.split not in (None, row[1]):
            return False
        if now[rec.path] != row[2:]:  # changed, or gone (an OSError)
            return False
    return store.index_if_consistent(mmap=True) is not None  # unreadable: rebuilt


def duplicates(store: Store, rows: pa.Table) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """path -> (sha256, (bytes, mtime_ns) or None) of the files the last update found to
    duplicate a row's bytes (no stat in a store written before it was recorded)."""
    sha = dict(zip(rows["path"].to_pylist(), rows["sha256"].to_pylist(), strict=True))
    out = {}
    for f in store.failures().to_pylist():
        first = f["reason"].removeprefix(DUPLICATE)
        if first != f["reason"] and first in sha:
            known = f.get("bytes") is not None and f.get("mtime_ns") is not None
            out[f["path"]] = (sha[first], (f["bytes"], f["mtime_ns"]) if known else None)
    return out
