"""Embedding stage: files -> pooled features; threads decode batches ahead of the model."""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from extractors.common import FILE_TIMEOUT_S, DaemonPool
from extractors.embedding.backbones import Backbone
from extractors.embedding.images import ImageError, open_rgb

DECODE_TIMEOUT_S = FILE_TIMEOUT_S  # one file may not hold up the run for longer than this


@dataclass
class EmbeddedBatch:
    """Embeddings for the files at `indices` (positions in the input list) plus failures."""

    indices: np.ndarray
    embeddings: np.ndarray  # float32, (n, dim)
    widths: np.ndarray
    heights: np.ndarray
    failures: list[tuple[int, str]] = field(default_factory=list)
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # column -> (n, layer dim)


@dataclass
class EmbedStats:
    """Seconds spent per stage; decode time is summed over workers, so it can exceed wall."""

    images: int = 0
    decode_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    wall_s: float = 0.0
    bytes_moved: int = 0  # rows sent from Dask workers to this process (compressed Arrow)
    path: str = ""  # how the network ran (compiled or eager, and why): set by the engine

    def metrics(self) -> dict[str, float]:
        """images/s end to end and milliseconds per image for each stage."""
        n = max(self.images, 1)
        return {
            "images_per_s": self.images / self.wall_s if self.wall_s else 0.0,
            "decode_ms_per_image": 1000 * self.decode_s / n,
            "model_ms_per_image": 1000 * self.model_s / n,
            "write_ms_per_image": 1000 * self.write_s / n,
        } | ({"bytes_moved_per_image": self.bytes_moved / n} if self.bytes_moved else {})

    def postfix(self) -> str:
        m = self.metrics()
        return (
            f"decode {m['decode_ms_per_image']:.1f} model {m['model_ms_per_image']:.1f} "
            f"write {m['write_ms_per_image']:.1f} ms/img"
        )


