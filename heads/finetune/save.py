"""The files of a fine-tuned network as the backbone `finetuned:<id>` (their format is
extractors/embedding/finetuned.py's)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from extractors.embedding.backbones import Backbone
from extractors.embedding.finetuned import save_network as write_network
from heads.finetune.network import FineTuneNet, cpu_state
from heads.settings import FineTuneSettings


def save_network(
    net: FineTuneNet,
    backbone: Backbone,
    classes: list[str],
    cfg: FineTuneSettings,
    size: int,
    temperature: float,
    workdir: Path,
    summary: dict[str, Any],
) -> None:
    """The `finetuned:<id>` backbone's files (embedding/finetuned.py owns their format)."""
    write_network(
        workdir,
        cpu_state(net.body),
        cpu_state(net.head),
        {
            "base_backbone": backbone.name,
            "base_weights": backbone.weights,
            "classes": classes,
            "image_size": size,
            "temperature": temperature,
            "preprocessing": backbone.preprocessing,
            "dim": backbone.dim,
            "finetune": asdict(cfg),
            "summary": summary,
        },
    )
