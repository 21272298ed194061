"""A commit as one step: every file a commit may write (the layout's `COMMIT_FILES`, or the
audit's) is kept as it was, by hard link, and put back if any write of the commit fails."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from extractors.store.layout import COMMIT_FILES, GROWN_IN_PLACE
from extractors.store.store import StoreError

STAGED_KEPT = "; finished batches are kept in staging/ and reused"


class Rollback:
    """The commit as one step: the committed files as they were (hard links: no copy, no
    space) are put back if any write of the commit fails, a full disk included (FAISS says so
    with RuntimeError, not OSError). The files are the layout's `COMMIT_FILES`, every file a
    commit may write for every index kind; those grown in place (the re-rank vectors) are cut
    back to their old length. Then the store is wholly the old one, and says so; the staged
    rows stay for the next run."""

    def __init__(
        self, folder: Path, then: str = STAGED_KEPT, files: tuple[str, ...] = COMMIT_FILES
    ):
        self.folder, self.then, self.files = folder, then, files
        self.saved: dict[str, Path | None] = {}
        self.sizes: dict[str, int] = {}
        self.committed = False

    def __enter__(self) -> Rollback:
        try:
            for name in self.files:
                path, keep = self.folder / name, self.folder / f".{name}.before-commit"
                keep.unlink(missing_ok=True)
                self.saved[name] = None
                if path.exists():
                    os.link(path, keep)
                    self.saved[name] = keep
                    if name in GROWN_IN_PLACE:
                        self.sizes[name] = path.stat().st_size
        except OSError as exc:
            self._drop_links()
            raise self._error(exc) from exc
        return self

    def done(self) -> None:
        self.committed = True

    def _drop_links(self) -> None:
        """Best effort: a link left behind costs nothing and the next commit replaces it (a
        failure here must not report a commit that happened as rolled back)."""
        for keep in self.saved.values():
            if keep is not None:
                with contextlib.suppress(OSError):
                    keep.unlink(missing_ok=True)

    def _restore(self) -> None:
        for name, keep in self.saved.items():
            path = self.folder / name
            if keep is None:
                path.unlink(missing_ok=True)
                continue
            os.replace(keep, path)
            size = self.sizes.get(name)
            if size is not None and path.stat().st_size > size:
                os.truncate(path, size)  # rows appended in place by the failed commit

    def _error(self, exc: BaseException) -> StoreError:
        why = getattr(exc, "strerror", None) or exc
        return StoreError(
            f"cannot write to store {self.folder}: {why}. The store is unchanged (the "
            f"commit was rolled back{self.then}): free disk space or fix permissions, or "
            "choose another --store, then run again."
        )

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        if not self.committed:
            self._restore()
        self._drop_links()
        if not self.committed and isinstance(exc, OSError | RuntimeError):
            raise self._error(exc) from exc
