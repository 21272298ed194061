"""Index lifecycle over a store's vectors: choose, build, tune, update incrementally, open.

`refresh` brings `<folder>/index.faiss` in line with the rows given by `batches` (every
(vectors, ids) batch of the store, streamed) and returns the manifest's `index` entry:

- **fresh build** (no usable index, a different structure is chosen, or `rebuild`): train on a
  sample, add every row except a held-out sample, tune the search parameters on the held-out
  queries (they are not in the index yet), then add them;
- **incremental update**: remove the ids that left the store, measure recall at the current
  parameters with the *new* rows as queries before adding them, re-tune when it fell below the
  target, rebuild when re-tuning cannot reach it; then add the new rows. HNSW cannot delete,
  so a removal rebuilds it.
- **old regions**: the build's held-out rows stay the store's fixed recall queries
  (`held_out` in the entry: drawn once, topped up from the older rows as rows are deleted).
  After every update they are asked again, with their own row left out of both the answer
  and the truth; when their recall falls below the target the index is rebuilt (trained
  anew on the store as it is now), so a store that grows 10x with new content cannot lose
  recall where it started.

Ids in the index always equal the Parquet ids (as a set; IVF keeps them list by list).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from extractors.common import normalize
from extractors.index.ann import AnnIndex, index_ids, read_index, write_index
from extractors.index.kinds import IndexChoice, choose, kind_of, new_index, train_sample_size
from extractors.index.recall import (
    TUNE_QUERIES,
    ExactTopK,
    K,
    Tuning,
    check,
    held_out,
    recall_at_k,
    tune,
)
from extractors.index.rerank import Reranker
from extractors.settings import IndexSettings
from extractors.store.layout import INDEX, VECTOR_IDS, VECTORS

Batches = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]
MIN_CHECK_QUERIES = 20  # fewer new rows than this: too few to measure recall on


def open_index(folder: Path, entry: dict[str, Any] | None, mmap: bool = False) -> AnnIndex:
    """The index on disk with the tuned search parameters of its manifest entry."""
    raw = read_index(Path(folder) / INDEX, mmap=mmap)
    entry = entry or {}
    kind = kind_of(raw)
    try:
        reranker = Reranker(folder, raw.d) if kind == "ivf_pq" else None
    except (OSError, ValueError) as exc:  # missing, truncated or shorter than its ids
        raise RuntimeError(
            f"the re-rank files ({VECTORS}, {VECTOR_IDS}) are unreadable: {exc}"
        ) from exc
    ann = AnnIndex(raw, kind=kind, reranker=reranker)
    ann.set_params(entry.get("tuning", {}).get("params", {}))
    return ann


def consistent(ann: AnnIndex, ids: np.ndarray) -> bool:
    """The index holds exactly `ids`, and the re-rank files (ivf_pq) exactly its rows."""
    have = index_ids(ann.index)
    if len(have) != len(ids) or not np.array_equal(np.sort(have), np.sort(ids)):
        return False
    return ann.reranker is None or rerank_problem(ann.reranker, have) is None


def rerank_problem(reranker: Reranker, ids: np.ndarray) -> str | None:
    """Why the re-rank files do not hold the rows `ids` (None when they do): the vectors file
    shorter than one row per entry of the ids file, or an id missing from it (rows of deleted
    ids may stay until the next build). Rows past the ids' end (an append killed before it
    wrote the ids) are never read, and the next append truncates them. Which vector each row
    holds is checked against the Parquet file by `Store.verify`."""
    n, row_bytes = len(reranker.ids), reranker.dim * 4
    path = reranker.folder / VECTORS
    size = path.stat().st_size if path.exists() else 0
    if size < n * row_bytes:
        return (
            f"{VECTORS} holds {size / row_bytes:g} rows but {VECTOR_IDS} {n} ids: they are "
            "from different commits"
        )
    if not np.isin(ids, reranker.ids).all():
        return f"{VECTOR_IDS} lacks ids the index holds"
    return None


def refresh(
    folder: Path,
    batches: Batches,
    ids: np.ndarray,
    dim: int,
    previous: dict[str, Any] | None = None,
    settings: IndexSettings | None = None,
    rebuild: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Make the index hold exactly `ids`; return its manifest entry (choice, tuning, history)."""
    folder = Path(folder)
    settings = (settings or IndexSettings()).resolved(previous)
    choice = choose(len(ids), dim, settings.max_memory, settings.kind)
    why = "asked to rebuild" if rebuild else _why_rebuild(folder, choice, previous)
    if why is None:
        entry = _update(folder, batches, ids, choice, previous or {}, settings)
        if isinstance(entry, dict):
            return entry
        why = entry
    return _build(folder, batches, ids, choice, settings, seed, why)


