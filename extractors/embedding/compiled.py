"""Ahead-of-time compiled backbones: the network (extra layers included) exported with
`torch.export` and built by AOTInductor into a package, weights frozen so BatchNorm folds
into the convolutions and element-wise ops fuse. It is built once per machine, model, batch
size and torch version (about 30 s for EfficientNet-Lite0 on 2 cores), kept in a cache folder
and loaded by later runs in milliseconds; short batches are padded to its batch size.

`decide` is the default policy of `embed`: compiled when a package is already there, or when
the job is large enough to repay building one; eager otherwise, and eager wherever building or
loading fails. Every failure here is a `CompileError` the caller turns into a warning.

What is trusted. A package is a shared library: loading it runs its code. So a package is
loaded only when headstart recorded building that exact file: beside each package
`<name>.pt2` lies `<name>.pt2.sha256`, written (atomically, after the package was built,
checked as a whole zip and renamed into place) with the package's SHA-256. A package without
a record, or whose bytes no longer match it, is ignored with a warning and built again. The
record lives in the same folder as the package, so it is only as trustworthy as the folder:
the cache folder (`HEADSTART_COMPILE_CACHE`, default ~/.cache/headstart/compiled) is created
0700, and is used only while it, the package and its record are owned by the current user
and the folder is writable by nobody else; then no one but this user (or root) can have put
a package or a record there. Otherwise the cache is ignored with a warning and the run is
eager.

Building cannot take the process down. AOTInductor's package writer aborts the whole process
(a C++ exception thrown from a destructor) when the disk fills mid-write, so the exported
program is handed to a child process, which builds the package under a temporary name; the
parent checks the free space first (the child's scratch space, Inductor's cache, is a
private folder in the cache too), and checks the child's result (exit code, zip integrity)
before renaming it into place and recording it. Two runs building the same package take turns
on `<name>.pt2.lock`: the second loads what the first built.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from extractors.common import HeadstartError, exclusive, write_json_atomic
from extractors.embedding.images import file_sha256

if TYPE_CHECKING:
    from extractors.embedding.backbones import Backbone

CACHE_ENV = "HEADSTART_COMPILE_CACHE"
# Where building a package pays on its own, on a 2-core CPU (bench/extract.py): ~30 s to
# build, ~1.5x the eager model after, so about 3,000 photos; once built it pays on any job.
AUTO_MIN_IMAGES = 3000
BUILD_TIMEOUT_S = 1800  # a build (or the wait for another run's build) longer than this: eager
RECORD_SUFFIX = ".sha256"

Compiled = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
log = logging.getLogger(__name__)


class CompileError(HeadstartError):
    """The compiled network cannot be built or loaded here; the run goes on eager."""


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


def record_path(package: Path) -> Path:
    """Where the SHA-256 of a package headstart built is recorded."""
    return package.with_name(package.name + RECORD_SUFFIX)


def private_cache(create: bool = True) -> Path:
    """The cache folder, created 0700; CompileError when it is not this user's alone (another
    owner, or writable by group or others): then nothing in it can be trusted."""
    folder = cache_dir()
    if create:
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CompileError(f"cannot create the compile cache {folder}: {exc}") from None
    try:
        st = folder.stat()
    except OSError as exc:
        raise CompileError(f"cannot use the compile cache {folder}: {exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CompileError(f"the compile cache {folder} is not a folder")
    if st.st_uid == os.getuid() and st.st_mode & 0o022:  # ours, made under umask 002 or 000
        mode = stat.S_IMODE(st.st_mode) & ~0o022
        try:
            folder.chmod(mode)
        except OSError as exc:
            raise CompileError(f"cannot make the compile cache {folder} private: {exc}") from None
        print(
            f"made the compile cache {folder} writable by its owner only (chmod {mode:o})",
            file=sys.stderr,
        )
        st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise CompileError(
            f"ignoring the compile cache {folder}: it is "
            + ("owned by another user" if st.st_uid != os.getuid() else "writable by others")
            + f"; make it yours alone (chmod 700 {folder}) or set {CACHE_ENV} to a private folder"
        )
    return folder


_verdicts: dict[tuple[object, ...], str | None] = {}  # _untrusted's, by both files' stat


def _untrusted(package: Path) -> str | None:
    """Why the package may not be loaded (None: headstart recorded building exactly it).
    Hashed once per process while neither the package nor its record changes."""
    record = record_path(package)
    try:
        stats = [f.lstat() for f in (package, record)]
        for f, st in zip((package, record), stats, strict=True):
            if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
                return f"{f.name} is not a file of this user"
        key = (str(package), *((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats))
        if key in _verdicts:
            return _verdicts[key]
        recorded = json.loads(record.read_text()).get("sha256")
        why = (
            None
            if recorded == file_sha256(package)
            else "its bytes differ from those headstart recorded building"
        )
    except FileNotFoundError:
        return "headstart has no record of building it"
    except (OSError, ValueError, AttributeError) as exc:
        return f"it or its record cannot be read ({exc})"
    _verdicts[key] = why
    return why


def is_built(bb: Backbone, batch_size: int) -> bool:
    """Whether a package of this backbone for `batch_size` that headstart built is here, in a
    private cache (an untrusted one is reported with a warning and counts as absent)."""
    path = package_path(bb, batch_size)
    if not path.exists():
        return False
    try:
        private_cache(create=False)
    except CompileError as exc:
        warnings.warn(str(exc), RuntimeWarning, stacklevel=2)
        return False
    why = _untrusted(path)
    if why:
        warnings.warn(
            f"ignoring the compiled package {path}: {why} (--compile builds it again)",
            RuntimeWarning,
            stacklevel=2,
        )
    return why is None


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
    if is_built(bb, batch_size):
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
    """The backbone's compiled forward: loaded from its package, built first if missing or
    not recorded as built by headstart. CompileError (or another exception) on any failure."""
    import torch._inductor

    # Loading a package imports torch's C++ extension helper, which warns on every CPU-only
    # machine that there is no CUDA runtime: true, and not news to anyone embedding on a CPU.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    private_cache()
    path = package_path(bb, batch_size)
    if _untrusted(path) is not None:
        busy = CompileError(f"another run has been building {path.name} for too long")
        with exclusive(path.with_name(path.name + ".lock"), busy, wait_s=BUILD_TIMEOUT_S):
            why = _untrusted(path)  # another run may have built it while this one waited
            if why is not None:
                if path.exists():
                    warnings.warn(
                        f"ignoring the compiled package {path}: {why}; building it again",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                build(bb, batch_size, path)
    runner = torch._inductor.aoti_load_package(str(path))

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = runner(x)
        return tuple(out) if isinstance(out, list | tuple) else (out,)

    return forward


# The child that builds a package: reads an exported program on stdin, writes the package.
_BUILD_CHILD = """
import io, sys
import torch, torch._inductor
program = torch.export.load(io.BytesIO(sys.stdin.buffer.read()))
torch._inductor.aoti_compile_and_package(
    program, package_path=sys.argv[1], inductor_configs={"freezing": True}
)
"""


def space_needed(bb: Backbone) -> int:
    """Bytes of free space building a package needs in the cache: the frozen weights three
    times (the compiled library, the package, its temporary copy) plus room for the code."""
    weights = sum(t.numel() * t.element_size() for t in bb.model.state_dict().values())
    return 3 * weights + (64 << 20)


def build(bb: Backbone, batch_size: int, path: Path) -> Path:
    """Export the backbone for `batch_size` batches and build its package at `path` in a
    child process, under a temporary name; checked (exit code, zip), renamed into place and
    recorded. Hold the package's lock around it (`load_or_build` does)."""
    from extractors.common import human_bytes

    folder = path.parent
    need, free = space_needed(bb), shutil.disk_usage(folder).free
    if free < need:
        raise CompileError(
            f"not enough free space in the compile cache {folder} to build a package "
            f"({human_bytes(free)} free, about {human_bytes(need)} needed)"
        )
    size = bb.preprocessing.get("input_size") or [3, 224, 224]
    example = torch.zeros(batch_size, *size, device=bb.device)
    example = example.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        program = torch.export.export(_Forward(bb).eval(), (example,))
    buf = io.BytesIO()
    with warnings.catch_warnings():  # "no complete tensor found": about weights off the CPU
        warnings.simplefilter("ignore", UserWarning)
        torch.export.save(program, buf)  # in memory: no disk to fill
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")  # AOTInductor wants .pt2
    # Inductor's own cache defaults to /tmp/torchinductor_<user>, a name anyone can create
    # first and fill with libraries the build would pick up: the child builds in a private one.
    work = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", suffix=".inductor", dir=folder))
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(work)}
    log.info("building the compiled package %s (once per machine)", path)
    try:
        try:
            child = subprocess.run(
                [sys.executable, "-c", _BUILD_CHILD, str(tmp)],
                input=buf.getvalue(),
                capture_output=True,
                timeout=BUILD_TIMEOUT_S,
                env=env,
            )
        except subprocess.TimeoutExpired:
            raise CompileError(f"building {path.name} took over {BUILD_TIMEOUT_S} s") from None
        if child.returncode != 0:
            lines = child.stderr.decode(errors="replace").strip().splitlines()
            last = next((ln for ln in lines if "Error" in ln), lines[-1] if lines else "")
            raise CompileError(
                f"building {path.name} failed (exit code {child.returncode}): {last[:200]}"
            )
        try:
            with zipfile.ZipFile(tmp) as zf:
                bad = zf.testzip()
        except (OSError, zipfile.BadZipFile) as exc:
            raise CompileError(f"the package built for {path.name} is unreadable: {exc}") from None
        if bad is not None:
            raise CompileError(f"the package built for {path.name} is damaged ({bad})")
        digest = file_sha256(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        record_path(path).unlink(missing_ok=True)  # no moment where a record vouches for
        os.replace(tmp, path)  # other bytes than the package's
        write_json_atomic(record_path(path), {"sha256": digest, "built_by_pid": os.getpid()})
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return path
