"""Fine-tuning a backbone when frozen heads fall short: head only, top blocks, or the whole network.

Recipe (the transfer-learning practice of LP-FT, ULMFiT and layer-wise learning-rate decay):

- The network is the backbone's own feature extractor plus a new linear layer. That layer is
  warm-started from a logistic-regression probe fitted on the network's frozen features at the
  fine-tuning input size, C chosen on validation (LP-FT, Kumar et al. 2022): fine-tuning then
  starts from the probe's accuracy instead of from a random head that wrecks the features.
- Strategies: `head` (only the new layer trains), `partial` (the top `blocks` groups of layers
  also train), `full` (every layer). Groups are the backbone's stages (`Backbone.stages()`),
  the stem with the first stage and what follows the last stage as groups of their own.
  The top trainable group learns at `backbone_lr`, each group below at `layer_decay` times the
  one above; the new layer at `head_lr`. `gradual` unfreezes one more group per epoch, top down.
- BatchNorm: `frozen` keeps the pretrained running statistics (and is the stable choice for
  small batches and small data), `train` updates them.
- Random resized crops (and horizontal flips unless `flip=False`), AdamW with a linear warm-up
  and cosine decay, label smoothing, gradient clipping, autocast (bf16/fp16) on CUDA.
- Early stopping on validation accuracy (ties: lower validation loss); the best epoch is kept.
  Its logits are temperature-scaled on validation, then the **test split is scored once** with
  `heads.evaluate.score`: the same split and metric names as the heads.
- A weights-only checkpoint is written atomically after every epoch in `workdir`; a re-run with
  the same configuration resumes from it, and a finished run (`done.json`) is not retrained.

The result is a backbone of its own: `workdir` holds `backbone.safetensors` (the whole base
network's state dict, its original classifier included), `head.safetensors` and `config.json`
(extractors/embedding/finetuned.py owns that format),
which `extractors.embedding.backbones` loads as `finetuned:<id>`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extractors.common import (
    FILE_TIMEOUT_S,
    DaemonPool,
    HeadstartError,
    atomic_path,
    exclusive,
    write_json_atomic,
)
from extractors.embedding.backbones import Backbone, crop_fraction, eval_transform
from extractors.embedding.finetuned import save_network
from extractors.embedding.images import ImageError, load_rgb
from extractors.store.layout import os_path
from heads.evaluate import HeadResult, scored_on_test
from heads.settings import FineTuneSettings

CHECKPOINT = "checkpoint.pt"
DONE = "done.json"


class FineTuneError(HeadstartError, ValueError):
    """Settings or data that fine-tuning cannot use; the message says what to do."""


@dataclass
class FineTuned:
    """What a fine-tuning run produced."""

    result: HeadResult  # test metrics etc., comparable with the heads
    history: list[dict[str, float]]  # one row per epoch
    workdir: Path  # backbone.safetensors, head.safetensors, config.json
    key: str  # the `finetuned:<key>` backbone name's id
    resumed_from_epoch: int  # 0 when trained from scratch, -1 when the finished run was reused
    skipped: list[dict[str, str]]  # {path, split, reason}: files that no longer decode
    test_paths: list[str]  # the test images scored, in the order of result.test_proba
    test_ids: list[str] = field(default_factory=list)  # their content ids, where given


# --- data ----------------------------------------------------------------------------------


class LabelledImages(torch.utils.data.Dataset):
    """(image tensor, class index) from files; decoded at reduced scale when much larger."""

    def __init__(self, paths: Sequence[str], y: np.ndarray, transform: Callable, min_side: int):
        self.paths, self.y, self.transform, self.min_side = list(paths), y, transform, min_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            image = load_rgb(self.paths[i], min_side=self.min_side)
        except ImageError as exc:  # checked before training: it changed since
            raise FineTuneError(
                f"{self.paths[i]} became unreadable during fine-tuning ({exc}); restore or "
                "remove it and re-run (training resumes from the last finished epoch)"
            ) from None
        return self.transform(image), int(self.y[i])


def train_transform(preprocessing: dict[str, Any], size: int, cfg: FineTuneSettings) -> Callable:
    """Random resized crop (+ flip) at `size`, then the backbone's own normalisation."""
    from torchvision import transforms as T

    interp = T.InterpolationMode(preprocessing.get("interpolation") or "bilinear")
    steps: list[Any] = [
        T.RandomResizedCrop(size, scale=(cfg.crop_scale, 1.0), interpolation=interp)
    ]
    if cfg.flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(preprocessing["mean"], preprocessing["std"])]
    return T.Compose(steps)


