"""Where image bytes live: local paths, or URLs that fsspec opens (s3://, gs://, http(s)://...).

One place answers, for any stored path: is it a URL (`is_url`), its stamp (size and a
modification stamp, `stamp`: what an update compares to decide "unchanged" without reading
the bytes), its bytes (`read_bytes`, retried when the failure is transient), its SHA-256
(`sha256_of`) and, for a prefix, the objects under it with their stamps (`list_objects`).

Credentials and endpoints come from where fsspec's file systems read them (for S3, s3fs and
boto: the environment, `~/.aws/config` and `~/.aws/credentials`, `AWS_ENDPOINT_URL` for an
S3-compatible server); headstart never stores or prints them. A failure is an `OSError` whose
`reason` (`failure_reason`) says what happened for a person: missing, denied, timed out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import stat
import time
import zlib
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from extractors.common import FILE_TIMEOUT_S, DaemonPool
from extractors.store.layout import is_url, os_path

ATTEMPTS = 3  # tries of a read that failed for a transient reason (a dropped connection, a 5xx)
BACKOFF_S = 0.5  # seconds before the second try, doubled before each later one
CHUNK = 1 << 20
MAX_OBJECT_BYTES = 1 << 30  # an image object larger than this is refused, never read whole

Stamp = tuple[int, int]  # (bytes, mtime_ns): the store's `bytes` and `mtime_ns` columns
T = TypeVar("T")


class NotAFile(OSError):
    """A path that names a folder, pipe or device (or a prefix) rather than an image's bytes."""


# S3 through s3fs: each request gives up after these seconds and is tried once there; the
# tries are `_remote`'s (ATTEMPTS), so a store that never answers costs a bounded time.
S3_OPTIONS = {
    "config_kwargs": {"connect_timeout": 10, "read_timeout": 20, "retries": {"max_attempts": 1}}
}


def filesystem(url: str) -> tuple[Any, str]:
    """fsspec's file system for `url` and the path within it (instances are cached by fsspec)."""
    import fsspec

    s3 = url.split("://")[0] in ("s3", "s3a")
    try:
        fs, path = fsspec.core.url_to_fs(url, **(S3_OPTIONS if s3 else {}))
    except (ImportError, ValueError) as exc:  # an unknown protocol, or its package missing
        raise OSError(f"cannot open {url.split('://')[0]}:// URLs: {exc}") from None
    if s3:
        fs.retries = 1  # s3fs's own loop of tries (5 by default) off: `_remote` tries
    return fs, path


def failure_reason(exc: BaseException) -> str:
    """What a failed stamp or read means for a person (the store's failure reason)."""
    remote = isinstance(exc, OSError) and getattr(exc, "remote", False)
    where = "object" if remote else "file"
    if isinstance(exc, NotAFile):
        return "not a regular file (a folder, pipe or device named like an image)"
    if isinstance(exc, FileNotFoundError):
        return f"{where} not found (moved or deleted after listing?)"
    if isinstance(exc, PermissionError):
        return (
            "access denied by the object store"
            if remote
            else "permission denied: the file is not readable"
        )
    if isinstance(exc, TimeoutError):
        return f"timed out reading the {where}"
    if isinstance(exc, OSError):
        return f"cannot read {where}: {exc.strerror or exc}"
    return f"cannot read {where}: {exc}"


def stamp(path: str, listed: Mapping[str, Stamp] | None = None) -> Stamp:
    """(bytes, mtime_ns) of a file or object, without reading its bytes: a local file's stat,
    an object's listing (`listed`, from `list_objects`) or its metadata (one HEAD request).
    Raises FileNotFoundError, PermissionError, NotAFile or another OSError."""
    if listed and path in listed:
        return listed[path]
    if not is_url(path):
        st = os.stat(os_path(path))
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(path)
        return st.st_size, st.st_mtime_ns
    fs, key = filesystem(path)
    fs.invalidate_cache(key)  # what is there now, not what a listing in this process saw
    info = _remote(lambda: fs.info(key))
    if info.get("type", "file") != "file":
        raise NotAFile(path)
    return object_stamp(info)


def stamps(
    paths: list[str],
    listed: Mapping[str, Stamp] | None = None,
    threads: int = 16,
    timeout: float = FILE_TIMEOUT_S,
) -> dict[str, Stamp | OSError]:
    """Every path's stamp, or the OSError it failed with: local files stat'ed here, objects
    not in `listed` asked for on `threads` daemon threads, each within `timeout` seconds (a
    hung object store becomes a TimeoutError per object, not a stalled run: objects asked
    together time out together, and once every thread is stuck the rest fail at once)."""
    out: dict[str, Stamp | OSError] = {}
    ask = []
    for path in paths:
        if (listed and path in listed) or not is_url(path):
            try:
                out[path] = stamp(path, listed)
            except OSError as exc:
                out[path] = exc
        else:
            ask.append(path)
    if ask:
        pool = DaemonPool(threads)
        futures = {path: pool.submit(stamp, path) for path in ask}
        for path, future in futures.items():
            try:
                out[path] = pool.result(future, timeout)
            except OSError as exc:  # TimeoutError too
                out[path] = exc
        pool.close()
    return out


