"""Reaching the MLflow tracking store: its URI, a quick check that it answers and can be written
(before a run's expensive work, without importing MLflow), `connect`, the one way every command
reaches MLflow (a new SQLite database is created and migrated under a lock beside it), the lock
of the model registry's read-modify-write updates, and failures of MLflow, SQLite or the disk
put as one line (`outside_error`, used where the CLI catches errors)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import sqlite3
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from extractors.common import HeadstartError, exclusive, human_bytes

PROBE_TIMEOUT_S = 3.0  # a tracking server or database that does not answer by then is down
MIGRATION_WAIT_S = 120.0  # another process creating or upgrading the database
REGISTRY_WAIT_S = 60.0  # another process deciding on the champion
MIN_FREE_BYTES = 16 * 2**20  # below this on the database's disk, a run would fail half-way
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}

_ready: set[tuple[str, bool]] = set()  # (uri, write) connected in this process
_local = threading.local()  # .held: registry locks this thread holds, by path: depth


class OutsideError(HeadstartError, RuntimeError):
    """A failure outside headstart (a full disk, a read-only file, a database or server that
    does not answer) that the user can fix; the message says which and how."""


class TrackingError(OutsideError):
    """A tracking store that cannot be reached, read or written."""


def tracking_uri(workspace: str | Path) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite store at <workspace>/mlflow.db."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = Path(workspace).resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def shown(uri: str) -> str:
    """`uri` fit for a message: the file of a SQLite store, any password hidden."""
    db = sqlite_file(uri)
    if db is not None:
        return str(db)
    parts = urllib.parse.urlsplit(uri)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (absolute, or relative to this folder)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()


def check(workspace: str | Path, write: bool = True) -> str:
    """The tracking URI, once the store answers (a server's health check, a database's port)
    and, with `write`, a SQLite database and its folder can be written with room to spare;
    else a `TrackingError` naming it, within seconds. MLflow is not imported."""
    uri = tracking_uri(workspace)
    db = sqlite_file(uri)
    if db is not None and not write and not db.exists():  # a reader never creates it
        raise TrackingError(
            f"no MLflow database at {db} yet: nothing is recorded in this workspace; run "
            "`headstart demo` or `headstart run SOURCE` first (or point MLFLOW_TRACKING_URI "
            "at your store)"
        )
    if db is not None:
        _check_sqlite(db, write)
        with _migration_lock(db, write):
            _check_not_half_migrated(db)
    elif uri.startswith(("http://", "https://")):
        _probe_server(uri)
    elif urllib.parse.urlsplit(uri).scheme.split("+")[0] in DB_PORTS:
        _probe_database(uri)
    return uri


def connect(workspace: str | Path, write: bool = True) -> str:
    """Point MLflow at the workspace's tracking store and return its URI. The first time in a
    process, `check` it and open it: a new or older SQLite database is created or migrated
    while holding `<db>.lock` (two commands at once would otherwise both migrate it and
    break it); a half-migrated one is a `TrackingError` saying how to repair it."""
    uri = tracking_uri(workspace)
    fresh = (uri, True) not in _ready and (uri, write) not in _ready
    if fresh:
        check(workspace, write)  # before importing MLflow: a store that is down fails fast
    import mlflow

    mlflow.set_tracking_uri(uri)
    _follow_logging_level()
    if not fresh:
        return uri
    db = sqlite_file(uri)
    if db is not None:
        with _migration_lock(db, write):
            _open(uri, db)
    elif not uri.startswith(("http://", "https://", "databricks")):
        _open(uri, None)
    _ready.add((uri, write))
    return uri


def _follow_logging_level() -> None:
    """MLflow's event lines printed outside its loggers ("Successfully registered model",
    "Created version") follow MLFLOW_LOGGING_LEVEL like its logs do: off above INFO (the
    CLI's default: flows/cli/app.py), on at INFO or below (--verbose)."""
    from mlflow.utils.logging_utils import disable_logging, enable_logging

    level = os.environ.get("MLFLOW_LOGGING_LEVEL", "INFO").upper()
    (enable_logging if level in ("DEBUG", "INFO") else disable_logging)()


@contextlib.contextmanager
def registry_lock(workspace: str | Path) -> Iterator[None]:
    """Hold the lock of the workspace's model registry for the block (re-entrant in a
    thread): one process at a time reads, decides and writes its aliases and history tags.
    Beside a SQLite database; in the workspace for other stores (commands sharing the
    workspace)."""
    uri = tracking_uri(workspace)
    db = sqlite_file(uri)
    path = str(
        db.with_name(db.name + ".registry.lock") if db else Path(workspace) / ".registry.lock"
    )
    held: dict[str, int] = _local.__dict__.setdefault("held", {})
    if held.get(path):  # this thread holds it already: the file lock is not re-entrant
        held[path] += 1
        try:
            yield
        finally:
            held[path] -= 1
        return
    busy = TrackingError(
        f"another command has held the model registry's lock {path} for {REGISTRY_WAIT_S:.0f} s; "
        "run again when it is done"
    )
    with exclusive(path, busy, wait_s=REGISTRY_WAIT_S):
        held[path] = 1
        try:
            yield
        finally:
            held.pop(path, None)


def _check_sqlite(db: Path, write: bool) -> None:
    folder = db.parent
    if not write:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingError(
            f"cannot create the folder of the MLflow database {db}: {exc.strerror}"
        ) from None
    if db.exists() and not os.access(db, os.W_OK):
        raise TrackingError(
            f"the MLflow database {db} is read-only: make it writable, or point "
            "MLFLOW_TRACKING_URI at another store"
        )
    if not os.access(folder, os.W_OK):
        raise TrackingError(
            f"the folder of the MLflow database {db} is not writable (SQLite writes its journal "
            "beside it): make it writable, or point MLFLOW_TRACKING_URI at another store"
        )
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise TrackingError(
            f"no room for the MLflow database {db}: {human_bytes(free)} free on its disk; "
            "free some space and run again"
        )


@contextlib.contextmanager
def _migration_lock(db: Path, write: bool) -> Iterator[None]:
    """`<db>.lock`, waited for; a reader that cannot create it (a read-only folder) goes on
    without it: it could not migrate the database either."""
    lock = db.with_name(db.name + ".lock")
    busy = TrackingError(
        f"another command has been creating or upgrading the MLflow database {db} for "
        f"{MIGRATION_WAIT_S:.0f} s (it holds {lock}); run again when it is done"
    )
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive(lock, busy, wait_s=MIGRATION_WAIT_S))
        except OSError:
            if write:
                raise
        yield