def decodable(
    paths: Sequence[str], y: np.ndarray, min_side: int, threads: int = 4
) -> tuple[list[str], np.ndarray, list[dict[str, str]]]:
    """Keep the files that still decode (each within the file time limit, at the reduced
    scale training reads them at); the others as {path, reason}: moved, deleted or corrupted
    since they were embedded."""
    pool = DaemonPool(threads)
    futures = [pool.submit(lambda p: load_rgb(p, min_side=min_side).size, p) for p in paths]
    ok, failed = np.ones(len(paths), dtype=bool), []
    for i, (path, fut) in enumerate(zip(paths, futures, strict=True)):
        try:
            fut.result(timeout=FILE_TIMEOUT_S)
        except ImageError as exc:
            ok[i] = False
            failed.append({"path": path, "reason": str(exc)})
        except TimeoutError:
            ok[i] = False
            failed.append({"path": path, "reason": f"not read within {FILE_TIMEOUT_S} s"})
    pool.close()
    return [p for p, k in zip(paths, ok, strict=True) if k], y[ok], failed


# --- network -------------------------------------------------------------------------------


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


def _group_of(groups: list[list[str]]) -> dict[str, int]:
    return {n: i for i, grp in enumerate(groups) for n in grp}


# --- the run -------------------------------------------------------------------------------


