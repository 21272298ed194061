"""Preprocessing from the model's own config: timm's data config, torchvision's weights
transforms, and the same evaluation transform at another input size."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def timm_config(model: nn.Module) -> dict[str, Any]:
    """timm's resolved data config of `model` (input size, interpolation, mean, std, crop)."""
    import timm.data

    return timm.data.resolve_data_config({}, model=model)


def timm_transform(cfg: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """timm's evaluation transform of a data config."""
    import timm.data

    return timm.data.create_transform(**cfg)


def as_record(cfg: dict[str, Any]) -> dict[str, Any]:
    """A data config as the backbone's `preprocessing` (tuples as lists: JSON-ready)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def torchvision_record(tf: Any) -> dict[str, Any]:
    """The `preprocessing` of a torchvision weights enum's transforms."""
    return {
        "input_size": [3, *list(tf.crop_size)] if hasattr(tf, "crop_size") else None,
        "resize_size": list(getattr(tf, "resize_size", []) or []),
        "interpolation": str(getattr(tf, "interpolation", "")).split(".")[-1].lower(),
        "mean": list(getattr(tf, "mean", [])),
        "std": list(getattr(tf, "std", [])),
    }


def eval_transform(preprocessing: dict[str, Any], size: int) -> Callable[[Any], torch.Tensor]:
    """The backbone's own evaluation preprocessing at another input size: the same resize/crop
    ratio, interpolation, mean and std (used to fine-tune and embed at a smaller size)."""
    import timm.data

    return timm.data.create_transform(
        input_size=(3, size, size),
        interpolation=preprocessing.get("interpolation") or "bilinear",
        mean=tuple(preprocessing["mean"]),
        std=tuple(preprocessing["std"]),
        crop_pct=crop_fraction(preprocessing),
    )


def crop_fraction(preprocessing: dict[str, Any]) -> float:
    """Centre-crop side / resize side (timm's crop_pct; torchvision's crop / resize size)."""
    if preprocessing.get("crop_pct"):
        return float(preprocessing["crop_pct"])
    resize = preprocessing.get("resize_size") or []
    crop = (preprocessing.get("input_size") or [3, 224, 224])[-1]
    return crop / min(resize) if resize else 1.0


def decode_side(size: int, crop: float) -> int:
    """The short side a transform resizes to first, for a crop of `size` at fraction `crop`."""
    return math.floor(size / crop)
