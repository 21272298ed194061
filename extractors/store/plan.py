"""The update plan: which files of a source keep their committed row, reuse a staged row, need
embedding, or fail (unreadable, not a file, duplicate content). Reads only; no model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from extractors.common import FILE_TIMEOUT_S, DaemonPool
from extractors.embedding.images import file_sha256
from extractors.embedding.objects import Stamp, failure_reason, is_url, stamps
from extractors.embedding.sources import ImageRecord, Source
from extractors.store.layout import DUPLICATE

HASH_THREADS = 4  # files hashed at once (reads; the GIL is released)
REMOTE_HASH_THREADS = 16  # objects hashed at once: each waits on the network more than on a disk


@dataclass(frozen=True)
class Pending:
    """One file an update has to embed, with what the plan already knows of it."""

    path: str
    sha256: str
    label: str | None
    split: str | None
    bytes: int
    mtime_ns: int


@dataclass
class UpdatePlan:
    """Per file of the source, what the update does with it (see `plan_update`)."""

    to_embed: list[ImageRecord] = field(default_factory=list)
    keep: dict[str, Any] = field(default_factory=dict)  # path -> (label, split|None), old rows
    staged: dict[str, Any] = field(default_factory=dict)  # path -> (label, split|None), new rows
    sha: dict[str, str] = field(default_factory=dict)
    stat: dict[str, tuple[int, int]] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    duplicate_of: dict[str, str] = field(default_factory=dict)  # path -> first path, same bytes
    duplicate_stat: dict[str, tuple[int, int]] = field(default_factory=dict)  # (bytes, mtime_ns)
    groups: dict[str, str] = field(default_factory=dict)  # path -> a manifest's group key
    removed: int = 0

    def pending(self) -> list[Pending]:
        return [
            Pending(r.path, self.sha[r.path], r.label, r.split, *self.stat[r.path])
            for r in self.to_embed
        ]


def known_hashes(*tables: pa.Table | None) -> dict[str, tuple[str, int, int]]:
    """path -> (sha256, bytes, mtime_ns) of the rows of `tables`, the first table first."""
    known: dict[str, tuple[str, int, int]] = {}
    for t in tables:
        if t is None:
            continue
        cols = [t[c].to_pylist() for c in ("path", "sha256", "bytes", "mtime_ns")]
        for p, s, b, m in zip(*cols, strict=True):
            known.setdefault(p, (s, b, m))
    return known


def plan_update(
    source: Source,
    old: pa.Table | None,
    staged: pa.Table,
    hashed: dict[str, tuple[str, int, int]] | None = None,
) -> UpdatePlan:
    """Hash the source (reusing stored hashes of files whose size and mtime are unchanged, and
    those of `hashed`, path -> (sha256, bytes, mtime_ns): another store's plan of the same
    source) and decide per file: keep its committed row, use its staged row, embed it, or
    record it as a failure or duplicate."""
    plan = UpdatePlan()
    committed = known_hashes(old)
    known = (hashed or {}) | known_hashes(old, staged)
    staged_pairs = set(zip(staged["path"].to_pylist(), staged["sha256"].to_pylist(), strict=True))
    first_path_of: dict[str, str] = {}
    records = sorted(source.records, key=lambda r: r.path)
    stamped = stamps([r.path for r in records], source.stamps, timeout=FILE_TIMEOUT_S)
    hashing = _Hashing(records, known, stamped)
    for rec in records:
        try:
            size, mtime_ns = _raised(stamped[rec.path])
            prev = known.get(rec.path)
            if prev and prev[1:] == (size, mtime_ns):
                sha = prev[0]
            else:
                sha = hashing.result(rec.path)
        except TimeoutError:
            plan.failures.append(
                (rec.path, f"took longer than {FILE_TIMEOUT_S:g} s to read (a hung mount?)")
            )
            continue
        except OSError as exc:
            plan.failures.append((rec.path, failure_reason(exc)))
            continue
        if sha in first_path_of:
            plan.failures.append((rec.path, f"{DUPLICATE}{first_path_of[sha]}"))
            plan.duplicate_of[rec.path] = first_path_of[sha]
            plan.duplicate_stat[rec.path] = (size, mtime_ns)
            continue
        first_path_of[sha] = rec.path
        plan.sha[rec.path] = sha
        plan.stat[rec.path] = (size, mtime_ns)
        if rec.group is not None:
            plan.groups[rec.path] = rec.group
        if rec.path in committed and committed[rec.path][0] == sha:
            plan.keep[rec.path] = (rec.label, rec.split)
        elif (rec.path, sha) in staged_pairs:
            plan.staged[rec.path] = (rec.label, rec.split)
        else:
            plan.to_embed.append(rec)
            plan.staged[rec.path] = (rec.label, rec.split)
    plan.removed = sum(1 for p in committed if p not in plan.sha)
    hashing.close()
    return plan


def _raised(stamped: Stamp | OSError) -> Stamp:
    if isinstance(stamped, OSError):
        raise stamped
    return stamped


class _Hashing:
    """The files whose stored hash cannot be reused, hashed ahead on daemon threads, each
    within FILE_TIMEOUT_S: a file on a hung mount becomes a failure, not a stalled run."""

    def __init__(
        self,
        records: list[ImageRecord],
        known: dict[str, tuple[str, int, int]],
        stamped: Mapping[str, Stamp | OSError],
    ):
        remote = any(is_url(r.path) for r in records)
        self.pool = DaemonPool(REMOTE_HASH_THREADS if remote else HASH_THREADS)
        self.futures = {}
        for rec in records:
            prev, now = known.get(rec.path), stamped[rec.path]
            if isinstance(now, OSError):
                continue  # reported by the plan itself
            if not (prev and prev[1:] == now):
                self.futures[rec.path] = self.pool.submit(file_sha256, rec.path)

    def result(self, path: str) -> str:
        """The file's hash, or TimeoutError after FILE_TIMEOUT_S; once every thread is stuck
        on a file that never finishes (a dead mount or store), at once for the rest."""
        future = self.futures.get(path) or self.pool.submit(file_sha256, path)
        return self.pool.result(future, FILE_TIMEOUT_S)

    def close(self) -> None:
        self.pool.close()
