"""Where the CLI's runs go: to a Prefect server when one is set up (`PREFECT_API_URL`, or the
active Prefect profile's), found without importing Prefect; else they run in this process."""

from __future__ import annotations

import os
import tomllib
import urllib.request
from pathlib import Path

from extractors.common import HeadstartError


def prefect_api_url() -> str | None:
    """The Prefect API runs report to: `PREFECT_API_URL`, else the active Prefect profile's
    (`prefect config set PREFECT_API_URL=...`); None when neither names one. Read without
    importing Prefect."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    url = profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return str(url) if url else None


def using_prefect() -> bool:
    """Run the CLI's commands as Prefect flows: when a Prefect server is set up for them."""
    return prefect_api_url() is not None


class OrchestrationError(HeadstartError, RuntimeError):
    """The Prefect server that runs should report to is not there."""


def check_prefect_server(timeout_s: float = 5.0) -> str:
    """The configured Prefect API's URL, once it answers its health check; else a clear
    error (not Prefect's traceback after its own time-out)."""
    url = prefect_api_url()
    if url is None:
        raise OrchestrationError("no Prefect server is set up (PREFECT_API_URL is not set)")
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as r:
            if r.status == 200:
                return url
    except (OSError, ValueError):
        pass
    raise OrchestrationError(
        f"no Prefect server answers at {url} (PREFECT_API_URL): start it with "
        "`uv run prefect server start`, or unset PREFECT_API_URL to run without Prefect"
    )
