"""The registry of named backbones: a constructor per name or `family:` prefix, `register` to
add one, `check_name` and `build` to use one, `list_backbones` for the names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from extractors import DEFAULT_BACKBONE
from extractors.embedding.backbones._errors import BackboneError

if TYPE_CHECKING:
    from extractors.embedding.backbones._backbone import Backbone

# A constructor takes the part of the name after `family:` and an optional local weights file.
Constructor = Callable[..., "Backbone"]

_REGISTRY: dict[str, Constructor] = {}


def register(prefix: str) -> Callable[[Constructor], Constructor]:
    """Register a constructor under a name or a `prefix:` family."""

    def deco(fn: Constructor) -> Constructor:
        _REGISTRY[prefix] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    """The registered names and `family:` prefixes, in registration order."""
    return list(_REGISTRY)


def check_name(name: str) -> None:
    """Raise BackboneError for a name no registered constructor handles."""
    family = name.partition(":")[0]
    if family not in _REGISTRY:
        raise BackboneError(
            f"unknown backbone {name!r}: use {DEFAULT_BACKBONE}, timm:<model> or "
            "torchvision:<model> (e.g. torchvision:resnet50, timm:convnext_tiny.fb_in1k)"
        )


def build(name: str, weights: str | Path | None = None) -> Backbone:
    """The backbone of a registry name as its constructor returns it (on the CPU, trainable);
    `create_backbone` checks the name first and freezes the result."""
    family, _, arg = name.partition(":")
    return _REGISTRY[family](arg, weights=weights)
