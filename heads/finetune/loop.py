"""Fine-tuning's training loop: AdamW over layer groups with decaying learning rates, warm-up
and cosine schedule, (gradual) unfreezing, early stopping on validation, and a checkpoint after
every epoch that a re-run resumes from."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from extractors.common import atomic_path
from extractors.embedding.backbones import Backbone
from heads.finetune.data import Loaders
from heads.finetune.network import FineTuneNet, autocast, cpu_state, group_of, layer_groups, logits
from heads.finetune.probe import warm_start_head
from heads.settings import FineTuneSettings

CHECKPOINT = "checkpoint.pt"


@dataclass
class Best:
    """The best epoch so far: (val accuracy, -val loss), the network's state then, its epoch."""

    score: tuple[float, float] = (-1.0, 0.0)
    state: dict[str, torch.Tensor] | None = None
    epoch: int = -1


@dataclass
class Training:
    """A run's network, optimiser and schedule, and how far it got (what a checkpoint holds)."""

    net: FineTuneNet
    groups: list[list[str]]  # the body's parameter names, shallow to deep
    trainable: int  # top groups that train (besides the new layer)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    best: Best = field(default_factory=Best)
    start_epoch: int = 0  # the first epoch this call trains (> 0 when resumed)
    lp_info: dict[str, Any] = field(default_factory=dict)  # the probe's val accuracy and C


def train(
    net: FineTuneNet,
    backbone: Backbone,
    loaders: Loaders,
    cfg: FineTuneSettings,
    workdir: Path,
    size: int,
    progress: bool,
    log: Callable[[str], None],
) -> Training:
    """Train `net` (resumed from `workdir`'s checkpoint, else warm-started from a probe) until
    the last epoch or early stopping; the network is left at its last epoch, not its best."""
    run = setup(net, backbone, cfg, steps_per_epoch=max(1, len(loaders.train)))
    path = workdir / CHECKPOINT
    if path.exists():
        load_checkpoint(path, run)
        log(f"resuming fine-tuning from epoch {run.start_epoch} ({path})")
    else:
        run.lp_info = warm_start_head(net, loaders.train_eval, loaders.val, backbone.device)
        log(
            f"head warm-started from a logistic-regression probe at {size} px: "
            f"val accuracy {run.lp_info['lp_val_accuracy']:.3f} (C={run.lp_info['lp_C']:g})"
        )
    run_epochs(run, loaders, cfg, path, backbone.device, progress, log)
    return run


def setup(
    net: FineTuneNet, backbone: Backbone, cfg: FineTuneSettings, steps_per_epoch: int
) -> Training:
    """The layer groups, the optimiser over those that train, and its learning-rate schedule."""
    groups = layer_groups(backbone)
    n = len(groups)
    trainable = {"head": 0, "partial": min(cfg.blocks, n), "full": n}[cfg.strategy]
    opt = torch.optim.AdamW(
        param_groups(net, groups, group_of(groups), trainable, cfg), weight_decay=cfg.weight_decay
    )
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warm, total))
    return Training(net, groups, trainable, opt, sched)


def param_groups(
    net: FineTuneNet,
    groups: list[list[str]],
    group_of: dict[str, int],
    trainable: int,
    cfg: FineTuneSettings,
) -> list[dict[str, Any]]:
    """AdamW groups: the new layer at head_lr; backbone group g (of the top `trainable`) at
    backbone_lr * layer_decay ** (depth below the top). Norms and biases get no weight decay."""
    n = len(groups)
    out: list[dict[str, Any]] = [
        {"params": list(net.head.parameters()), "lr": cfg.head_lr, "name": "head"}
    ]
    named = dict(net.body.named_parameters())
    for g in range(n - trainable, n):
        lr = cfg.backbone_lr * cfg.layer_decay ** (n - 1 - g)
        decay = [named[p] for p in groups[g] if named[p].ndim > 1]
        no_decay = [named[p] for p in groups[g] if named[p].ndim <= 1]
        out.append({"params": decay, "lr": lr, "name": f"group{g}"})
        out.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"group{g}.nd"})
    return [g for g in out if g["params"]]


def frozen_groups(cfg: FineTuneSettings, epoch: int, n: int, trainable: int) -> int:
    """Number of bottom groups kept frozen this epoch (gradual: one more unfrozen per epoch)."""
    if cfg.gradual and trainable:
        return n - min(trainable, epoch)  # epoch 0: head only
    return n - trainable


