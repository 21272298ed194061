"""A search service for tests: uvicorn on a free loopback port, in a thread, for a block."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answering(base: str, seconds: float = 60) -> None:
    """Until `base`/api/info answers 200 (a service starting up)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/api/info", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)


@contextlib.contextmanager
def serving(store: Path, workspace: Path) -> Iterator[str]:
    """The base URL of `flows.web.app.create_app(store, workspace)`, answering."""
    import uvicorn

    from flows.web.app import create_app

    app = create_app(store, workspace)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_until_answering(base, 20)
    try:
        yield base
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def serving_process(store: Path, workspace: Path) -> Iterator[tuple[str, int]]:
    """`headstart ui` on `store` in a process of its own: its base URL and process id (for
    what only the server's own memory may show)."""
    port = free_port()
    cmd = [sys.executable, "-m", "flows.cli", "ui", "--store", str(store)]
    cmd += ["--workspace", str(workspace), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(base, 120)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)