def _why_rebuild(folder: Path, choice: IndexChoice, previous: dict | None) -> str | None:
    if not (folder / INDEX).exists():
        return "no index yet"
    if not previous or "choice" not in previous:
        return "the index has no recorded choice (made by an older headstart)"
    if not choice.same_build(previous["choice"]):
        old = previous["choice"]
        return f"the store now calls for {choice.factory}, not {old.get('factory')}"
    return None


def _entry(
    choice: IndexChoice,
    settings: IndexSettings,
    tuning: Tuning | dict,
    action: str,
    folder: Path,
    history: list[dict] | None = None,
) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    tuning = tuning.as_dict() if isinstance(tuning, Tuning) else tuning
    size = (folder / INDEX).stat().st_size
    event = {"at": now, "action": action, "ntotal": choice.n, "recall": tuning.get("recall")}
    return {
        "type": choice.factory,
        "metric": "cosine",
        "ntotal": choice.n,
        "choice": choice.as_dict(),
        "settings": {
            "max_memory": settings.max_memory,
            "recall": settings.recall,
            "kind": settings.kind,
        },
        "tuning": tuning,
        "file_bytes": size,
        "history": [*(history or []), event][-20:],
    }


def _exact_tuning(k: int = K) -> Tuning:
    return Tuning({}, 1.0, 0.0, 1.0, k, 0, True, [{"recall": 1.0, "ms_per_query": 0.0}])


def _build(
    folder: Path,
    batches: Batches,
    ids: np.ndarray,
    choice: IndexChoice,
    settings: IndexSettings,
    seed: int,
    why: str,
) -> dict[str, Any]:
    """A fresh index of `choice` over `ids`, tuned on held-out rows; its manifest entry.

    The store is read once for the training sample and the held-out queries; for ivf_pq that
    pass also writes every row, normalised, to the re-rank file, and the index is filled from
    that file (in the page cache) rather than by reading the store a second time."""
    n = len(ids)
    rng = np.random.default_rng(seed)
    exact = choice.kind == "flat"
    hold = np.zeros(0, np.int64) if exact or n < 50 else ids[held_out(n, seed)]
    need = train_sample_size(choice)
    pool = np.setdiff1d(ids, hold)
    train_ids = (
        pool if need >= len(pool) else rng.choice(pool, size=min(need, len(pool)), replace=False)
    )
    index = new_index(choice)
    held_vecs: list[np.ndarray] = []
    held_ids: list[np.ndarray] = []
    with _VectorFile(folder, fresh=True, enabled=choice.kind == "ivf_pq") as vf:
        if need or len(hold) or vf.enabled:
            train: list[np.ndarray] = []
            for vectors, b_ids in batches():
                v = normalize(vectors)
                if need:
                    train.append(v[np.isin(b_ids, train_ids)])
                mask = np.isin(b_ids, hold)
                held_vecs.append(v[mask])
                held_ids.append(b_ids[mask])
                vf.add(v, b_ids)
            if need:
                index.train(np.concatenate(train))
                del train
        queries = np.concatenate(held_vecs) if held_vecs else np.zeros((0, choice.dim), np.float32)
        q_ids = np.concatenate(held_ids) if held_ids else np.zeros(0, np.int64)
        truth = ExactTopK(queries, K)
        rows = vf.batches() if vf.enabled else ((normalize(v), i) for v, i in batches())
        for v, b_ids in rows:
            keep = ~np.isin(b_ids, q_ids)
            v, b_ids = v[keep], np.ascontiguousarray(b_ids[keep], np.int64)
            index.add_with_ids(v, b_ids)
            truth.add(v, b_ids, normalized=True)
        ann = AnnIndex(index, kind=choice.kind)
        if vf.enabled:
            vf.commit()
            ann.reranker = Reranker(folder, choice.dim)
    if exact or not len(queries):
        tuning = _exact_tuning() if exact else tune(ann, queries, queries[:0], 0.0)
    else:
        tuning = tune(ann, queries, truth.result(), settings.recall, K, choice.nlist)
    if len(q_ids):
        index.add_with_ids(queries, q_ids)
    write_index(index, folder / INDEX)
    entry = _entry(choice, settings, tuning, f"built ({why})", folder)
    return entry | {"held_out": [int(i) for i in q_ids]}


