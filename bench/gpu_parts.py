"""bench/gpu.py's parts, one function each, and the targets judged from their figures. Each
part takes the run (bench/gpu.py's `Run`: sizes, device, deadline, what parts share) and returns
its figures as a dict; bench/gpu.py records them, or the part's error, in the JSON."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from bench.gpu import Run

ROOT = Path(__file__).resolve().parents[1]
# The chosen batch, at most this: larger ones leave 3,000 files too few batches for the decode
# threads to work ahead of the model (and decoded full-size photos on the GPU take ~27 MB each).
EXTRACT_BATCH = 512
DECODE_BATCH = 256


# --- the parts -------------------------------------------------------------------------------


def part_images(run: Run) -> dict[str, Any]:
    from bench.gpu_extract import make_photos

    s = run.sizes
    paths, labels = make_photos(run.folder, s.images, s.long_side)
    run.shared["paths"], run.shared["labels"] = paths, labels
    size = sum(Path(p).stat().st_size for p in paths)
    return {"images": len(paths), "long_side": s.long_side, "mb": round(size / 2**20, 1)}


def part_batch(run: Run) -> dict[str, Any]:
    from bench.gpu_extract import build_backbone, largest_batch

    bb = run.shared["resnet50"] = build_backbone("resnet50", run.device, run.folder)
    s = run.sizes
    out = largest_batch(bb, s.batch_start, s.batch_cap, time.perf_counter() + 60)
    run.shared["batch"] = out["chosen"]
    return {"backbone": "resnet50 (random weights)", **out}


def part_extract(run: Run, name: str) -> dict[str, Any]:
    """The three paths for one backbone (see the module's docstring)."""
    from bench import gpu_extract as gx

    s, paths = run.sizes, run.shared["paths"]
    bb = run.shared.get(name) or gx.build_backbone(name, run.device, run.folder)
    run.shared[name] = bb
    batch = min(run.shared.get("batch", s.batch_default), EXTRACT_BATCH)
    limit = time.perf_counter() + max(10.0, s.naive_s)
    out: dict[str, Any] = {"backbone": bb.name, "weights": bb.weights, "batch": batch}
    out["bare"] = gx.bare(bb, s.bare_images, batch, limit)
    out["ours"] = gx.ours(bb, paths, batch, run.folder)
    run.shared[f"store_{name}"] = out["ours"]["store"]
    out["naive"] = gx.naive(bb, paths, min(batch, 64), time.perf_counter() + s.naive_s)
    out["ours_over_bare"] = out["ours"]["images_per_s"] / out["bare"]["images_per_s"]
    # the embedding stage alone (decode, model, Parquet parts), without the store's commit
    stage = out["ours"]["stages"].get("images_per_s", 0.0)
    out["ours_embed_stage_over_bare"] = stage / out["bare"]["images_per_s"]
    out["ours_over_naive"] = out["ours"]["images_per_s"] / out["naive"]["images_per_s"]
    out["cosine_to_cpu"] = gx.cosine_to_cpu(name, out["ours"]["store"], run.folder, s.cosine_images)
    return out


def part_decode(run: Run) -> dict[str, Any]:
    """CPU decode threads against nvJPEG, with EfficientNet-Lite0 (the cheaper model, where
    decoding is the wall); nvJPEG + model end to end against ours, and the features it gives
    against the store's rows of the same files."""
    import torch

    from bench import gpu_extract as gx
    from extractors.store.layout import embedding_matrix
    from extractors.store.store import Store

    name, paths = "efficientnet_lite0", run.shared["paths"]
    bb = run.shared.get(name) or gx.build_backbone(name, run.device, run.folder)
    batch = min(run.shared.get("batch", run.sizes.batch_default), DECODE_BATCH)
    limit = time.perf_counter() + 30
    cpu = gx.cpu_decode(bb, paths, batch, limit)
    gpu = gx.nvjpeg(bb, paths, batch, limit, embed=False)
    whole = gx.nvjpeg(bb, paths, batch, limit, embed=True)
    feats = whole.pop("embeddings")
    out: dict[str, Any] = {"cpu_threads": cpu, "nvjpeg": gpu, "nvjpeg_and_model": whole}
    store = run.shared.get(f"store_{name}")
    if store:
        table = Store(Path(store)).table(["path", "embedding"])
        row = {p: i for i, p in enumerate(table["path"].to_pylist())}
        pairs = [(j, row[p]) for j, p in enumerate(paths[: len(feats)]) if p in row]
        mine, rows = (list(t) for t in zip(*pairs, strict=True))
        stored = torch.from_numpy(np.array(embedding_matrix(table)[rows]))
        cos = torch.nn.functional.cosine_similarity(feats[mine], stored, dim=1)
        out["cosine_to_store"] = {"min": float(cos.min()), "mean": float(cos.mean())}
        ours = run.result["parts"].get(f"extract_{name}", {}).get("ours", {})
        if ours:
            out["ours_images_per_s"] = ours["images_per_s"]
    out["faster_decoder"] = "nvjpeg" if gpu["images_per_s"] > cpu["images_per_s"] else "cpu"
    out["engine"] = "LocalEngine decodes on CPU threads only: GPU decoding is not wired in yet"
    return out


def part_heads(run: Run) -> dict[str, Any]:
    from bench.gpu_train import heads_part

    n, dim, classes = run.sizes.heads
    limit = time.perf_counter() + 240
    return heads_part(n, dim, classes, run.device, run.sizes.sklearn_sweep_s, limit)


def part_finetune(run: Run) -> dict[str, Any]:
    from bench.gpu_extract import build_backbone
    from bench.gpu_train import finetune_part

    s = run.sizes
    k = min(s.finetune_images, len(run.shared["paths"]))
    paths, labels = run.shared["paths"][:k], run.shared["labels"][:k]
    run.shared.pop("resnet50", None)  # free the device for training

    def factory():
        return build_backbone("efficientnet_lite0", run.device, run.folder)

    return finetune_part(factory, paths, labels, s.finetune_size, s.finetune_batch, run.folder)


def part_gpu_tests(run: Run, smoke: bool) -> dict[str, Any]:
    """pytest -m gpu over the test files that hold such tests (--collect-only in --smoke)."""
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if "pytest.mark.gpu" in p.read_text()
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files]
    if smoke:
        cmd.append("--collect-only")
    paths = (os.environ.get("PYTHONPATH"), str(ROOT))  # the unpacked wheels, if any, first
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=run.sizes.tests_timeout_s
    )
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    last = lines[-1] if lines else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)}
    if m := re.search(r"(\d+)(?:/\d+)? tests? collected", last):
        counts["collected"] = int(m.group(1))
    return {
        "files": files,
        "collect_only": smoke,
        "returncode": proc.returncode,
        "summary": last,
        "counts": counts,
        "tail": lines[-15:] if proc.returncode else [],
    }