def run_key(cfg: FineTuneSettings, backbone: Backbone, fingerprint: str, classes: list[str]) -> str:
    """Identity of a run: same data, backbone and settings -> same key (resume, no retrain)."""
    blob = json.dumps(
        [asdict(cfg), backbone.name, backbone.weights, fingerprint, classes], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_image_size(backbone: Backbone, device: torch.device) -> int:
    """The backbone's own input size on a GPU; on a CPU at most 128 px (say so in the output)."""
    own = int((backbone.preprocessing.get("input_size") or [3, 224, 224])[-1])
    return own if device.type == "cuda" else min(own, 128)


def finetune(
    backbone: Backbone,
    data: dict[str, tuple[list[str], np.ndarray]],
    classes: list[str],
    cfg: FineTuneSettings,
    workdir: str | Path,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    ids: dict[str, str] | None = None,
) -> FineTuned:
    """Fine-tune `backbone` on data[split] = (paths, labels) for train/val/test (see above).

    The backbone object is trained in place (it is the network's body); pass a fresh one.
    One run at a time per `workdir` (a second identical run is refused, not interleaved).
    `ids` (path -> content id, e.g. SHA-256) names the test images by content: a finished
    run is then reused for the same images at other paths (a copied folder), its test rows
    given back at the paths of this call.
    """
    busy = FineTuneError(
        f"another fine-tuning run with the same settings is writing {workdir}; wait for it "
        "(its result is then reused) or change a setting"
    )
    with exclusive(Path(workdir) / ".lock", busy):
        return _finetune(backbone, data, classes, cfg, workdir, progress, log, ids or {})


def _finetune(
    backbone: Backbone,
    data: dict[str, tuple[list[str], np.ndarray]],
    classes: list[str],
    cfg: FineTuneSettings,
    workdir: str | Path,
    progress: bool,
    log: Callable[[str], None] | None,
    ids: dict[str, str],
) -> FineTuned:
    log = log or _stderr
    device = backbone.device
    torch.manual_seed(cfg.seed)
    classes = [str(c) for c in classes]
    cls_index = {c: i for i, c in enumerate(classes)}
    size = cfg.image_size or default_image_size(backbone, device)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    prep = backbone.preprocessing
    ev_tf = eval_transform(prep, size)
    min_side = math.floor(size / crop_fraction(prep))
    done = workdir / DONE
    if done.exists():
        test = [(p, cls_index[str(c)]) for p, c in zip(*data["test"], strict=True)]
        test = [(p, c) for p, c in test if Path(os_path(p)).is_file()]
        y = np.asarray([c for _, c in test], dtype=np.int64)
        return _reuse(done, workdir, classes, cfg, y, [p for p, _ in test], ids)
    splits, skipped = {}, []
    for s in ("train", "val", "test"):
        paths, labels = data[s]
        y = np.array([cls_index[str(c)] for c in labels], dtype=np.int64)
        paths, y, failed = decodable(paths, y, min_side)
        for f in failed:
            skipped.append({"path": f["path"], "split": s, "reason": f["reason"]})
        splits[s] = (paths, y)
    if skipped:
        log(
            f"fine-tuning skips {len(skipped)} file(s) that no longer decode (recorded with the "
            f"run), e.g. {skipped[0]['path']}: {skipped[0]['reason']}"
        )
    if not splits["train"][0] or not splits["val"][0] or not splits["test"][0]:
        raise FineTuneError("fine-tuning needs readable train, val and test images")

    def loader(
        s: str, tf: Callable, shuffle: bool = False, every_epoch: bool = False
    ) -> torch.utils.data.DataLoader:
        paths, y = splits[s]
        # Decode workers only on a GPU (on a CPU they would compete with the model for cores);
        # spawned, not forked (forked workers die under Prefect's threads); kept alive only
        # for the loaders used every epoch.
        workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
        return torch.utils.data.DataLoader(
            LabelledImages(paths, y, tf, min_side),
            batch_size=cfg.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            multiprocessing_context="spawn" if workers else None,
            persistent_workers=workers > 0 and every_epoch,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    train_eval, test_loader = loader("train", ev_tf), loader("test", ev_tf)
    val_loader = loader("val", ev_tf, every_epoch=True)
    train_loader = loader("train", train_transform(prep, size, cfg), True, every_epoch=True)

    net = FineTuneNet(backbone, len(classes)).to(device)
    groups = layer_groups(backbone)
    group_of = _group_of(groups)
    n_groups = len(groups)
    trainable_groups = {"head": 0, "partial": min(cfg.blocks, n_groups), "full": n_groups}[
        cfg.strategy
    ]
    t0 = time.perf_counter()
    start_epoch, history, best = 0, [], {"score": (-1.0, 0.0), "state": None, "epoch": -1}
    ckpt_path = workdir / CHECKPOINT
    lp_info: dict[str, Any] = {}
    param_groups = _param_groups(net, groups, group_of, trainable_groups, cfg)
    opt = torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train_loader))
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(warm, total))
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start_epoch, history = int(ck["epoch"]) + 1, list(ck["history"])
        best = {
            "score": tuple(ck["best_score"]),
            "state": ck["best_state"],
            "epoch": ck["best_epoch"],
        }
        lp_info = dict(ck["lp"])
        log(f"resuming fine-tuning from epoch {start_epoch} ({ckpt_path})")
    else:
        lp_info = _warm_start_head(net, train_eval, val_loader, device)
        log(
            f"head warm-started from a logistic-regression probe at {size} px: "
            f"val accuracy {lp_info['lp_val_accuracy']:.3f} (C={lp_info['lp_C']:g})"
        )
    bar = _bar(cfg.epochs, start_epoch, progress)
    for epoch in range(start_epoch, cfg.epochs):
        frozen_below = _frozen_groups(cfg, epoch, n_groups, trainable_groups)
        _set_trainable(net, group_of, frozen_below)
        e0 = time.perf_counter()
        tr_loss, tr_acc = _train_epoch(net, train_loader, opt, sched, cfg, device)
        val_logits, val_y = _logits(net, val_loader, device)
        val_loss = float(F.cross_entropy(val_logits, val_y))
        val_acc = float((val_logits.argmax(1) == val_y).float().mean())
        row = {
            "epoch": float(epoch),
            "train_loss": tr_loss,
            "train_accuracy": tr_acc,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "epoch_seconds": time.perf_counter() - e0,
            "trainable_groups": float(n_groups - frozen_below),
        }
        history.append(row)
        if (val_acc, -val_loss) > tuple(best["score"]):
            best = {"score": (val_acc, -val_loss), "state": _cpu_state(net), "epoch": epoch}
        _save_checkpoint(ckpt_path, net, opt, sched, epoch, history, best, lp_info)
        if bar is not None:
            bar.set_postfix_str(f"loss {tr_loss:.3f} val acc {val_acc:.3f}")
            bar.update(1)
        if epoch - int(best["epoch"]) >= cfg.patience:
            log(f"early stop after epoch {epoch}: no better validation for {cfg.patience} epochs")
            break
    if bar is not None:
        bar.close()
    net.load_state_dict(best["state"])
    val_logits, val_y = _logits(net, val_loader, device)
    temperature = _fit_temperature(val_logits, val_y)
    test_logits, test_y = _logits(net, test_loader, device)
    proba = torch.softmax(test_logits / temperature, dim=1).double().numpy()  # JSON-exact
    seconds = time.perf_counter() - t0 + sum(h["epoch_seconds"] for h in history[:start_epoch])
    summary = {
        "best_epoch": int(best["epoch"]),
        "epochs_run": len(history),
        "image_size": size,
        "temperature": temperature,
        "val_accuracy": float(best["score"][0]),
        "fit_seconds": seconds,
        "groups": n_groups,
        "device": str(device),
        **lp_info,
    }
    _save_network(net, backbone, classes, cfg, size, temperature, workdir, summary)
    result = _result(cfg, classes, proba, np.asarray(classes)[test_y.numpy()], summary)
    saved = {
        "summary": summary,
        "history": history,
        "test_proba": proba.tolist(),
        "test_y": test_y.tolist(),
        "test_paths": splits["test"][0],
        "test_ids": [ids[p] for p in splits["test"][0] if p in ids],
        "skipped": skipped,
    }
    if len(saved["test_ids"]) != len(splits["test"][0]):
        saved["test_ids"] = []  # some test image without an id: its paths name them
    _write_json(done, saved)
    ckpt_path.unlink(missing_ok=True)  # optimizer state is large; the finished net is saved
    return FineTuned(
        result,
        history,
        workdir,
        workdir.name,
        start_epoch,
        skipped,
        splits["test"][0],
        saved["test_ids"],
    )