def _update(
    folder: Path,
    batches: Batches,
    ids: np.ndarray,
    choice: IndexChoice,
    previous: dict[str, Any],
    settings: IndexSettings,
) -> dict[str, Any] | str:
    """Remove and add in place; or why it has to be rebuilt instead."""
    try:
        ann = open_index(folder, previous)
    except RuntimeError as exc:
        return f"the index file is unreadable ({exc})"
    have = index_ids(ann.index)
    if ann.reranker is not None and (why := rerank_problem(ann.reranker, have)):
        return why  # (a tail past the ids' end is not: `Reranker.append` truncates it first)
    removed = np.setdiff1d(have, ids)
    added = np.setdiff1d(ids, have)
    if len(removed) and choice.kind == "hnsw":
        return f"{len(removed)} rows left the store and HNSW cannot delete"
    if len(removed):
        ann.index.remove_ids(np.ascontiguousarray(removed, np.int64))
    new_vecs, new_ids = [], []
    check_ids = added[:TUNE_QUERIES] if choice.kind != "flat" else added[:0]
    truth = ExactTopK(np.zeros((0, choice.dim), np.float32), K)
    if len(added):
        for vectors, b_ids in batches():
            mask = np.isin(b_ids, added)
            new_vecs.append(normalize(vectors[mask]))
            new_ids.append(b_ids[mask])
        queries = np.concatenate(new_vecs)
        q_ids = np.concatenate(new_ids)
        sel = np.isin(q_ids, check_ids)
        if sel.sum() >= MIN_CHECK_QUERIES:
            truth = ExactTopK(queries[sel], K)
            for vectors, b_ids in batches():
                keep = ~np.isin(b_ids, added)
                truth.add(vectors[keep], b_ids[keep])
    else:
        queries, q_ids, sel = np.zeros((0, choice.dim), np.float32), added, np.zeros(0, bool)
    tuning = dict(previous.get("tuning", {}))
    action = f"updated in place (+{len(added)} -{len(removed)})"
    if len(truth.q):
        recall = check(ann, queries[sel], truth.result())
        action += f", recall@{K} on {int(sel.sum())} new rows: {recall:.3f}"
        if recall < settings.recall:
            retuned = tune(ann, queries[sel], truth.result(), settings.recall, K, choice.nlist)
            if not retuned.reached:
                return (
                    f"recall@{K} on new rows fell to {recall:.3f}, below {settings.recall}, "
                    "and re-tuning could not restore it"
                )
            tuning = retuned.as_dict()
            action += f", re-tuned to {retuned.params}"
        else:
            tuning["last_check"] = recall
    with _VectorFile(folder, fresh=False, enabled=choice.kind == "ivf_pq") as vf:
        if len(q_ids):
            ann.index.add_with_ids(queries, np.ascontiguousarray(q_ids, np.int64))
            vf.add(queries, q_ids)
        vf.commit()
    if choice.kind == "ivf_pq":
        ann.reranker = Reranker(folder, choice.dim)
    held = _held_out(previous.get("held_out"), ids, added, removed, choice)
    if len(held) >= MIN_CHECK_QUERIES and (len(added) or len(removed)):
        old = old_recall(ann, batches, held)
        tuning["old_rows_recall"] = old
        action += f", recall@{K} on {len(held)} older rows: {old:.3f}"
        if old < settings.recall:
            return (
                f"recall@{K} on the {len(held)} older rows kept as queries fell to {old:.3f}, "
                f"below {settings.recall}"
            )
    write_index(ann.index, folder / INDEX)
    entry = _entry(choice, settings, tuning, action, folder, previous.get("history"))
    return entry | {"held_out": [int(i) for i in held]}


