"""Engines: how an update's new files are embedded into staging parts. `LocalEngine` in this
process (decode threads feed the model, a thread writes the parts); `DaskEngine` shards the
files over a Dask cluster (`--engine dask`).

Each Dask shard is embedded on a worker (`embed_shard`), which reads the images (local paths
it sees, or objects in storage) and sends the shard's rows back as Arrow IPC bytes; the
client writes each as one staging part named after its content (`write_part`) as shards
finish, and the store's usual commit then merges the parts and builds the index in the
calling process. Workers never touch the store, so they need not see it. Dask re-runs the
shards of a worker that dies, and a part written twice is the same part, so every image
lands exactly once. Dask is imported only when a Dask engine runs.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from extractors.common import HeadstartError, atomic_path
from extractors.embedding import compiled
from extractors.embedding.backbones import Backbone
from extractors.embedding.embed import EmbedStats, embed_files
from extractors.settings import EmbedSettings, EngineSettings
from extractors.store.layout import CHECKPOINT_ROWS, schema
from extractors.store.plan import Pending
from extractors.store.staging import StagingWriter, batch_table

MAX_SHARD = 1024  # images per shard: the most work a dying worker can cost

# An engine embeds an update's pending files into staging parts (files in the staging folder,
# each renamed into place whole) and returns the (path, reason) failures.
Engine = Callable[[Path, Backbone, list[Pending], EmbedStats], list[tuple[str, str]]]


@dataclass
class LocalEngine:
    """Embed in this process: decode threads feed the model, a background thread writes parts
    of `checkpoint_rows` rows (so a killed run redoes at most that much)."""

    settings: EmbedSettings = field(default_factory=EmbedSettings)
    progress: bool = True
    checkpoint_rows: int = CHECKPOINT_ROWS

    def __call__(
        self, staging_dir: Path, backbone: Backbone, pending: list[Pending], stats: EmbedStats
    ) -> list[tuple[str, str]]:
        s = self.settings
        self.prepare(backbone, len(pending), stats)
        sch = schema(backbone.dim, backbone.layer_dims)
        failures: list[tuple[str, str]] = []
        paths = [p.path for p in pending]
        with StagingWriter(staging_dir, sch, self.checkpoint_rows, stats) as writer:
            for batch in embed_files(
                backbone,
                paths,
                s.batch_size,
                s.decode_threads,
                self.progress,
                stats=stats,
                fast_decode=s.fast_decode,
            ):
                failures.extend((paths[i], reason) for i, reason in batch.failures)
                if len(batch.indices):
                    writer.put(batch_table(batch, pending, sch))
        return failures

    def prepare(self, backbone: Backbone, n: int, stats: EmbedStats) -> None:
        """Compile the network when `n` images repay it (extractors/embedding/compiled.py);
        `stats.path` says how it runs and why."""
        s = self.settings
        use, why = compiled.decide(backbone, s.batch_size, n, s.compile)
        if use and not backbone.compiled:
            backbone.compile(s.batch_size)
        stats.path = why if backbone.compiled or not use else "eager (compiling failed)"


def shard_rows(
    backbone: Backbone,
    pending: list[Pending],
    batch_size: int = 32,
    num_workers: int | None = 0,
    fast_decode: bool = True,
    stats: EmbedStats | None = None,
) -> tuple[pa.Table | None, list[tuple[str, str]]]:
    """Embed one shard of an update: its rows (None when every file failed) and failures."""
    sch = schema(backbone.dim, backbone.layer_dims)
    paths = [p.path for p in pending]
    tables, failures = [], []
    for batch in embed_files(
        backbone, paths, batch_size, num_workers, False, stats=stats, fast_decode=fast_decode
    ):
        failures.extend((paths[i], reason) for i, reason in batch.failures)
        if len(batch.indices):
            tables.append(batch_table(batch, pending, sch))
    return (pa.concat_tables(tables) if tables else None), failures


def write_part(staging_dir: str | Path, rows: pa.Table) -> Path:
    """One shard's rows as a staging part named after their content hashes, renamed into
    place whole: a shard whose rows arrive twice (its worker died after sending them, and
    Dask ran it again) replaces the part with the same rows."""
    digest = "".join(sorted(rows["sha256"].to_pylist()))
    key = hashlib.sha256(digest.encode()).hexdigest()[:20]
    part = Path(staging_dir) / f"shard-{key}.parquet"
    with atomic_path(part) as tmp:
        pq.write_table(rows, tmp, compression="zstd")
    return part


@dataclass(frozen=True)
class BackboneSpec:
    """What a worker needs to build the same backbone as the caller."""

    name: str
    weights: str | None  # a file, or None for the backbone's own weights
    layers: tuple[str, ...]
    compile: bool = False


_BACKBONES: dict[tuple[BackboneSpec, str], Backbone] = {}


def _worker_backbone(spec: BackboneSpec, device: str) -> Backbone:
    """One backbone per worker process and spec, built on the first shard it runs."""
    from extractors.embedding.backbones import create_backbone

    key = (spec, device)
    if key not in _BACKBONES:
        bb = create_backbone(spec.name, weights=spec.weights, device=device)
        bb.set_layers(list(spec.layers))
        if spec.compile:
            bb.compile()
        _BACKBONES[key] = bb
    return _BACKBONES[key]


def _worker_device() -> str:
    """With several GPUs, worker N uses GPU N mod count (LocalCluster names workers 0..n-1)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else abs(hash(name))
    except (ImportError, ValueError):
        index = 0
    return f"cuda:{index % torch.cuda.device_count()}"


