"""Local weights files (`--weights`): loaded safely as a state dict, fitted onto a model, and
named by their digest in the backbone's `weights` description."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from extractors.embedding.backbones._errors import BackboneError
from extractors.embedding.images import file_sha256


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a weights file safely (no arbitrary unpickling); unwraps common checkpoint wrappers."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    sd = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise BackboneError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError: a damaged or foreign file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BackboneError(
            f"cannot load {path} as safetensors weights ({first[:200]}); is the file "
            "complete and saved with safetensors.torch.save_file?"
        ) from None


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(
            f"cannot load {path} as weights-only state dict ({exc}); save it with "
            "torch.save(model.state_dict(), path)"
        ) from None


def fit(model: nn.Module, sd: dict[str, torch.Tensor], path: str | Path) -> nn.Module:
    """`model` with the state dict of weights file `path` loaded; BackboneError when they do
    not fit (missing or unexpected keys, other shapes)."""
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = " ".join(lines[1:2] or lines[:1])
        raise BackboneError(
            f"the weights in {path} do not fit {type(model).__name__} ({detail[:300]}); "
            "give a state dict saved from the same architecture"
        ) from None
    return model


def file_digest(path: str | Path) -> str:
    """The short digest that names a weights file: the first 12 hex digits of its SHA-256."""
    return file_sha256(path)[:12]


def file_description(path: str | Path) -> str:
    """A backbone's `weights` value for a local file: `file:<path>#<digest>`."""
    return f"file:{path}#{file_digest(path)}"