def _result(
    cfg: FineTuneSettings,
    classes: list[str],
    proba: np.ndarray,
    y_test: np.ndarray,
    summary: dict[str, Any],
) -> HeadResult:
    name = f"finetune:{cfg.strategy}"
    params = {"strategy": cfg.strategy, "image_size": summary["image_size"]}
    if cfg.strategy == "partial":
        params["blocks"] = cfg.blocks
    params["best_epoch"] = summary["best_epoch"]
    return HeadResult(
        name=name,
        estimator=None,
        params=params,
        sweep=[],
        val_score=summary["val_accuracy"],
        selection_metric="accuracy",
        fit_seconds=summary["fit_seconds"],
        extra=dict(summary),
        **scored_on_test(proba, np.asarray(classes), y_test, seed=cfg.seed),
    )


def _reuse(
    done: Path,
    workdir: Path,
    classes: list[str],
    cfg: FineTuneSettings,
    test_y: np.ndarray,
    test_paths: list[str],
    ids: dict[str, str],
) -> FineTuned:
    """A finished run with the same key: its saved outcome (test labels and the files it
    skipped included; `test_y` for runs saved before they were), no retraining. The same key
    can come from the same images at other paths (a copy of the folder): its test images are
    named by their content ids, and given back at this call's paths with those ids."""
    saved = json.loads(done.read_text())
    saved_ids = list(saved.get("test_ids") or [])
    paths = list(saved.get("test_paths", test_paths))
    if saved_ids and len(saved_ids) == len(paths):
        here: dict[str, list[str]] = {}
        for p in test_paths:  # content id -> this call's test paths, in order
            if p in ids:
                here.setdefault(ids[p], []).append(p)
        pairs = zip(saved_ids, paths, strict=True)
        paths = [here[i].pop(0) if here.get(i) else old for i, old in pairs]
    proba = np.asarray(saved["test_proba"], dtype=np.float64)
    test_y = np.asarray(saved.get("test_y", test_y), dtype=np.int64)
    result = _result(cfg, classes, proba, np.asarray(classes)[test_y], saved["summary"])
    return FineTuned(
        result,
        saved["history"],
        workdir,
        workdir.name,
        -1,
        saved.get("skipped", []),
        paths,
        saved_ids,
    )


