"""The entry point of fine-tuning (`finetune`) and a run's identity (`run_key`): a run's phases
one after another, from the images to the saved `finetuned:<id>` backbone (see the package's
docstring for the recipe)."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extractors.common import exclusive
from extractors.embedding.backbones import Backbone, crop_fraction
from heads.finetune.calibration import calibrated_test
from heads.finetune.data import FineTuneError, loaders, readable_splits
from heads.finetune.loop import CHECKPOINT, Training, train
from heads.finetune.network import FineTuneNet
from heads.finetune.outcome import DONE, FineTuned, finished, head_result, record, reuse
from heads.finetune.save import save_network
from heads.settings import FineTuneSettings


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
    """The run's phases: reuse a finished run, else read the images, train, calibrate on
    validation, score test once, save the network and record the run."""
    log = log or _stderr
    device = backbone.device
    torch.manual_seed(cfg.seed)
    classes = [str(c) for c in classes]
    size = cfg.image_size or default_image_size(backbone, device)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / DONE).exists():
        return reuse(workdir, classes, cfg, data["test"], ids)
    min_side = math.floor(size / crop_fraction(backbone.preprocessing))
    cls_index = {c: i for i, c in enumerate(classes)}
    splits, skipped = readable_splits(data, cls_index, min_side, log)
    loads = loaders(splits, backbone.preprocessing, size, min_side, cfg, device)
    net = FineTuneNet(backbone, len(classes)).to(device)
    t0 = time.perf_counter()
    run = train(net, backbone, loads, cfg, workdir, size, progress, log)
    net.load_state_dict(run.best.state)
    temperature, proba, test_y = calibrated_test(net, loads, device)
    summary = _summary(run, size, temperature, time.perf_counter() - t0, device)
    save_network(net, backbone, classes, cfg, size, temperature, workdir, summary)
    result = head_result(cfg, classes, proba, np.asarray(classes)[test_y.numpy()], summary)
    saved = record(summary, run.history, proba, test_y, splits["test"][0], ids, skipped)
    out = finished(workdir, result, saved, run.start_epoch)
    (workdir / CHECKPOINT).unlink(missing_ok=True)  # optimizer state is large; the net is saved
    return out


def _summary(
    run: Training, size: int, temperature: float, seconds: float, device: torch.device
) -> dict[str, Any]:
    """The run in numbers (`seconds` of this call; the epochs before a resume are added)."""
    earlier = sum(h["epoch_seconds"] for h in run.history[: run.start_epoch])
    return {
        "best_epoch": int(run.best.epoch),
        "epochs_run": len(run.history),
        "image_size": size,
        "temperature": temperature,
        "val_accuracy": float(run.best.score[0]),
        "fit_seconds": seconds + earlier,
        "groups": len(run.groups),
        "device": str(device),
        **run.lp_info,
    }


def _stderr(message: str) -> None:
    """Messages go where the progress bars go, so stdout stays clean for --json."""
    print(message, file=sys.stderr, flush=True)
