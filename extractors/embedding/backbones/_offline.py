"""What works without a network: is the model hub reachable, are its weights in the local
cache, and what to tell someone offline whose weights are neither."""

from __future__ import annotations

import socket

from extractors import DEFAULT_BACKBONE

HF_HOST = "huggingface.co"

OFFLINE_HELP = (
    "Offline fixes: (1) pass a local weights file with --weights PATH; (2) pre-fill the cache on a "
    "machine that is online (same TORCH_HOME / HF_HOME) by building the backbone once there; "
    f"(3) use the bundled offline backbone '{DEFAULT_BACKBONE}'."
)


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to `host` opens within `timeout` seconds."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def hf_cached_file(hub_id: str) -> str | None:
    """The cached weights file of a Hugging Face hub model, or None where none is cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for fn in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hub_id, fn)
        if isinstance(hit, str):
            return hit
    return None