@dataclass
class SplitTransform:
    """A model's preprocessing cut in two: the PIL part (resize, crop) runs per image in the
    decode threads and hands over uint8; the affine part (to float, normalise) runs once per
    batch. Same numbers as the original transform, a quarter of the bytes and no per-image
    float work."""

    pil: Callable[[Any], Any]
    mean: torch.Tensor  # (3,) in [0, 1] units
    std: torch.Tensor

    def to_uint8(self, img: Any) -> torch.Tensor:
        arr = np.asarray(self.pil(img), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # CHW uint8

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> normalised float32, as ToTensor + Normalize would give."""
        scale = (1.0 / (255.0 * self.std)).view(1, -1, 1, 1)
        shift = (self.mean / self.std).view(1, -1, 1, 1)
        return batch.float().mul_(scale).sub_(shift)


def split_transform(transform: Any) -> SplitTransform | None:
    """Split timm's Compose(..., ToTensor, Normalize) or torchvision's ImageClassification;
    None for any other transform (it then runs whole, per image)."""
    from torchvision import transforms as T
    from torchvision.transforms import functional as F

    if isinstance(transform, T.Compose) and len(transform.transforms) >= 2:
        *head, to_tensor, norm = transform.transforms
        if type(to_tensor).__name__ in ("ToTensor", "MaybeToTensor") and isinstance(
            norm, T.Normalize
        ):
            return SplitTransform(
                T.Compose(head),
                torch.as_tensor(norm.mean, dtype=torch.float32),
                torch.as_tensor(norm.std, dtype=torch.float32),
            )
    if type(transform).__name__ == "ImageClassification":
        tf = transform

        def pil(img: Any) -> Any:
            img = F.resize(
                img, tf.resize_size, interpolation=tf.interpolation, antialias=tf.antialias
            )
            return F.center_crop(img, tf.crop_size)

        return SplitTransform(
            pil, torch.as_tensor(tf.mean, dtype=torch.float32), torch.as_tensor(tf.std)
        )
    return None


class ImageFiles(Dataset):
    """Decodes and preprocesses one file per item; a bad file yields its error, never raises.

    Items are (index, tensor | None, width, height, error | None, seconds spent); the tensor
    is uint8 when `split` is given (finish the batch with `split.finish`), else the output
    of `transform`.
    """

    def __init__(
        self,
        paths: Sequence[str],
        transform: Any,
        min_side: int | None = None,
        split: SplitTransform | None = None,
    ):
        self.paths = list(paths)
        self.transform = transform
        self.min_side = min_side
        self.split = split

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, int, int, str | None, float]:
        start = time.perf_counter()
        try:
            img, width, height = open_rgb(self.paths[i], self.min_side)
            pixels = self.split.to_uint8(img) if self.split else self.transform(img)
        except ImageError as exc:
            return i, None, 0, 0, str(exc), time.perf_counter() - start
        except Exception as exc:  # a transform that cannot handle this image
            return i, None, 0, 0, f"cannot preprocess image: {exc}", time.perf_counter() - start
        return i, pixels, width, height, None, time.perf_counter() - start


def _batches(
    dataset: ImageFiles, batch_size: int, threads: int, prefetch: int, timeout: float
) -> Iterator[list[tuple]]:
    """Items of `dataset` in order, a batch at a time, decoded `prefetch` batches ahead."""
    n = len(dataset)
    starts = list(range(0, n, batch_size))
    if threads == 0 and timeout <= 0:  # in this thread: only when no time limit is asked
        for s in starts:
            yield [dataset[i] for i in range(s, min(n, s + batch_size))]
        return
    pool = DaemonPool(max(1, threads))
    pending: collections.deque[list[tuple[int, Future]]] = collections.deque()
    try:
        for b in range(len(starts)):
            while len(pending) <= prefetch and b + len(pending) < len(starts):
                t = starts[b + len(pending)]
                pending.append(
                    [
                        (i, pool.submit(dataset.__getitem__, i))
                        for i in range(t, min(n, t + batch_size))
                    ]
                )
            items = []
            for i, fut in pending.popleft():
                try:
                    items.append(pool.result(fut, timeout) if timeout > 0 else fut.result())
                except TimeoutError:
                    reason = (
                        f"took longer than {timeout:g} s to read and decode (slow or huge file)"
                    )
                    items.append((i, None, 0, 0, reason, timeout))
            yield items
    finally:
        for batch in pending:
            for _, fut in batch:
                fut.cancel()
        pool.close()


def _collate(items: list[tuple], split: SplitTransform | None) -> dict[str, Any]:
    ok = [it for it in items if it[1] is not None]
    pixels = torch.stack([it[1] for it in ok]) if ok else None
    if pixels is not None and split is not None:
        pixels = split.finish(pixels)
    return {
        "indices": np.array([it[0] for it in ok], dtype=np.int64),
        "pixels": pixels,
        "widths": np.array([it[2] for it in ok], dtype=np.int32),
        "heights": np.array([it[3] for it in ok], dtype=np.int32),
        "failures": [(it[0], it[4]) for it in items if it[1] is None],
        "decode_s": sum(it[5] for it in items),
    }


def default_workers() -> int:
    """Decode threads: as many as cores (they run between and beside model steps), 2..16."""
    return max(2, min(16, os.cpu_count() or 2))


def embed_files(
    backbone: Backbone,
    paths: Sequence[str],
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
    desc: str = "embedding",
    stats: EmbedStats | None = None,
    fast_decode: bool = True,
    timeout: float = DECODE_TIMEOUT_S,
) -> Iterator[EmbeddedBatch]:
    """Yield embeddings batch by batch, in input order; failed files are reported, not raised.

    `fast_decode` decodes JPEGs at a reduced scale when they are at least twice the size the
    transform resizes to; `stats` (if given) accumulates per-stage seconds as batches pass.
    """
    if not paths:
        return
    stats = stats if stats is not None else EmbedStats()
    workers = default_workers() if num_workers is None else num_workers
    split = split_transform(backbone.transform)
    dataset = ImageFiles(
        paths, backbone.transform, backbone.decode_side if fast_decode else None, split
    )
    batches = _batches(dataset, batch_size, workers, prefetch=2, timeout=timeout)
    bar = _progress(len(paths), desc) if progress else None
    start = time.perf_counter()
    try:
        for items in batches:
            batch = _collate(items, split)
            n_in = len(batch["indices"]) + len(batch["failures"])
            yield run_model(backbone, batch, stats)
            stats.images += n_in
            stats.wall_s = time.perf_counter() - start
            if bar is not None:
                bar.set_postfix_str(stats.postfix(), refresh=False)
                bar.update(n_in)
    finally:
        if bar is not None:
            bar.close()


def run_model(backbone: Backbone, batch: dict[str, Any], stats: EmbedStats) -> EmbeddedBatch:
    """The network on one collated batch (`_collate`): its embeddings, failures passed on;
    model and decode seconds added to `stats`."""
    t0 = time.perf_counter()
    if batch["pixels"] is None:
        emb = np.zeros((0, backbone.dim), dtype=np.float32)
        layers = {c: np.zeros((0, d), np.float32) for c, d in backbone.layer_dims.items()}
    else:
        pixels = batch["pixels"]
        if backbone.device.type == "cuda":
            pixels = pixels.pin_memory()
        out, extra = backbone.embed_all(pixels)
        emb = out.numpy().astype(np.float32, copy=False)
        layers = {c: t.numpy().astype(np.float32, copy=False) for c, t in extra.items()}
    stats.model_s += time.perf_counter() - t0
    stats.decode_s += batch["decode_s"]
    return EmbeddedBatch(
        indices=batch["indices"],
        embeddings=emb,
        widths=batch["widths"],
        heights=batch["heights"],
        failures=batch["failures"],
        layers=layers,
    )


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, mininterval=0.5)