def object_stamp(info: Mapping[str, Any]) -> Stamp:
    """An object's (bytes, mtime_ns) from fsspec's info, the same from a listing and from a
    HEAD request: its size, and its modification time in whole seconds (a HEAD's
    Last-Modified header has no more; MinIO's and Ceph's listings give milliseconds) with
    the digits below the second taken from its ETag, so an object rewritten within the same
    second at the same size still reads as changed when its ETag changed."""
    size = int(info.get("size") or info.get("Size") or 0)
    when = next(
        (info[k] for k in ("LastModified", "last_modified", "Last-Modified", "mtime") if k in info),
        None,
    )
    ns = _nanoseconds(when) // 1_000_000_000 * 1_000_000_000
    tag = next((str(info[k]) for k in ("ETag", "etag", "Content-MD5") if info.get(k)), "")
    return size, ns + (zlib.crc32(tag.strip('"').encode()) % 1_000_000_000 if tag else 0)


def _nanoseconds(when: Any) -> int:
    if when is None:
        return 0
    if isinstance(when, int | float):
        return int(when * 1e9)
    if isinstance(when, str):
        try:
            when = dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
        except ValueError:
            when = parsedate_to_datetime(when)  # an HTTP Last-Modified header
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


def list_objects(prefix: str) -> dict[str, Stamp]:
    """url -> stamp of every object under `prefix` (recursively, in key order), listed afresh:
    a listing fsspec cached earlier in this process is dropped first."""
    fs, key = filesystem(prefix)
    fs.invalidate_cache()
    found = _remote(lambda: fs.find(key.rstrip("/"), detail=True))
    protocol = prefix.split("://")[0]
    return {
        f"{protocol}://{name}": object_stamp(info)
        for name, info in sorted(found.items())
        if info.get("type", "file") == "file"
    }


def read_bytes(path: str, limit: int = MAX_OBJECT_BYTES) -> bytes:
    """The bytes of a file or object, at most `limit` (one GET of at most limit + 1 bytes, so
    a huge object is refused without being fetched); an object's read is tried up to
    ATTEMPTS times when it fails for a transient reason."""
    if is_url(path):
        fs, key = filesystem(path)
        try:
            data = _remote(lambda: fs.cat_file(key, start=0, end=limit + 1))
        except OSError as exc:
            if _status(exc) != 416 and "range" not in str(exc).lower():
                raise
            data = b""  # an empty object answers a ranged read with 416
    else:
        with open(os_path(path), "rb") as fh:
            data = fh.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"larger than the {limit} bytes allowed")
    return data


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file's or object's bytes, read in chunks (an object's read retried
    as `_remote` says)."""
    if not is_url(path):
        with open(os_path(path), "rb") as fh:
            return _hashed(fh)
    fs, key = filesystem(path)

    def hashed() -> str:
        with fs.open(key, "rb", block_size=CHUNK) as fh:
            return _hashed(fh)

    return _remote(hashed)


def _hashed(fh: Any) -> str:
    digest = hashlib.sha256()
    while block := fh.read(CHUNK):
        digest.update(block)
    return digest.hexdigest()


def _remote(call: Callable[[], T]) -> T:
    """`call` against an object store, retried on transient failures; every failure comes out
    as an OSError marked `remote` (so its reason says "object")."""
    for attempt in range(ATTEMPTS):
        try:
            return call()
        except (FileNotFoundError, PermissionError, NotAFile, IsADirectoryError) as exc:
            exc.remote = True
            raise
        except Exception as exc:
            if attempt == ATTEMPTS - 1 or not _transient(exc):
                raise _as_os_error(exc) from None
            time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})  # throttled, or the server's fault
TRANSIENT_KINDS = frozenset(
    {
        "ConnectTimeoutError", "ReadTimeoutError", "EndpointConnectionError",
        "ConnectionClosedError", "ServerDisconnectedError", "ClientConnectorError",
        "ClientOSError", "ClientPayloadError", "IncompleteReadError",
    }
)  # fmt: skip


def _transient(exc: BaseException) -> bool:
    """A failure worth another try: a dropped or refused connection, a timeout, a 5xx or
    throttling (an HTTP status of the exception or of one it was raised from)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError | TimeoutError):
            return True
        if type(current).__name__ in TRANSIENT_KINDS:
            return True
        if _status(current) in TRANSIENT_STATUS:
            return True
        current = current.__cause__ or current.__context__
    return False


def _status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries: aiohttp's `status`, botocore's response."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _as_os_error(exc: BaseException) -> OSError:
    text = f"{type(exc).__name__} {exc}".lower()
    if isinstance(exc, TimeoutError) or "timeout" in text or "timed out" in text:
        out = TimeoutError(str(exc))
    elif isinstance(exc, OSError):
        out = exc
    else:
        out = OSError(f"{type(exc).__name__}: {exc}")
    out.remote = True
    return out