def _repair(db: Path, why: str) -> str:
    return (
        f"the MLflow database {db} is half-migrated ({why}): restore it from a backup, or "
        "delete it if it holds no runs yet (else keep a copy, drop the `_alembic_tmp_` tables "
        f"and run `uv run mlflow db upgrade sqlite:///{db}`)"
    )


def _check_not_half_migrated(db: Path) -> None:
    """A database that an interrupted (or, before the lock, concurrent) migration left with
    alembic's temporary tables: every MLflow command on it would fail."""
    if not db.exists() or db.stat().st_size == 0:
        return
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            rows = con.execute("select name from sqlite_master where type = 'table'").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        known = outside_error(exc)  # locked, unreadable: not a broken file
        if known is not None:
            raise known from None
        raise TrackingError(
            f"{db} is not an SQLite database MLflow can open ({exc}): restore it from a backup, "
            "or move it away to start a new one"
        ) from None
    left = sorted(name for (name,) in rows if name.startswith("_alembic_tmp_"))
    if left:
        raise TrackingError(_repair(db, f"a schema upgrade stopped half-way and left {left[0]}"))


def _open(uri: str, db: Path | None) -> None:
    """Open the tracking store and the model registry (MLflow creates or checks the tables)."""
    from alembic.util.exc import CommandError
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from sqlalchemy.exc import SQLAlchemyError

    try:
        client = MlflowClient(uri)  # this already opens the tracking store
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    except (MlflowException, SQLAlchemyError, CommandError, OSError) as exc:
        known = outside_error(exc)
        if known is not None:
            raise known from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if db is not None and "out-of-date database schema" in first:
            raise TrackingError(
                f"the MLflow database {db} was made by an older MLflow ({first}): keep a copy, "
                f"then run `uv run mlflow db upgrade sqlite:///{db}`"
            ) from None
        if db is not None:
            raise TrackingError(_repair(db, first)) from None
        raise TrackingError(
            f"the MLflow tracking store {shown(uri)} did not open: {first}"
        ) from None


