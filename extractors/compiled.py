"""Ahead-of-time compiled backbones: the network (extra layers included) exported with
`torch.export` and built by AOTInductor into a package, weights frozen so BatchNorm folds
into the convolutions and element-wise ops fuse. It is built once per machine, model, batch
size and torch version (about 30 s for EfficientNet-Lite0 on 2 cores), kept in a cache folder
and loaded by later runs in milliseconds; short batches are padded to its batch size.

`decide` is the default policy of `embed`: compiled when a package is already there, or when
the job is large enough to repay building one; eager otherwise, and eager wherever building or
loading fails. Packages are shared libraries that only this module writes, into
`HEADSTART_COMPILE_CACHE` (default ~/.cache/headstart/compiled).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from extractors.backbones import Backbone

CACHE_ENV = "HEADSTART_COMPILE_CACHE"
# Where building a package pays on its own, on a 2-core CPU (bench/extract.py): ~30 s to
# build, ~1.5x the eager model after, so about 3,000 photos; once built it pays on any job.
AUTO_MIN_IMAGES = 3000

Compiled = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def cache_dir() -> Path:
    """The folder of compiled packages."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "headstart" / "compiled"


def compiler() -> str | None:
    """The C++ compiler AOTInductor builds with (None: compiling is impossible here)."""
    return shutil.which(os.environ.get("CXX") or "g++") or shutil.which("c++")


def package_path(bb: Backbone, batch_size: int) -> Path:
    """The package of this backbone (name, weights, extra layers, device, input size) for
    batches of `batch_size`, built with this torch on this kind of processor."""
    key = [
        bb.name,
        bb.weights,
        sorted(bb.layers.items()),
        bb.device.type,
        bb.preprocessing.get("input_size"),
        batch_size,
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
    ]
    digest = hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:16]
    return cache_dir() / f"{bb.name.replace(':', '-')}-b{batch_size}-{digest}.pt2"


def decide(bb: Backbone, batch_size: int, images: int, asked: bool | None) -> tuple[bool, str]:
    """Whether to embed `images` images with the compiled network, and why, in words.

    `asked`: True (--compile) or False (--no-compile) decide; None (the default) compiles
    when a package is there or `images` >= AUTO_MIN_IMAGES, never for less than a batch."""
    if asked is False:
        return False, "eager (--no-compile)"
    if asked:
        return True, "compiled (--compile)"
    if bb.device.type == "cpu" and compiler() is None:
        return False, "eager (no C++ compiler to compile with)"
    if images < batch_size:
        return False, "eager (less than one batch)"
    if package_path(bb, batch_size).is_file():
        return True, "compiled (package built by an earlier run)"
    if images >= AUTO_MIN_IMAGES:
        return True, f"compiled ({images} images repay building the package)"
    return False, (
        f"eager ({images} images do not repay building a compiled package, "
        f"{AUTO_MIN_IMAGES} would; --compile builds it now)"
    )


class _Forward(nn.Module):
    """The backbone's forward as one module returning (features, *extra layers)."""

    def __init__(self, bb: Backbone):
        super().__init__()
        self.model = bb.model
        self._bb = bb

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, extra = self._bb._forward(x)
        return (out, *(extra[col] for col in self._bb.layers))


def load_or_build(bb: Backbone, batch_size: int) -> Compiled:
    """The backbone's compiled forward: loaded from its package, built first if missing."""
    import torch._inductor

    # Loading a package imports torch's C++ extension helper, which warns on every CPU-only
    # machine that there is no CUDA runtime: true, and not news to anyone embedding on a CPU.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    path = package_path(bb, batch_size)
    if not path.is_file():
        build(bb, batch_size, path)
    runner = torch._inductor.aoti_load_package(str(path))

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = runner(x)
        return tuple(out) if isinstance(out, list | tuple) else (out,)

    return forward


def build(bb: Backbone, batch_size: int, path: Path) -> Path:
    """Export the backbone for `batch_size` batches and build its package at `path`,
    written under a temporary name and renamed into place."""
    import torch._inductor

    size = bb.preprocessing.get("input_size") or [3, 224, 224]
    example = torch.zeros(batch_size, *size, device=bb.device)
    example = example.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        program = torch.export.export(_Forward(bb).eval(), (example,))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")  # AOTInductor wants .pt2
    try:
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp), inductor_configs={"freezing": True}
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
