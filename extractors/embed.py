"""Embedding stage: files -> pooled penultimate features, batched by a DataLoader with workers."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from extractors.backbones import Backbone
from extractors.images import ImageError, load_rgb


@dataclass
class EmbeddedBatch:
    """Embeddings for the files at `indices` (positions in the input list) plus failures."""

    indices: np.ndarray
    embeddings: np.ndarray  # float32, (n, dim)
    widths: np.ndarray
    heights: np.ndarray
    failures: list[tuple[int, str]] = field(default_factory=list)


class ImageFiles(Dataset):
    """Decodes and preprocesses one file per item; a bad file yields its error, never raises."""

    def __init__(self, paths: Sequence[str], transform: Any):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, int, int, str | None]:
        try:
            img = load_rgb(self.paths[i])
        except ImageError as exc:
            return i, None, 0, 0, str(exc)
        width, height = img.size
        try:
            return i, self.transform(img), width, height, None
        except Exception as exc:  # a transform that cannot handle this image
            return i, None, width, height, f"cannot preprocess image: {exc}"


def _collate(items: list[tuple]) -> dict[str, Any]:
    ok = [it for it in items if it[1] is not None]
    return {
        "indices": torch.tensor([it[0] for it in ok], dtype=torch.long),
        "pixels": torch.stack([it[1] for it in ok]) if ok else None,
        "widths": torch.tensor([it[2] for it in ok], dtype=torch.int32),
        "heights": torch.tensor([it[3] for it in ok], dtype=torch.int32),
        "failures": [(it[0], it[4]) for it in items if it[1] is None],
    }


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the model for cores


def default_workers() -> int:
    """Decode workers: one per core beyond the one running the model, at least one."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def embed_files(
    backbone: Backbone,
    paths: Sequence[str],
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
    desc: str = "embedding",
) -> Iterator[EmbeddedBatch]:
    """Yield embeddings batch by batch, in input order; failed files are reported, not raised."""
    if not paths:
        return
    workers = default_workers() if num_workers is None else num_workers
    if len(paths) <= batch_size:
        workers = 0  # not worth starting processes for one batch
    loader = DataLoader(
        ImageFiles(paths, backbone.transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=backbone.device.type == "cuda",
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        # Fresh worker processes: forking a process that runs threads (Prefect's engine, CUDA)
        # can kill or hang the children.
        multiprocessing_context="spawn" if workers else None,
    )
    bar = _progress(len(paths), desc) if progress else None
    try:
        for batch in loader:
            n_in = len(batch["indices"]) + len(batch["failures"])
            if batch["pixels"] is None:
                emb = np.zeros((0, backbone.dim), dtype=np.float32)
            else:
                emb = backbone.embed(batch["pixels"]).numpy().astype(np.float32, copy=False)
            yield EmbeddedBatch(
                indices=batch["indices"].numpy(),
                embeddings=emb,
                widths=batch["widths"].numpy(),
                heights=batch["heights"].numpy(),
                failures=batch["failures"],
            )
            if bar is not None:
                bar.update(n_in)
    finally:
        if bar is not None:
            bar.close()


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, mininterval=0.5)
