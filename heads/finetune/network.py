"""The network fine-tuning trains: the backbone's body and a new linear layer, the body's layer
groups (shallow to deep), and its outputs over a whole split."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from extractors.embedding.backbones import Backbone


class FineTuneNet(nn.Module):
    """The backbone's pooled penultimate features followed by a new linear layer."""

    def __init__(self, backbone: Backbone, n_classes: int):
        super().__init__()
        self.body = backbone.model
        self._features = backbone._features
        self.head = nn.Linear(backbone.dim, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(self.body, x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def layer_groups(backbone: Backbone) -> list[list[str]]:
    """Parameter names of the backbone, grouped shallow to deep: one group per stage (the stem
    joins the first; modules between two stages join the later one), then everything after
    the last stage (e.g. EfficientNet's conv_head) as a group of its own."""
    stages = backbone.stages()
    groups: list[list[str]] = [[] for _ in range(len(stages) + 1)]
    seen = -1  # deepest stage whose parameters have gone by
    for name, _ in backbone.model.named_parameters():
        own = next((i for i, s in enumerate(stages) if name.startswith(s + ".")), None)
        if own is not None:
            seen = max(seen, own)
            groups[own].append(name)
        else:
            groups[max(0, seen + 1)].append(name)
    return [grp for grp in groups if grp]


def group_of(groups: list[list[str]]) -> dict[str, int]:
    """Parameter name -> index of its group."""
    return {n: i for i, grp in enumerate(groups) for n in grp}


def autocast(device: torch.device) -> AbstractContextManager:
    """Mixed precision on CUDA (bf16 where supported, else fp16); full precision on a CPU."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def outputs(
    fn: Callable[[torch.Tensor], torch.Tensor],
    net: FineTuneNet,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(batch) (float32, CPU) and the labels over a whole split, in eval mode."""
    net.eval()
    outs, ys = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device):
            outs.append(fn(x).float().cpu())
        ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def logits(
    net: FineTuneNet, loader: torch.utils.data.DataLoader, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's logits and the labels over a whole split."""
    return outputs(net, net, loader, device)


def cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's state dict on the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
