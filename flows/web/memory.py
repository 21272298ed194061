"""The search service's process memory: freed heap handed back to the system (`trim`), and
pyarrow kept from importing pandas (`without_pandas`, 48 MB in every search process)."""

from __future__ import annotations

import contextlib
from typing import Any


def trim() -> None:
    """Hand memory freed on the heap back to the system (glibc keeps it otherwise)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _NoPandas:
    """An import hook that says pandas is not installed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError("pandas is left out of the search service", name=name)


def without_pandas() -> None:
    """Keep pyarrow from importing pandas in this process (`headstart ui` calls it first).

    pyarrow imports pandas the first time it builds any array, if it can: 48 MB of private
    memory in every search process, which never uses it. pyarrow looks once and remembers:
    told then that pandas is missing, it takes its pandas-free paths from then on (nothing
    else is kept from importing pandas: the hook is gone once pyarrow has looked)."""
    import sys

    import pyarrow as pa

    if "pandas" in sys.modules:
        return
    hook = _NoPandas()
    sys.meta_path.insert(0, hook)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(hook)