def _held_out(
    kept: list[int] | None,
    ids: np.ndarray,
    added: np.ndarray,
    removed: np.ndarray,
    choice: IndexChoice,
) -> np.ndarray:
    """The store's fixed recall queries: those still in the store, topped up (seeded) to their
    number from rows that were there before this update (a store indexed before they were
    kept draws them now); none for an exact index."""
    if choice.kind == "flat":
        return np.zeros(0, np.int64)
    held = np.asarray(kept or [], np.int64)
    want = len(held) if kept else min(TUNE_QUERIES, max(len(ids) // 10, 1))
    held = held[np.isin(held, ids)]
    if len(held) < want:
        older = np.setdiff1d(np.setdiff1d(ids, added), held)
        rng = np.random.default_rng(len(removed))
        extra = rng.choice(older, size=min(want - len(held), len(older)), replace=False)
        held = np.concatenate([held, extra])
    return np.sort(held)


def old_recall(ann: AnnIndex, batches: Batches, held: np.ndarray, k: int = K) -> float:
    """Recall@k of rows that are in the index, each asked for its k nearest other rows (its
    own row left out of the answer and of the exact truth)."""
    vecs, got = [], []
    for vectors, b_ids in batches():
        mask = np.isin(b_ids, held)
        vecs.append(normalize(vectors[mask]))
        got.append(b_ids[mask])
    queries, q_ids = np.concatenate(vecs), np.concatenate(got)
    truth = ExactTopK(queries, k + 1)
    for vectors, b_ids in batches():
        truth.add(vectors, b_ids)
    _, found = ann.search(queries, k + 1)
    return recall_at_k(_without(found, q_ids, k), _without(truth.result(), q_ids, k), k)


def _without(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's first k ids other than its own (-1 where fewer)."""
    out = np.full((len(found), k), -1, np.int64)
    for r, (row, me) in enumerate(zip(found, own, strict=True)):
        others = row[row != me][:k]
        out[r, : len(others)] = others
    return out


class _VectorFile:
    """Float32 rows for exact re-ranking: a fresh file (renamed into place) or an append."""

    CHUNK = 50_000  # rows a batch when reading a fresh file back

    def __init__(self, folder: Path, fresh: bool, enabled: bool):
        self.folder, self.fresh, self.enabled = folder, fresh, enabled
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.fh = None
        self.ids: list[np.ndarray] = []
        self.dim = 0

    def __enter__(self) -> _VectorFile:
        if self.enabled and self.fresh:
            self.tmp = self.folder / f".{VECTORS}.{os.getpid()}.tmp"
            self.fh = open(self.tmp, "wb")
        elif not self.enabled and self.fresh:
            Reranker.reset(self.folder)
        return self

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if not self.enabled or not len(ids):
            return
        if self.fh is not None:
            block = np.ascontiguousarray(vectors, np.float32)
            self.dim = block.shape[1]
            self.fh.write(block.data)  # the array's own buffer: no bytes copy
            self.ids.append(np.asarray(ids, np.int64))
        else:
            self.parts.append((vectors, ids))

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The rows written so far to a fresh file, read back memory-mapped, in chunks."""
        self.fh.flush()
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)
        if not len(ids):
            return
        rows = np.memmap(self.tmp, np.float32, mode="r", shape=(len(ids), self.dim))
        for s in range(0, len(ids), self.CHUNK):
            yield np.array(rows[s : s + self.CHUNK]), ids[s : s + self.CHUNK]
        del rows

    def commit(self) -> None:
        if not self.enabled:
            return
        if self.fh is not None:
            # The old index refers to the old files: drop it first, so a crash from here on
            # leaves no index (rebuilt on next use) rather than one that mismatches its vectors.
            (self.folder / INDEX).unlink(missing_ok=True)
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            self.fh = None
            all_ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)
            os.replace(self.tmp, self.folder / VECTORS)
            Reranker.write_ids(self.folder, all_ids)
        elif self.parts:
            Reranker.append(
                self.folder,
                np.concatenate([v for v, _ in self.parts]),
                np.concatenate([i for _, i in self.parts]),
            )
            self.parts = []

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            self.fh.close()
        if self.enabled and self.fresh:  # also when its rename into place failed
            Path(self.tmp).unlink(missing_ok=True)
