"""The files of a network fine-tuned by headstart, the one owner of their format: a folder
`<workspace>/finetuned/<id>/` with

    backbone.safetensors   the fine-tuned body's state dict (the base backbone's modules)
    head.safetensors       its classifier: `weight` (classes x dim) and `bias`
    config.json            base backbone and weights, classes, input size, temperature,
                           preprocessing, dim, the fine-tuning settings and a summary

heads/finetune/ writes it (`save_network`); extractors/embedding/backbones/ loads it as the
`finetuned:<id>` backbone (`read_network`). Tensors only (safetensors): nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from extractors.common import HeadstartError, atomic_path, write_json_atomic

if TYPE_CHECKING:
    import torch

BODY = "backbone.safetensors"
HEAD = "head.safetensors"
CONFIG = "config.json"
REQUIRED = ("base_backbone", "image_size", "preprocessing", "classes")  # keys of config.json


class NetworkError(HeadstartError):
    """A fine-tuned network's folder whose files cannot be read (damaged, or not ours)."""


def folder_of(key: str, workspace: str | Path) -> Path:
    """Where the network `finetuned:<key>` of a workspace lives."""
    return Path(workspace) / "finetuned" / key


def save_network(
    folder: Path,
    body: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor],
    config: dict[str, Any],
) -> None:
    """Write the three files, each atomically; config.json last, so a folder with a config
    always has its tensors."""
    from safetensors.torch import save_file

    for name, state in ((BODY, body), (HEAD, head)):
        with atomic_path(Path(folder) / name) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    write_json_atomic(Path(folder) / CONFIG, config)


def has_network(folder: Path) -> bool:
    return (Path(folder) / CONFIG).is_file()


def read_network(folder: Path) -> tuple[dict[str, Any], torch.nn.Linear]:
    """(config, the classifier as an eval-mode Linear layer); the body's weights are
    `folder / BODY`, loaded by the base backbone's own constructor."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
        head = load_file(str(folder / HEAD))
        classifier = torch.nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
        classifier.load_state_dict(head)
        missing = [k for k in REQUIRED if k not in config]
        if missing:
            raise KeyError(f"{CONFIG} has no {', '.join(missing)}")
    except Exception as exc:  # OSError, ValueError, SafetensorError, KeyError, RuntimeError
        first = (str(exc).strip().splitlines() or [""])[0]
        raise NetworkError(
            f"cannot read the fine-tuned network in {folder} ({type(exc).__name__}: "
            f"{first[:200]}); fine-tune again (`headstart run --finetune`) to rewrite it"
        ) from None
    return config, classifier.eval()