# --- targets and the command line ------------------------------------------------------------


def _get(result: dict[str, Any], *keys: str) -> Any:
    node: Any = result["parts"]
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def targets(result: dict[str, Any], smoke: bool) -> list[dict[str, Any]]:
    """Each target with its figure and met: null where the part did not give the figure, and
    for speed targets in --smoke (toy sizes on a CPU say nothing about a GPU's speed)."""
    acc = [_get(result, "heads", "at_C_1", f"test_accuracy_{w}") for w in ("ours", "sklearn")]
    rel = _get(result, "heads", "at_C_1", "objective_rel_diff")
    rc = _get(result, "gpu_tests", "returncode")
    rows = [
        (
            "resnet50: ours / bare",
            "speed",
            _get(result, "extract_resnet50", "ours_over_bare"),
            ">= 0.7",
            lambda v: v >= 0.7,
        ),
        (
            "resnet50: ours, images/s from JPEG files",
            "speed",
            _get(result, "extract_resnet50", "ours", "images_per_s"),
            ">= 5000",
            lambda v: v >= 5000,
        ),
        (
            "efficientnet_lite0: ours / bare",
            "speed",
            _get(result, "extract_efficientnet_lite0", "ours_over_bare"),
            ">= 0.7",
            lambda v: v >= 0.7,
        ),
        (
            "efficientnet_lite0: min cosine of the store's rows to the CPU's float32",
            "same",
            _get(result, "extract_efficientnet_lite0", "cosine_to_cpu", "min"),
            "> 0.999",
            lambda v: v > 0.999,
        ),
        (
            "heads: |objective difference| torch L-BFGS vs scikit-learn, relative, C=1",
            "same",
            None if rel is None else abs(rel),
            "<= 1e-3",
            lambda v: v <= 1e-3,
        ),
        (
            "heads: |test accuracy difference|, C=1",
            "same",
            None if None in acc else abs(acc[0] - acc[1]),
            "<= 0.005",
            lambda v: v <= 0.005,
        ),
        (
            "finetune: the checkpoint resumes",
            "same",
            _get(result, "finetune", "resume", "resumes"),
            "true",
            bool,
        ),
        (
            "gpu tests: pytest -m gpu passes" + (" (collected only)" if smoke else ""),
            "same",
            rc,
            "exit code 0",
            lambda v: v == 0,
        ),
    ]
    out = []
    for name, kind, value, want, ok in rows:
        judged = value is not None and not (smoke and kind == "speed")
        out.append(
            {
                "target": name,
                "kind": kind,
                "value": value,
                "want": want,
                "met": bool(ok(value)) if judged else None,
            }
        )
    return out