def embed_shard(
    spec: BackboneSpec,
    pending: list[Pending],
    batch_size: int,
    threads: int | None,
    fast_decode: bool = True,
) -> dict[str, Any]:
    """Runs on a worker: embed one shard; its rows (Arrow IPC bytes, zstd-compressed),
    failures and stage seconds go back to the client, which alone writes the store."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    stats = EmbedStats()
    rows, failures = shard_rows(
        _worker_backbone(spec, _worker_device()),
        pending,
        batch_size=batch_size,
        num_workers=threads or None,
        fast_decode=fast_decode,
        stats=stats,
    )
    return {
        "rows": None if rows is None else _ipc(rows),
        "failures": failures,
        "stats": stats.__dict__,
        "worker": os.getpid(),
    }


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.BufferReader(data)).read_all()


@dataclass
class DaskEngine:
    """Shard the files over a Dask cluster: a local one of `workers` processes, or the
    scheduler at `address`. Each local worker gets an equal share of the cores."""

    address: str | None = None
    workers: int = 2
    batch_size: int = 32
    progress: bool = True
    weights: str | None = None  # a file (given, or a fine-tuned backbone's); None: its own
    shard_size: int | None = None
    compile_model: bool = False
    fast_decode: bool = True

    def shards(self, pending: list[Pending], workers: int | None = None) -> list[list[Pending]]:
        """About four shards per worker (so a slow or dead one costs little), at most 1024."""
        per = 4 * (workers or self.workers)
        size = self.shard_size or min(
            MAX_SHARD, max(self.batch_size, math.ceil(len(pending) / per))
        )
        return [pending[i : i + size] for i in range(0, len(pending), size)]

    def __call__(
        self, staging_dir: Path, backbone: Backbone, pending: list[Pending], stats: EmbedStats
    ) -> list[tuple[str, str]]:
        from distributed import Client, LocalCluster, as_completed

        layers = tuple(backbone.layers.values())
        spec = BackboneSpec(backbone.name, self.weights, layers, self.compile_model)
        if self.address:
            cluster, threads = None, None
            client = Client(self.address)
        else:
            threads = max(1, (os.cpu_count() or 2) // self.workers)
            cluster = LocalCluster(
                n_workers=self.workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",  # a free port: never clash with another cluster
            )
            client = Client(cluster)
        # A joined cluster has as many workers as it has; shard for all of them.
        shards = self.shards(pending, len(client.scheduler_info()["workers"]))
        bar = _progress(len(pending)) if self.progress else None
        failures: list[tuple[str, str]] = []
        try:
            _check_weights(client, spec)
            futures = client.map(
                embed_shard,
                [spec] * len(shards),
                shards,
                [self.batch_size] * len(shards),
                [threads] * len(shards),
                [self.fast_decode] * len(shards),
                pure=False,
            )
            sizes = {f.key: len(s) for f, s in zip(futures, shards, strict=True)}
            # Results gathered by as_completed on the client's own loop (not fut.result() from
            # this thread: with another client in the process, that waited on an event bound
            # to a different loop after a worker died).
            for fut, result in as_completed(futures, with_results=True):
                if result["rows"] is not None:
                    started = time.perf_counter()
                    write_part(staging_dir, _from_ipc(result["rows"]))
                    stats.write_s += time.perf_counter() - started
                    stats.bytes_moved += len(result["rows"])
                fut.release()  # the shard's bytes leave the cluster's memory
                failures.extend(tuple(f) for f in result["failures"])
                for k in ("images", "decode_s", "model_s", "write_s"):
                    setattr(stats, k, getattr(stats, k) + result["stats"][k])
                if bar is not None:
                    bar.update(sizes[fut.key])
        finally:
            if bar is not None:
                bar.close()
            client.close()
            if cluster is not None:
                cluster.close()
        return failures


class EngineError(HeadstartError, RuntimeError):
    """A cluster that cannot run this update; the message says what to fix."""


def _check_weights(client: Any, spec: BackboneSpec) -> None:
    """Workers build the backbone themselves: a weights file or fine-tuned network (a path
    on this machine) must be at the same path on every worker, checked before any shard."""
    if spec.weights is None:
        return
    seen = client.run(os.path.exists, spec.weights)
    blind = sorted(w for w, ok in seen.items() if not ok)
    if blind:
        raise EngineError(
            f"{len(blind)} Dask worker(s) cannot read the weights {spec.weights} (a --weights "
            f"file or a fine-tuned network), e.g. {blind[0]}: copy it to the same path on "
            "every worker, or use --engine local"
        )


def make_engine(
    engine: EngineSettings,
    embedding: EmbedSettings,
    progress: bool = True,
    weights: str | None = None,
) -> Engine:
    """The engine `engine` asks for, embedding as `embedding` says. `weights` is the backbone's
    weights file (a Dask worker builds its own copy of the backbone from it)."""
    if engine.kind == "local":
        return LocalEngine(embedding, progress)
    return DaskEngine(
        address=engine.address,
        workers=engine.workers or default_workers(),
        batch_size=embedding.batch_size,
        progress=progress,
        weights=weights,
        compile_model=bool(embedding.compile),
        fast_decode=embedding.fast_decode,
    )


def default_workers() -> int:
    """One worker per GPU; 2 without one (each gets half the cores)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="embedding (dask)", unit="img", dynamic_ncols=True)
