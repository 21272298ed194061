"""Settings of fine-tuning: one frozen object, each field declared once with its default, its
help text and its check (the CLI's options, deployments.toml's [finetune] table and MLflow's
`finetune.*` params all come from it). Light: no torch."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from extractors.settings import Settings, at_least, in_range, setting

STRATEGIES = ("head", "partial", "full")
# The classical heads, in the order they are trained and listed: declared here, where the CLI
# reads them without importing scikit-learn; heads/classical.py builds HEADS in this order.
HEAD_NAMES = ("logreg", "linear_svm", "rbf_svm", "knn")


@dataclasses.dataclass(frozen=True)
class FineTuneSettings(Settings):
    """Every setting of a fine-tuning run (logged to MLflow as params; part of its run key)."""

    section: ClassVar[str] = "finetune"

    strategy: str = setting(
        "full",
        "head: only a new linear layer trains; partial: also the top --blocks groups of "
        "layers; full: every layer (lower learning rates deeper down).",
        choices=STRATEGIES,
    )
    blocks: int = setting(2, "With --strategy partial: layer groups that train.", check=at_least(1))
    epochs: int = setting(10, "Most epochs (early stopping on validation).", check=at_least(1))
    batch_size: int = setting(
        32, "Images per fine-tuning step.", flags=("--ft-batch-size",), check=at_least(1)
    )
    image_size: int | None = setting(
        None,
        "Input size for fine-tuning (default: the backbone's own on a GPU, at most 128 px on "
        "a CPU).",
        check=at_least(16),
    )
    backbone_lr: float = setting(
        1e-4,
        "Learning rate of the top pretrained layers (x --layer-decay per group below).",
        check=in_range(0, 1),
    )
    head_lr: float = setting(
        1e-3, "Learning rate of the new classifier layer.", check=in_range(0, 10)
    )
    layer_decay: float = setting(
        0.8, "Learning-rate factor per layer group further down.", check=in_range(0, 1)
    )
    weight_decay: float = setting(0.05, "AdamW weight decay.", check=at_least(0))
    warmup_epochs: float = setting(
        1.0, "Epochs of linear learning-rate warm-up before the cosine decay.", check=at_least(0)
    )
    label_smoothing: float = setting(
        0.1,
        "Label smoothing of the cross-entropy loss.",
        check=lambda v: None if 0 <= v < 1 else f"must be in [0, 1), not {v}",
    )
    bn: str = setting(
        "frozen",
        "BatchNorm: frozen (keep pretrained statistics) or train.",
        choices=("frozen", "train"),
    )
    gradual: bool = setting(
        False, "Unfreeze one more layer group per epoch.", flags=("--gradual/--no-gradual",)
    )
    flip: bool = setting(
        True,
        "Random horizontal flips (turn off for digits, text, etc.).",
        flags=("--flip/--no-flip",),
    )
    crop_scale: float = setting(
        0.6, "Smallest area fraction of a random resized crop.", check=in_range(0, 1)
    )
    patience: int = setting(
        4, "Epochs without a better validation score before stopping.", check=at_least(1)
    )
    seed: int = setting(0, "Seed of the fine-tuning run (initialisation, batches, crops).")
