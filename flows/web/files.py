"""The store's image files as the search service serves them: opened by row id only if still
the file that was embedded (`open_file`), streamed (`image_response`), and their thumbnails,
kept in a cache of THUMB_CACHE_BYTES (`Thumbs`). Never by a path from the request: only files
that are rows of the store can be read.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import mimetypes
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote

from fastapi import HTTPException
from fastapi.responses import StreamingResponse
from PIL import ImageOps

from extractors.common import DaemonPool
from extractors.embedding.images import ImageError, open_rgb
from extractors.embedding.objects import failure_reason, is_url, read_bytes, stamp
from extractors.search.query import NotFound
from extractors.store.layout import content_id, os_path

if TYPE_CHECKING:
    from flows.web.service import Snapshot

THUMB_DECODING = 4  # thumbnails decoded at once (a cached one waits for none of them)
THUMB_CACHE_BYTES = 32 * 2**20  # thumbnails kept
OBJECT_READS = 8  # rows' objects read from object storage at once
OBJECT_TIMEOUT_S = 30.0  # the most one object's read may take before the request gets 504


def open_file(snap: Snapshot, row_id: int) -> tuple[BinaryIO, str]:
    """The row's file and path, opened only if it is still the file that was embedded: the
    same path, not a symbolic link now (opened with O_NOFOLLOW, so a link swapped in after
    a check is not followed either), a regular file of the recorded size and mtime. Else
    404 (gone, or no longer a row) or 410 (replaced), with the reason."""
    row = snap.rows.get(row_id)  # NotFound: 404
    path = row["path"]
    if is_url(path):
        return _open_object(path, row_id, (row["bytes"], row["mtime_ns"])), path
    try:
        fd = os.open(os_path(path), os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise HTTPException(404, f"the image of row {row_id} is no longer at {path}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise HTTPException(
                410, f"{path} is a symbolic link now, not the file that was embedded"
            ) from None
        raise HTTPException(404, f"cannot open {path}: {exc.strerror}") from None
    fh = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (
        row["bytes"],
        row["mtime_ns"],
    ):
        fh.close()
        raise HTTPException(
            410,
            f"{path} changed since it was embedded (size or modification time); "
            "`headstart embed` the source again to serve it",
        )
    return fh, path


def _open_object(url: str, row_id: int, embedded: tuple[int, int]) -> BinaryIO:
    """An object's bytes, only if they are still those embedded: its stamp (size,
    modification time, ETag) unchanged, then its content's hash the row's id (so an object
    replaced between the two requests is caught too). At most OBJECT_READS objects are read
    at once, each within OBJECT_TIMEOUT_S and at most its recorded size; 404 when it is gone
    or unreadable, 410 when it was replaced, 504 when the store does not answer."""

    def fetch(_: Any) -> bytes | None:
        return read_bytes(url, limit=embedded[0]) if stamp(url) == embedded else None

    pool = _object_pool()
    try:
        data = pool.result(pool.submit(fetch, None), OBJECT_TIMEOUT_S)
    except TimeoutError:
        raise HTTPException(
            504, f"the object store did not answer within {OBJECT_TIMEOUT_S:g} s for {url}"
        ) from None
    except OSError as exc:
        raise HTTPException(404, f"cannot read {url}: {failure_reason(exc)}") from None
    if data is None or content_id(hashlib.sha256(data).hexdigest()) != row_id:
        raise HTTPException(
            410,
            f"{url} changed since it was embedded (size, modification time, ETag or content); "
            "`headstart embed` the source again to serve it",
        )
    return io.BytesIO(data)


@functools.cache
def _object_pool() -> DaemonPool:
    return DaemonPool(OBJECT_READS)


def _size(fh: BinaryIO) -> int:
    if isinstance(fh, io.BytesIO):
        return len(fh.getbuffer())
    return os.fstat(fh.fileno()).st_size


def image_response(fh: BinaryIO, path: str) -> StreamingResponse:
    """The open file of `path`, streamed (never by path; no Range support, so none of
    Starlette's FileResponse Range parsing, CVE-2025-62727, is reachable)."""
    name = Path(path).name
    kind = mimetypes.guess_type(name)[0]
    return StreamingResponse(
        _chunks(fh),
        media_type=kind or "application/octet-stream",
        headers={
            "Content-Length": str(_size(fh)),
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}",
            "X-Content-Type-Options": "nosniff",
        },
    )


def _chunks(fh: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    with fh:
        while block := fh.read(size):
            yield block


class Thumbs:
    """JPEG thumbnails of rows, the latest THUMB_CACHE_BYTES of them kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thumbs: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._bytes = 0

    def cached(self, snap: Snapshot, row_id: int, size: int) -> bytes | None:
        """The row's thumbnail if it is in the cache, else None; only for rows of `snap` (a
        lookup: no file is read, so it is answered without waiting for a decoding place)."""
        if row_id not in snap.rows:
            raise NotFound(f"no row with id {row_id} in this store")
        with self._lock:
            data = self._thumbs.get((row_id, size))
            if data is not None:
                self._thumbs.move_to_end((row_id, size))
            return data

    def make(self, snap: Snapshot, row_id: int, size: int) -> bytes:
        """A JPEG of the row's image within `size` pixels, cached (THUMB_CACHE_BYTES in all);
        only for rows of `snap`. The app runs at most THUMB_DECODING of these at once."""
        key = (row_id, size)
        cached = self.cached(snap, row_id, size)
        if cached is not None:
            return cached
        try:
            fh, _ = open_file(snap, row_id)
            with fh:
                img = open_rgb(fh, min_side=size)[0]
            img = ImageOps.contain(img, (size, size))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
        except ImageError as exc:
            raise HTTPException(404, f"cannot read the image of row {row_id}: {exc}") from None
        data = buf.getvalue()
        with self._lock:
            if key not in self._thumbs:
                self._thumbs[key] = data
                self._bytes += len(data)
            while self._bytes > THUMB_CACHE_BYTES:
                self._bytes -= len(self._thumbs.popitem(last=False)[1])
        return data
