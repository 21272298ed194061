"""Small helpers every package shares: the base error, atomic writes, L2 normalisation.

Nothing heavy is imported at module level, so the CLI's error handling and a head's MLflow
model can import this without torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

FILE_TIMEOUT_S = 60.0  # one file may not hold up a run for longer than this (read, decode)
ROW_GROUP = 4096  # rows per Parquet row group of every table a store writes


class HeadstartError(Exception):
    """Input or state the user can fix; the message says how. Every module's error extends
    it, and the CLI prints it as one line with exit code 2 (anything else is a bug)."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces `path`, on error it is removed.

    Readers see the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive(lock_file: str | Path, busy: HeadstartError, wait_s: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if need be) for the block; `busy` is
    raised when another process holds it: at once, or after waiting up to `wait_s` seconds
    for it to let go."""
    import fcntl
    import time

    path = Path(lock_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    with open(path, "a+") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise busy from None
                time.sleep(0.05)
        yield


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Replace `path` with `obj` as indented JSON, atomically."""
    write_bytes_atomic(path, json.dumps(obj, indent=2, default=str).encode())


def write_parquet_atomic(table: pa.Table, path: str | Path) -> None:
    """Replace `path` with `table` as zstd Parquet (ROW_GROUP rows per group), atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP)


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (float32, contiguous); zero rows stay zero."""
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # no x*x temporary: 2x faster
    return x / np.maximum(norms, 1e-12)


def parse_bytes(text: str | int | None) -> int | None:
    """'512MB', '2GB', '1.5GiB' or a plain number of bytes -> bytes."""
    if text is None or isinstance(text, int):
        return text
    s = text.strip().upper().replace("IB", "B")
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 512MB or 2GB") from None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def plural(n: int, noun: str, many: str | None = None) -> str:
    """A count and its noun in the right number: `1 group`, `2 groups` (`many` where an "s"
    does not make the plural: plural(n, "match", "matches"))."""
    return f"{n} {noun if n == 1 else many or noun + 's'}"


class DaemonPool:
    """Daemon worker threads for file work (Pillow, torch and hashing release the GIL).

    Daemon threads, not a ThreadPoolExecutor: a file that never finishes reading (a hung
    network mount) costs one thread, and neither the run nor the interpreter's exit waits
    for it. `result` bounds each task's time from when it started.
    """

    def __init__(self, threads: int):
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        for n in range(threads):
            threading.Thread(target=self._work, name=f"worker-{n}", daemon=True).start()
        self.threads = threads
        self.stuck = 0  # tasks past their time limit: each still holds its thread

    def _work(self) -> None:
        while (task := self.tasks.get()) is not None:
            fn, arg, fut = task
            if fut.set_running_or_notify_cancel():
                fut.started = time.monotonic()
                try:
                    fut.set_result(fn(arg))
                except BaseException as exc:
                    fut.set_exception(exc)

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Future:
        fut: Future = Future()
        self.tasks.put((fn, arg, fut))
        return fut

    def result(self, fut: Future, timeout: float) -> Any:
        """`fut`'s result, waiting until `timeout` seconds after it started running, so tasks
        that hang together cost `timeout` together, not one after the other. TimeoutError
        past that, or at once for a task that has not started while every thread is stuck."""
        while (started := getattr(fut, "started", None)) is None and not fut.done():
            if self.stuck >= self.threads:
                raise TimeoutError("every thread is stuck on a task past its time limit")
            try:
                return fut.result(timeout=0.05)  # until it starts (or finishes)
            except FutureTimeout:
                continue
        left = timeout - (time.monotonic() - started) if started is not None else 0.0
        try:
            return fut.result(timeout=max(left, 0.0))
        except FutureTimeout:
            self.stuck += 1
            raise TimeoutError(f"took longer than {timeout:g} s") from None

    def close(self) -> None:
        for _ in range(self.threads):
            self.tasks.put(None)
