"""bench/gpu.py's extraction parts: photo-sized JPEGs made on the spot, the two backbones, and
the paths measured on them (the bare model, ours from JPEG files to Parquet, the naive loop),
the largest batch that fits, and CPU decode threads against batched nvJPEG decoding.

Every function takes a `deadline` (time.perf_counter() seconds) where it loops, and stops
early there with what it has measured (said in its result), so one slow part cannot eat the
run's time limit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

PHOTO_CLASSES = 7  # bench/extract.py's make_images cycles through its 7 bundled photos


# --- images --------------------------------------------------------------------------------


def _bases(folder: str, n: int, long_side: tuple[int, int], seed: int) -> list[str]:
    from bench.extract import make_images

    return make_images(Path(folder), n, long_side, seed=seed)


def make_photos(
    folder: Path, n: int, long_side: tuple[int, int], distinct: int = 64
) -> tuple[list[str], np.ndarray]:
    """`n` photo-sized JPEGs and their class (the photo each was cut from): `distinct` of
    them made by bench/extract.py's generator (in parallel processes), the rest byte-copies
    of those with a JPEG comment segment of their own, so each file has content of its own
    (the store embeds each content once) at the same decoding cost as its original."""
    distinct = max(1, min(n, distinct))
    workers = max(1, min(8, os.cpu_count() or 1, distinct // 4))
    per = -(-distinct // workers)
    # fork: no CUDA is up yet, and the children need nothing but numpy, PIL and skimage
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        jobs = [
            pool.submit(_bases, str(folder / f"base{k}"), per, long_side, 100 + k)
            for k in range(workers)
        ]
        bases = [p for job in jobs for p in job.result()][:distinct]
    labels = np.array([int(Path(p).stem.split("_")[1]) % PHOTO_CLASSES for p in bases])
    out = folder / "photos"
    out.mkdir(parents=True, exist_ok=True)
    paths, ys = [], []
    for i in range(n):
        src = Path(bases[i % distinct])
        data = src.read_bytes()
        note = f"headstart bench copy {i}".encode()
        com = b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note
        dst = out / f"photo_{i:06d}.jpg"
        dst.write_bytes(data[:2] + com + data[2:])  # after SOI: a comment segment
        paths.append(str(dst))
        ys.append(int(labels[i % distinct]))
    return paths, np.array(ys)


# --- backbones -----------------------------------------------------------------------------


def build_backbone(name: str, device: str, folder: Path):
    """`resnet50`: torchvision's ResNet-50 with random weights (saved to a file in `folder`
    and loaded through the project's `weights=` path: no download); else a registry name."""
    from extractors.embedding.backbones import create_backbone

    if name != "resnet50":
        return create_backbone(name, device=device)
    path = folder / "resnet50-random.safetensors"
    if not path.exists():
        import torchvision.models as tvm
        from safetensors.torch import save_file

        torch.manual_seed(0)
        sd = tvm.resnet50(weights=None).state_dict()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return create_backbone("torchvision:resnet50", weights=path, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _input_size(bb) -> list[int]:
    """(3, height, width) the model takes (torchvision's records give one side)."""
    size = list(bb.preprocessing.get("input_size") or [3, 224, 224])
    return size if len(size) == 3 else [3, size[-1], size[-1]]


def _noise(b: int, bb) -> torch.Tensor:
    """A batch of `b` random inputs on the backbone's device, made in its channels-last layout
    (no second copy: at the largest batches one input is ~10 GB)."""
    size = (b, *_input_size(bb))
    x = torch.empty(size, device=bb.device, memory_format=torch.channels_last)
    return x.normal_()


# --- the largest batch ---------------------------------------------------------------------


def largest_batch(bb, start: int, cap: int, deadline: float) -> dict[str, Any]:
    """Double the batch from `start` until it no longer fits in GPU memory, reaches `cap` or
    time runs out: images/s and peak memory at each size; the largest that fits, and the one
    chosen to extract with (the smallest within 5% of the fastest)."""
    dev = bb.device
    rows: list[dict[str, Any]] = []
    stopped = f"cap {cap} reached"
    b = start
    while b <= cap:
        if time.perf_counter() > deadline:
            stopped = "time limit"
            break
        try:
            rows.append(_time_batch(bb, b))
        except torch.cuda.OutOfMemoryError:
            stopped = f"out of GPU memory at {b}"
            break
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        b *= 2
    if not rows:
        raise RuntimeError(f"no batch size fitted ({stopped})")
    best = max(r["images_per_s"] for r in rows)
    chosen = min(r["batch"] for r in rows if r["images_per_s"] >= 0.95 * best)
    return {
        "sizes": rows,
        "largest_fitting": rows[-1]["batch"],
        "stopped": stopped,
        "chosen": chosen,
        "peak_gpu_memory_gb": max((r["peak_gpu_memory_gb"] or 0) for r in rows) or None,
    }


def _time_batch(bb, b: int) -> dict[str, Any]:
    dev = bb.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    x = _noise(b, bb)
    bb.embed(x)  # warm-up (cuDNN picks its algorithms)
    reps = max(1, 1024 // b) if dev.type == "cuda" else 1
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        bb.embed(x)
    _sync(dev)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {"batch": b, "images_per_s": b * reps / seconds, "peak_gpu_memory_gb": peak}


# --- the three paths -----------------------------------------------------------------------


def bare(bb, n: int, batch: int, deadline: float) -> dict[str, Any]:
    """The model alone on a batch already in device memory: the limit of any path."""
    dev = bb.device
    x = _noise(batch, bb)
    bb.embed(x)  # warm-up
    _sync(dev)
    done, t0 = 0, time.perf_counter()
    while done < n and (done == 0 or time.perf_counter() < deadline):
        k = min(batch, n - done)
        bb.embed(x[:k])
        done += k
    _sync(dev)
    seconds = time.perf_counter() - t0
    return {"images": done, "seconds": seconds, "images_per_s": done / seconds}


def ours(bb, paths: list[str], batch: int, folder: Path) -> dict[str, Any]:
    """The project's path from JPEG files to Parquet: `Store.update` with the local engine
    (decode threads, the model in bf16 autocast on a GPU, the background Parquet writer, the
    merge, the FAISS index and the manifest), into a new store; eager (no compiled package)."""
    from extractors.embedding.engines import LocalEngine
    from extractors.embedding.sources import read_source
    from extractors.settings import EmbedSettings
    from extractors.store.store import Store

    src = folder / "photos"
    store = Store(Path(tempfile.mkdtemp(prefix="store-", dir=folder)))
    settings = EmbedSettings(batch_size=batch, compile=False)
    t0 = time.perf_counter()
    report = store.update(read_source(src), bb, progress=False, engine=LocalEngine(settings, False))
    seconds = time.perf_counter() - t0
    if report.rows != len(paths):
        raise RuntimeError(f"{report.rows} rows for {len(paths)} files: {report.failures[:2]}")
    return {
        "images": report.rows,
        "seconds": seconds,
        "images_per_s": report.rows / seconds,
        "stages": report.stats,
        "network": report.model_path,
        "decode_threads": settings.decode_threads or _decode_threads(),
        "store": str(store.path),
    }


def _decode_threads() -> int:
    from extractors.embedding.embed import default_workers

    return default_workers()


def naive(bb, paths: list[str], batch: int, deadline: float) -> dict[str, Any]:
    """The tutorial loop: PIL open + transform per file in the main thread, stack, the stock
    model in float32 (no autocast, default memory layout), one batch after another."""
    from PIL import Image

    model = bb.model.to(memory_format=torch.contiguous_format)
    done, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(paths), batch):
            chunk = paths[start : start + batch]
            x = torch.stack([bb.transform(Image.open(p).convert("RGB")) for p in chunk])
            bb._features(model, x.to(bb.device)).cpu()
            done += len(chunk)
            if time.perf_counter() > deadline:
                break
    seconds = time.perf_counter() - t0
    model.to(memory_format=torch.channels_last)  # the backbone's own layout back
    return {"images": done, "seconds": seconds, "images_per_s": done / seconds}


def cosine_to_cpu(bb_name: str, store_path: str, folder: Path, n: int) -> dict[str, float]:
    """The store's rows (embedded on this run's device) against the same backbone on the CPU
    in float32, on the same files as `Backbone.prepare` decodes them: min and mean cosine."""
    from extractors.store.layout import embedding_matrix
    from extractors.store.store import Store

    table = Store(Path(store_path)).table(["path", "embedding"]).slice(0, n)
    stored = torch.from_numpy(np.array(embedding_matrix(table)))
    cpu = build_backbone(bb_name, "cpu", folder)
    paths = table["path"].to_pylist()
    ref = torch.cat([cpu.embed(cpu.prepare(Path(p))) for p in paths])
    cos = torch.nn.functional.cosine_similarity(stored, ref, dim=1)
    return {"images": len(paths), "min": float(cos.min()), "mean": float(cos.mean())}


# --- decoding: CPU threads against nvJPEG --------------------------------------------------


def cpu_decode(bb, paths: list[str], batch: int, deadline: float) -> dict[str, Any]:
    """The engine's decode stage alone: its threads (reduced-scale JPEG decoding, the
    backbone's resize and crop, uint8) feeding batches as fast as they can, no model."""
    from extractors.embedding.embed import (
        DECODE_TIMEOUT_S,
        ImageFiles,
        _batches,
        default_workers,
        split_transform,
    )

    split = split_transform(bb.transform)
    data = ImageFiles(paths, bb.transform, bb.decode_side, split)
    threads = default_workers()
    done, t0 = 0, time.perf_counter()
    for items in _batches(data, batch, threads, prefetch=2, timeout=DECODE_TIMEOUT_S):
        done += len(items)
        if time.perf_counter() > deadline:
            break
    seconds = time.perf_counter() - t0
    return {"images": done, "threads": threads, "images_per_s": done / seconds}


def gpu_preprocess(bb, images: list[torch.Tensor]) -> torch.Tensor:
    """Decoded CHW uint8 images (on the device) -> the normalised batch the model takes: the
    short side resized to the transform's (its interpolation, antialiased), centre-cropped."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    side = bb.decode_side or _input_size(bb)[-1]
    crop = _input_size(bb)[-2:]
    prep = bb.preprocessing
    mode = InterpolationMode(prep.get("interpolation") or "bilinear")
    mean = torch.tensor(prep.get("mean", (0.485, 0.456, 0.406)), device=images[0].device)
    std = torch.tensor(prep.get("std", (0.229, 0.224, 0.225)), device=images[0].device)
    out = []
    for img in images:
        img = F.resize(img.float(), [side], interpolation=mode, antialias=True)
        out.append(F.center_crop(img, crop).clamp_(0, 255))
    x = torch.stack(out).div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def nvjpeg(bb, paths: list[str], batch: int, deadline: float, embed: bool) -> dict[str, Any]:
    """Batched `torchvision.io.decode_jpeg(..., device=<the backbone's>)` (nvJPEG on a GPU)
    plus the resize and crop on the device; with `embed`, the model too (the whole path)."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    dev = bb.device
    kw = {"device": dev} if dev.type == "cuda" else {}
    done, feats, t0 = 0, [], time.perf_counter()
    for start in range(0, len(paths), batch):
        datas = [read_file(p) for p in paths[start : start + batch]]
        images = decode_jpeg(datas, mode=ImageReadMode.RGB, **kw)
        x = gpu_preprocess(bb, images)
        if embed:
            feats.append(bb.embed(x.contiguous(memory_format=torch.channels_last)))
        done += len(datas)
        if time.perf_counter() > deadline:
            break
    _sync(dev)
    seconds = time.perf_counter() - t0
    out = {"images": done, "images_per_s": done / seconds, "device": str(dev)}
    if embed:
        out["embeddings"] = torch.cat(feats)
    return out


def clean(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
