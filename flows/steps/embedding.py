"""Embedding stage: checks before a run, source -> store (embed and index), its report as
MLflow params and metrics, and its one-line summary."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from extractors import DEFAULT_BACKBONE
from extractors.backbones import check_name
from extractors.sources import Source, read_source
from extractors.store import LocalEngine, Store, StoreBusy, UpdateReport
from flows import DEFAULT_WORKSPACE
from flows.engine import make_engine
from flows.workspace import backbone_for, resolve_store, weights_file


def preflight(
    source: str | Path,
    store: str | Path | None,
    backbone: str | None,
    workspace: str | Path,
    need_labels: bool,
) -> None:
    """Cheap checks before any flow starts, so bad input gets a message instead of a traceback."""
    src = read_source(source)
    if backbone is not None:
        check_name(backbone)
    st = resolve_store(store, workspace, source=src.root, backbone=backbone)
    if backbone is not None:
        st.check_backbone(backbone)
    if not need_labels:
        return
    from heads.train import TrainingDataError

    counts = Counter(r.label for r in src.records if r.label is not None)
    if not counts:
        raise TrainingDataError(
            f"{source} has no labels, so there is nothing to train heads on. Put one sub-folder "
            "per class in it (or use a manifest with a label column), or use `headstart embed` "
            "to make it searchable."
        )
    if len(counts) < 2:
        raise TrainingDataError(
            f"{source} has a single class ({next(iter(counts))!r}); heads need at least two. "
            "Add a sub-folder of images per class."
        )
    small = {c: n for c, n in sorted(counts.items()) if n < 3}
    if small:
        raise TrainingDataError(
            f"classes too small for a train/val/test split: {small}. Each class needs at least "
            "3 images (one per split); add images or remove the class folder."
        )


def embed_source(
    source: str | Path,
    store: str | Path | None = None,
    backbone: str | None = None,
    weights: str | None = None,
    workspace: str | Path = DEFAULT_WORKSPACE,
    layout: str = "auto",
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    layers: list[str] | None = None,
    fast_decode: bool = True,
    index_settings: dict[str, Any] | None = None,
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    compile_model: bool | None = None,
) -> dict[str, Any]:
    """read -> embed -> write -> index for one source; returns the update report as a dict.

    `index_settings` (max_memory, recall, kind; None keeps the store's) steer the index.

    `engine="dask"` shards the new files over a local Dask cluster of `workers` processes,
    or the one at `address` (flows/engine.py); the commit and the index stay here.

    `compile_model` runs the network as an ahead-of-time compiled package (Backbone.compile):
    True or False decide; None (default) compiles when a package is already built or the job
    is large enough to repay building one (extractors.compiled.decide). The report's
    `model_path` says which ran and why.

    `layers` adds pooled features of more stages as columns (stage indices such as -2, -1 or
    module names); by default an existing store keeps its own.
    """
    src = read_source(source, layout=layout)
    st = resolve_store(store, workspace, source=src.root, backbone=backbone)
    if backbone is None:
        backbone = st.manifest()["backbone"] if st.exists else DEFAULT_BACKBONE
    st.check_backbone(backbone)
    if weights is None and index_settings is None and st.unchanged(src, backbone, layers):
        rows = st.manifest()["rows"]  # no model built, nothing written
        unchanged = UpdateReport(str(st.path), scanned=rows, kept=rows, rows=rows)
        return _report(st, unchanged, src, engine, compiled=False)
    bb = backbone_for(backbone, workspace, weights=weights, device=device)
    if layers is None and st.exists:
        layers = [v["module"] for v in st.manifest().get("layers", {}).values()]
    bb.set_layers(layers or [])
    runner = make_engine(
        engine,
        address,
        workers,
        batch_size,
        progress,
        weights_file(backbone, workspace, weights),
        compile_model=bool(compile_model),
    ) or LocalEngine(batch_size, num_workers, progress, fast_decode, compile_model=compile_model)
    report = st.update(
        src,
        bb,
        seed=seed,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        fast_decode=fast_decode,
        index_settings=index_settings,
        engine=runner,
    )
    return _report(st, report, src, engine, compiled=bb.compiled)  # False where it fell back


def _report(
    st: Store, report: UpdateReport, src: Source, engine: str, compiled: bool
) -> dict[str, Any]:
    """An update's report with what the store now holds (backbone, index, fingerprint)."""
    m = st.manifest()
    return report.as_dict() | {
        "index": m["index"],
        "source": src.root,
        "source_kind": src.kind,
        "engine": engine,
        "compiled": compiled,
        "source_name": src.name,
        "backbone": m["backbone"],
        "weights": m["weights"],
        "dim": m["dim"],
        "fingerprint": m["fingerprint"],
    }


def run_params(report: dict[str, Any], seed: int, target: float | None) -> dict[str, Any]:
    """Parent-run params: source, backbone, store, dataset fingerprint, protocol settings."""
    return {
        "source": report["source"],
        "source_kind": report["source_kind"],
        "backbone": report["backbone"],
        "weights": report["weights"],
        "dim": report["dim"],
        "store": report["store"],
        "fingerprint": report["fingerprint"],
        "engine": report.get("engine", "local"),
        "compiled": report.get("compiled", False),
        "seed": seed,
        "target": target,
    }


def embed_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Counts and per-stage throughput of the embedding step, as MLflow metrics."""
    keys = ("scanned", "embedded", "kept", "removed", "failed", "rows", "resumed")
    counts = {f"images_{k}": float(report[k]) for k in keys}
    return counts | {f"embed_{k}": float(v) for k, v in report.get("stats", {}).items()}


def from_cache(report: dict[str, Any]) -> dict[str, Any]:
    """A cached embed report as this run's: nothing embedded, removed or resumed."""
    return report | {
        "embedded": 0,
        "kept": report["rows"],
        "removed": 0,
        "resumed": 0,
        "stats": {},
        "cached": True,
    }


def embed_summary(report: dict[str, Any]) -> str:
    """One line for a run's log: "nothing new" or what changed in the store."""
    if not (report["embedded"] or report["removed"]):
        how = " (cached)" if report.get("cached") else ""
        return f"nothing new{how}: {report['rows']} images unchanged in {report['store']}"
    return (
        f"{report['embedded']} images embedded, {report['removed']} removed, "
        f"{report['kept']} unchanged, {report['failed']} failed: {report['rows']} rows in "
        f"{report['store']}"
    )


def is_transient(exc: BaseException | None) -> bool:
    """Failures worth retrying with backoff: a store another run is writing, a tracking or
    orchestration database that is locked or unreachable, a dropped connection."""
    if isinstance(exc, StoreBusy | ConnectionError | TimeoutError):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return type(exc).__name__ == "OperationalError" or any(
        s in text for s in ("database is locked", "Connection refused", "API request to")
    )


def embed_cache_key(
    source: str | Path,
    store: str | Path | None = None,
    backbone: str | None = None,
    weights: str | None = None,
    workspace: str | Path = DEFAULT_WORKSPACE,
    seed: int = 0,
    layers: list[str] | None = None,
    index_settings: dict[str, Any] | None = None,
    **_: Any,
) -> str | None:
    """Cache key of an embed step: the source's content (every file's path, label, split,
    size and mtime), the backbone and its weights, and what the store holds (fingerprint,
    rows, failures; not its timestamps, which every update rewrites). None
    (no caching) when the store does not exist yet or the source cannot be read."""
    try:
        src = read_source(source)
        st = resolve_store(store, workspace, source=src.root, backbone=backbone)
        if not st.exists:
            return None
        m = st.manifest()
        h = hashlib.sha256()
        stored = [m["fingerprint"], m["backbone"], m["weights"], m["rows"], m["failures"]]
        h.update(json.dumps([str(st.path), stored, backbone, weights, seed, layers]).encode())
        h.update(json.dumps(index_settings, sort_keys=True, default=str).encode())
        for r in sorted(src.records, key=lambda r: r.path):
            stat = os.stat(r.path)
            h.update(
                f"{r.path}\0{r.label}\0{r.split}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
            )
        return f"embed-{h.hexdigest()}"
    except (OSError, ValueError, KeyError):
        return None