def set_trainable(net: FineTuneNet, group_of: dict[str, int], frozen_below: int) -> None:
    """Gradients for the new layer and the body's groups from `frozen_below` up."""
    for name, p in net.body.named_parameters():
        p.requires_grad_(group_of[name] >= frozen_below)
    for p in net.head.parameters():
        p.requires_grad_(True)


def warmup_cosine(warm: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor by step: linear warm-up over `warm` steps, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


def run_epochs(
    run: Training,
    loaders: Loaders,
    cfg: FineTuneSettings,
    checkpoint: Path,
    device: torch.device,
    progress: bool,
    log: Callable[[str], None],
) -> None:
    """Epochs from `run.start_epoch` on, each recorded in the history and checkpointed; stop
    after `cfg.patience` epochs without a better validation score."""
    bar = _bar(cfg.epochs, run.start_epoch, progress)
    for epoch in range(run.start_epoch, cfg.epochs):
        row = epoch_row(run, epoch, loaders, cfg, device)
        run.history.append(row)
        if (row["val_accuracy"], -row["val_loss"]) > tuple(run.best.score):
            run.best = Best((row["val_accuracy"], -row["val_loss"]), cpu_state(run.net), epoch)
        save_checkpoint(checkpoint, run, epoch)
        if bar is not None:
            bar.set_postfix_str(f"loss {row['train_loss']:.3f} val acc {row['val_accuracy']:.3f}")
            bar.update(1)
        if epoch - int(run.best.epoch) >= cfg.patience:
            log(f"early stop after epoch {epoch}: no better validation for {cfg.patience} epochs")
            break
    if bar is not None:
        bar.close()


def epoch_row(
    run: Training, epoch: int, loaders: Loaders, cfg: FineTuneSettings, device: torch.device
) -> dict[str, float]:
    """Train one epoch (with this epoch's groups unfrozen) and score validation: its history row."""
    n_groups = len(run.groups)
    frozen_below = frozen_groups(cfg, epoch, n_groups, run.trainable)
    set_trainable(run.net, group_of(run.groups), frozen_below)
    e0 = time.perf_counter()
    tr_loss, tr_acc = train_epoch(run.net, loaders.train, run.opt, run.sched, cfg, device)
    val_logits, val_y = logits(run.net, loaders.val, device)
    return {
        "epoch": float(epoch),
        "train_loss": tr_loss,
        "train_accuracy": tr_acc,
        "val_loss": float(F.cross_entropy(val_logits, val_y)),
        "val_accuracy": float((val_logits.argmax(1) == val_y).float().mean()),
        "epoch_seconds": time.perf_counter() - e0,
        "trainable_groups": float(n_groups - frozen_below),
    }


def train_epoch(
    net: FineTuneNet,
    loader: torch.utils.data.DataLoader,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    cfg: FineTuneSettings,
    device: torch.device,
) -> tuple[float, float]:
    """One pass over the augmented train split: mean loss and accuracy."""
    net.train()
    if cfg.bn == "frozen":  # keep pretrained running statistics: BN layers stay in eval mode
        for m in net.body.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    params = [p for g in opt.param_groups for p in g["params"]]
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast(device):
            out = net(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        total_loss += loss.item() * len(y)
        correct += int((out.argmax(1) == y).sum())
        seen += len(y)
    return total_loss / max(1, seen), correct / max(1, seen)


def save_checkpoint(path: Path, run: Training, epoch: int) -> None:
    """Everything to resume after `epoch` (weights only: loaded with weights_only=True)."""
    state = {
        "net": cpu_state(run.net),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "epoch": epoch,
        "history": run.history,
        "best_score": list(run.best.score),
        "best_state": run.best.state,
        "best_epoch": run.best.epoch,
        "lp": run.lp_info,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, run: Training) -> None:
    """Restore `run` to where its checkpoint left it: the next epoch is the one after."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    run.net.load_state_dict(ck["net"])
    run.opt.load_state_dict(ck["optimizer"])
    run.sched.load_state_dict(ck["scheduler"])
    run.start_epoch, run.history = int(ck["epoch"]) + 1, list(ck["history"])
    run.best = Best(tuple(ck["best_score"]), ck["best_state"], ck["best_epoch"])
    run.lp_info = dict(ck["lp"])


def _bar(total: int, start: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="fine-tune", unit="epoch")
