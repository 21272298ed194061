"""`create_backbone`: a registry name to a frozen backbone in eval mode on its device."""

from __future__ import annotations

from pathlib import Path

import torch

from extractors import DEFAULT_BACKBONE
from extractors.embedding.backbones._backbone import Backbone
from extractors.embedding.backbones._registry import build, check_name


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def create_backbone(
    name: str = DEFAULT_BACKBONE, weights: str | Path | None = None, device: str = "auto"
) -> Backbone:
    """Build a backbone by registry name, frozen and in eval mode, on `device`."""
    check_name(name)
    bb = build(name, weights=weights)
    bb.model.eval()
    for p in bb.model.parameters():
        p.requires_grad_(False)
    return bb.to(resolve_device(device))