def _probe_server(uri: str) -> None:
    """A `TrackingError` when nothing answers at `uri` (refused, unknown host, timed out).
    Probed with `requests`, as MLflow does: credentials in the URL, REQUESTS_CA_BUNDLE and
    MLflow's TLS settings apply. Any HTTP answer, or a TLS failure, means it is reachable:
    what it says is for MLflow's own calls to report."""
    import requests

    verify: bool | str = True
    if os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        verify = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    elif os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("true", "1"):
        verify = False
    try:
        requests.get(
            f"{uri.rstrip('/')}/health",
            timeout=PROBE_TIMEOUT_S,
            verify=verify,
            allow_redirects=False,
        ).close()
    except requests.exceptions.SSLError:
        return  # it answers; MLflow reports what is wrong with its certificate
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        why = (
            f"no answer in {PROBE_TIMEOUT_S:.0f} s"
            if isinstance(exc, requests.exceptions.Timeout)
            else _innermost(exc)
        )
        raise TrackingError(
            f"no MLflow tracking server answers at {shown(uri)} (MLFLOW_TRACKING_URI; {why}): "
            "start it, or unset MLFLOW_TRACKING_URI to track in the workspace's mlflow.db"
        ) from None
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
        raise TrackingError(
            f"MLFLOW_TRACKING_URI {shown(uri)} is not a URL a server can answer at ({exc})"
        ) from None
    except requests.exceptions.RequestException:
        return  # it answered something (a redirect loop, a bad body): MLflow says what


def _innermost(exc: BaseException) -> str:
    """The innermost cause of a failed connection (refused, name not known), short."""
    inner: BaseException = exc
    for _ in range(10):
        nxt = getattr(inner, "reason", None) or inner.__cause__ or inner.__context__
        if not isinstance(nxt, BaseException) or nxt is inner:
            break
        inner = nxt
    text = str(inner)
    found = re.search(r"\[Errno -?\d+\] ([^')\]]+)", text)
    return (found[1] if found else text)[:200]


def _probe_database(uri: str) -> None:
    parts = urllib.parse.urlsplit(uri)
    if not parts.hostname:
        return  # a local socket: the driver says what is wrong
    port = parts.port or DB_PORTS[parts.scheme.split("+")[0]]
    try:
        socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise TrackingError(
            f"the MLflow database at {shown(uri)} does not answer "
            f"(MLFLOW_TRACKING_URI; {exc.strerror or exc}): start it, or point "
            "MLFLOW_TRACKING_URI at another store"
        ) from None


def _current_store() -> str:
    if "mlflow" in sys.modules:
        return shown(sys.modules["mlflow"].get_tracking_uri())
    return shown(os.environ.get("MLFLOW_TRACKING_URI", "the workspace's mlflow.db"))


SQLITE_FAILURES = {
    "database or disk is full": "the MLflow database {store} is full, or the disk under it is: "
    "free some space and run again",
    "attempt to write a readonly database": "the MLflow database {store} is read-only: make it "
    "and its folder writable, or point MLFLOW_TRACKING_URI at another store",
    "unable to open database file": "cannot open the MLflow database {store}: check that its "
    "folder exists and is writable",
    "database is locked": "the MLflow database {store} stayed locked by another process: run "
    "again when it is done (several writers at once want a tracking server: docs/operations.md)",
}


def _known(exc: BaseException) -> OutsideError | None:
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f": {exc.filename}" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return OutsideError(
                f"no space left on the device{where}; free some space and run again"
            )
        if exc.errno == errno.EROFS:
            return OutsideError(f"read-only file system{where}")
        if exc.errno in (errno.EACCES, errno.EPERM) and exc.filename:
            return OutsideError(f"permission denied{where}: check its owner and mode")
    module = type(exc).__module__.split(".")[0]
    text = str(exc)
    if module in ("sqlite3", "sqlalchemy", "mlflow"):
        for key, message in SQLITE_FAILURES.items():
            if key in text:
                return TrackingError(message.format(store=_current_store()))
    if module == "httpx" and "connect" in type(exc).__name__.lower():
        request = getattr(exc, "_request", None)  # httpx's RequestError: what it asked
        url = str(request.url) if request is not None else ""
        api = os.environ.get("PREFECT_API_URL", "").rstrip("/")
        if api and url.startswith(api):
            return OutsideError(
                f"the Prefect server at {api} stopped answering (PREFECT_API_URL): check it and "
                "run again, or unset PREFECT_API_URL to run without Prefect"
            )
    asked = re.search(r"API request to (\S+?)/(?:api|ajax-api)/\S* failed with exception", text)
    if module == "mlflow" and asked:
        return TrackingError(
            f"the MLflow tracking server at {shown(asked[1])} did not answer (it was reachable "
            "when the command started): check it and run again"
        )
    return None


def outside_error(exc: BaseException) -> OutsideError | None:
    """`exc` (or an exception it was raised from) as one user-fixable line when it is a known
    failure outside headstart: no space left, a read-only or unwritable file, a SQLite
    database that is full, read-only or locked, a tracking server that stopped answering.
    None for anything else (a bug keeps its traceback)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = _known(current)
        if found is not None:
            return found
        cause = current.__cause__
        current = (
            cause if cause is not None or current.__suppress_context__ else current.__context__
        )
    return None