def _param_groups(
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


def _frozen_groups(cfg: FineTuneSettings, epoch: int, n: int, trainable: int) -> int:
    """Number of bottom groups kept frozen this epoch (gradual: one more unfrozen per epoch)."""
    if cfg.gradual and trainable:
        return n - min(trainable, epoch)  # epoch 0: head only
    return n - trainable


def _set_trainable(net: FineTuneNet, group_of: dict[str, int], frozen_below: int) -> None:
    for name, p in net.body.named_parameters():
        p.requires_grad_(group_of[name] >= frozen_below)
    for p in net.head.parameters():
        p.requires_grad_(True)


def _warmup_cosine(warm: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


def _train_epoch(
    net: FineTuneNet,
    loader: torch.utils.data.DataLoader,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    cfg: FineTuneSettings,
    device: torch.device,
) -> tuple[float, float]:
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
        with _autocast(device):
            logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        total_loss += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return total_loss / max(1, seen), correct / max(1, seen)


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def _outputs(
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
        with _autocast(device):
            outs.append(fn(x).float().cpu())
        ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def _logits(net: FineTuneNet, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return _outputs(net, net, loader, device)


def _warm_start_head(
    net: FineTuneNet,
    train_loader: torch.utils.data.DataLoader,
    val_loader: torch.utils.data.DataLoader,
    device: torch.device,
) -> dict[str, Any]:
    """LP-FT: fit the new layer as a logistic-regression probe on the frozen features at this
    input size (raw features, so its weights stay small; C chosen on validation)."""
    from sklearn.linear_model import LogisticRegression

    Xtr, ytr = (t.numpy() for t in _outputs(net.features, net, train_loader, device))
    Xva, yva = (t.numpy() for t in _outputs(net.features, net, val_loader, device))
    best: tuple[float, float, Any] | None = None
    for C in (1e-3, 1e-2, 0.1, 1.0, 10.0):
        lr = LogisticRegression(C=C, max_iter=2000).fit(Xtr, ytr)
        acc = float(lr.score(Xva, yva))
        if best is None or acc > best[0]:
            best = (acc, C, lr)
    acc, C, lr = best
    W = np.zeros((net.head.out_features, Xtr.shape[1]), dtype=np.float32)
    b = np.zeros(net.head.out_features, dtype=np.float32)
    if len(lr.classes_) == 2 and lr.coef_.shape[0] == 1:  # binary form: logits (0, w.x + b)
        W[lr.classes_[1]], b[lr.classes_[1]] = lr.coef_[0], lr.intercept_[0]
    else:
        W[lr.classes_], b[lr.classes_] = lr.coef_, lr.intercept_
    with torch.no_grad():
        net.head.weight.copy_(torch.from_numpy(W))
        net.head.bias.copy_(torch.from_numpy(b))
    return {"lp_val_accuracy": acc, "lp_C": C}


def _fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): one scalar T minimising validation NLL."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def _cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


def _save_checkpoint(path: Path, net, opt, sched, epoch, history, best, lp_info) -> None:
    state = {
        "net": _cpu_state(net),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": epoch,
        "history": history,
        "best_score": list(best["score"]),
        "best_state": best["state"],
        "best_epoch": best["epoch"],
        "lp": lp_info,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _save_network(
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
    save_network(
        workdir,
        _cpu_state(net.body),
        _cpu_state(net.head),
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


def _write_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj)


def _stderr(message: str) -> None:
    """Messages go where the progress bars go, so stdout stays clean for --json."""
    print(message, file=sys.stderr, flush=True)


def _bar(total: int, start: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="fine-tune", unit="epoch")
