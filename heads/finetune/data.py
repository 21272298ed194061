"""Fine-tuning's data: the images of each split that still decode, their augmentation, and the
data loaders a run reads them through."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from extractors.common import FILE_TIMEOUT_S, DaemonPool, HeadstartError
from extractors.embedding.backbones import eval_transform
from extractors.embedding.images import ImageError, load_rgb
from heads.settings import FineTuneSettings

SPLITS = ("train", "val", "test")

Split = tuple[list[str], np.ndarray]  # (paths, class indices)


class FineTuneError(HeadstartError, ValueError):
    """Settings or data that fine-tuning cannot use; the message says what to do."""


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


def readable_splits(
    data: dict[str, tuple[list[str], np.ndarray]],
    cls_index: dict[str, int],
    min_side: int,
    log: Callable[[str], None],
) -> tuple[dict[str, Split], list[dict[str, str]]]:
    """data[split] = (paths, labels) as (paths, class indices) of the files that still decode,
    and the others as {path, split, reason} (said in `log`); every split must keep some."""
    splits, skipped = {}, []
    for s in SPLITS:
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
    return splits, skipped


@dataclass
class Loaders:
    """The data loaders of a run: augmented train batches, and each split as it is scored."""

    train: torch.utils.data.DataLoader  # random crops (+ flips), shuffled
    train_eval: torch.utils.data.DataLoader  # the backbone's eval transform: for the probe
    val: torch.utils.data.DataLoader
    test: torch.utils.data.DataLoader


def loaders(
    splits: dict[str, Split],
    preprocessing: dict[str, Any],
    size: int,
    min_side: int,
    cfg: FineTuneSettings,
    device: torch.device,
) -> Loaders:
    """The run's loaders at input size `size` (files decoded at `min_side` or more)."""
    ev_tf = eval_transform(preprocessing, size)

    def loader(
        s: str, tf: Callable, shuffle: bool = False, every_epoch: bool = False
    ) -> torch.utils.data.DataLoader:
        return _loader(splits[s], tf, min_side, cfg, device, shuffle, every_epoch)

    train_eval, test = loader("train", ev_tf), loader("test", ev_tf)
    val = loader("val", ev_tf, every_epoch=True)
    train = loader("train", train_transform(preprocessing, size, cfg), True, every_epoch=True)
    return Loaders(train=train, train_eval=train_eval, val=val, test=test)


def _loader(
    split: Split,
    tf: Callable,
    min_side: int,
    cfg: FineTuneSettings,
    device: torch.device,
    shuffle: bool,
    every_epoch: bool,
) -> torch.utils.data.DataLoader:
    paths, y = split
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
