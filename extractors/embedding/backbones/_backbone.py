"""The `Backbone` type: a frozen network plus the preprocessing its weights were trained with.

What construction fixes (name, network, transform, weights, preprocessing, classifier…) is a
frozen dataclass's fields; what changes after it (the device, the extra layers saved beside
the embedding, the compiled forward) lives apart in its `runtime`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from extractors.embedding.backbones._errors import BackboneError
from extractors.embedding.images import ImageError, load_rgb

Features = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class Runtime:
    """What changes after construction: the device (`to`), the extra layers hooked for their
    pooled outputs (`set_layers`) and the compiled forward (`compile`)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    layers: dict[str, str] = field(default_factory=dict)  # store column -> module name
    layer_dims: dict[str, int] = field(default_factory=dict)
    captured: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    hooks: list[Any] = field(default_factory=list, repr=False)
    compiled: Callable[[torch.Tensor], Any] | None = field(default=None, repr=False)
    compiled_batch: int | None = None


@dataclass(frozen=True)
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
    _features: Features = field(repr=False, default=None)
    decode_side: int | None = None
    classifier: nn.Module | None = None  # fine-tuned networks: their own trained classifier
    classes: list[str] | None = None
    temperature: float = 1.0
    runtime: Runtime = field(default_factory=Runtime, init=False)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def layers(self) -> dict[str, str]:
        return self.runtime.layers

    @property
    def layer_dims(self) -> dict[str, int]:
        return self.runtime.layer_dims

    @property
    def compiled(self) -> bool:
        return self.runtime.compiled is not None

    def to(self, device: str | torch.device) -> Backbone:
        self.runtime.device = torch.device(device)
        # channels_last: the fast layout for convolutions on CPU (oneDNN) and tensor cores.
        self.model.to(self.device, memory_format=torch.channels_last)
        if self.classifier is not None:
            self.classifier.to(self.device)
        return self

    # --- inference -------------------------------------------------------------------------

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
            try:
                image = load_rgb(image, min_side=self.decode_side)
            except ImageError as exc:  # one image asked for by name: say which
                raise ImageError(f"{image}: {exc}") from None
        return self.transform(image)[None]

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (float32, on CPU) of a preprocessed batch."""
        return self.embed_all(batch)[0]

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.runtime.captured.clear()
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                out = self._features(self.model, batch)
        else:
            out = self._features(self.model, batch)
        return out, {col: self.runtime.captured.pop(col) for col in self.layers}

    @torch.inference_mode()
    def embed_all(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(penultimate features, {layer column: pooled features}), float32 on CPU."""
        batch = batch.to(self.device, non_blocking=True).contiguous(
            memory_format=torch.channels_last
        )
        if self.runtime.compiled is not None and len(batch):
            try:
                out, extra = self._run_compiled(batch)
            except Exception as exc:
                self._compile_failed(exc)
        if self.runtime.compiled is None or not len(batch):
            out, extra = self._forward(batch)
        extra = {col: t.float().cpu() for col, t in extra.items()}
        return out.float().flatten(1).cpu(), extra

    @torch.inference_mode()
    def classify(self, batch: torch.Tensor) -> torch.Tensor:
        """ImageNet logits of the original classifier (a sanity check of the weights)."""
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        return self.model(batch).float().cpu()

    # --- the compiled forward --------------------------------------------------------------

    def compile(self, batch_size: int = 32) -> Backbone:
        """Run the forward through an ahead-of-time compiled package of this network for
        batches of `batch_size` (embedding/compiled.py): weights frozen, BatchNorm folded,
        ops fused, about 1.5x the eager model on CPU for EfficientNet-Lite0. Building the
        package takes ~30 s once per machine; later runs load it in milliseconds. Shorter
        batches are padded, longer ones split. Where building or loading fails (no C++
        compiler, an op export cannot trace) it warns and stays eager."""
        from extractors.embedding import compiled

        self.runtime.compiled, self.runtime.compiled_batch = None, None
        try:
            self.runtime.compiled = compiled.load_or_build(self, batch_size)
            self.runtime.compiled_batch = batch_size
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
        self.runtime.compiled, self.runtime.compiled_batch = None, None

    def _run_compiled(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The compiled forward over batches of its size: the last one padded, then sliced."""
        size, outs = self.runtime.compiled_batch, []
        for start in range(0, len(batch), size):
            chunk = batch[start : start + size]
            n = len(chunk)
            if n < size:
                pad = chunk.new_zeros((size - n, *chunk.shape[1:]))
                chunk = torch.cat([chunk, pad]).contiguous(memory_format=torch.channels_last)
            outs.append([t[:n] for t in self.runtime.compiled(chunk)])
        parts = [torch.cat(ts) for ts in zip(*outs, strict=True)]
        return parts[0], dict(zip(self.layers, parts[1:], strict=True))

    # --- extra layers ----------------------------------------------------------------------

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
        self._remove_hooks()
        self.runtime.layers, self.runtime.layer_dims = {}, {}
        modules = dict(self.model.named_modules())
        stages = self.stages()
        for spec in specs:
            spec = spec.strip()
            if not spec:
                continue
            module_name = self._layer_module(spec, modules, stages)
            column = "emb_" + re.sub(r"[^A-Za-z0-9]+", "_", module_name)
            self.layers[column] = module_name
            hook = modules[module_name].register_forward_hook(self._capture(column))
            self.runtime.hooks.append(hook)
        if self.layers:
            self.runtime.layer_dims = self._measure_layers(stages)
        if self.runtime.compiled is not None:  # the outputs changed: another package
            self.compile(self.runtime.compiled_batch)
        return dict(self.layers)

    def _layer_module(self, spec: str, modules: dict[str, nn.Module], stages: list[str]) -> str:
        """The module name of one `--layers` spec: a stage index or a module name."""
        if re.fullmatch(r"-?\d+", spec):
            i = int(spec)
            if not -len(stages) <= i < len(stages):
                raise BackboneError(
                    f"layer index {i} is out of range: {self.name} has {len(stages)} stages "
                    f"({', '.join(stages)}); use -1 for the last"
                )
            return stages[i]
        if spec in modules and spec:
            return spec
        raise BackboneError(
            f"{self.name} has no layer {spec!r}; give stage indices (-1 = last stage, "
            f"-2 = the one before) or module names such as {', '.join(stages[-2:])}"
        )

    def _measure_layers(self, stages: list[str]) -> dict[str, int]:
        """Each hooked layer's width, from one eager dry run; a hooked module the embedding
        never runs through unhooks every layer and raises BackboneError."""
        size = self.preprocessing.get("input_size") or [3, 224, 224]
        with torch.inference_mode():
            x = torch.zeros(1, *size, device=self.device)
            try:
                _, extra = self._forward(x.contiguous(memory_format=torch.channels_last))
            except KeyError as exc:  # a hooked module the embedding never runs through
                module = self.layers[exc.args[0]]
                self._remove_hooks()
                self.runtime.layers, self.runtime.captured = {}, {}
                raise BackboneError(
                    f"layer {module!r} of {self.name} does not run on the way to the "
                    f"embedding (a classifier?); give a stage: an index (-1 = last) or one "
                    f"of {', '.join(stages)}"
                ) from None
        return {col: int(t.shape[1]) for col, t in extra.items()}

    def _remove_hooks(self) -> None:
        for hook in self.runtime.hooks:
            hook.remove()
        self.runtime.hooks.clear()

    def _capture(self, column: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            if output.ndim == 4:  # (B, C, H, W): global average pool
                output = output.mean(dim=(2, 3))
            elif output.ndim == 3:  # (B, tokens, C)
                output = output.mean(dim=1)
            self.runtime.captured[column] = output.flatten(1)

        return hook
