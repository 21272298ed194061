"""Embedding stage: checks before a run, source -> store (embed and index), its report as
MLflow params and metrics, and its one-line summary."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from extractors import DEFAULT_BACKBONE, DEFAULT_WORKSPACE
from extractors.common import plural
from extractors.embedding.backbones import check_name
from extractors.embedding.engines import make_engine
from extractors.embedding.sources import Source, read_source
from extractors.settings import EmbedSettings, EngineSettings, IndexSettings
from extractors.store.store import Store, StoreError, UpdateReport
from extractors.workspace import backbone_for, resolve_store, weights_file


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
    embedding: EmbedSettings = EmbedSettings(),
    index: IndexSettings = IndexSettings(),
    engine: EngineSettings = EngineSettings(),
    store: str | Path | None = None,
    workspace: str | Path = DEFAULT_WORKSPACE,
    progress: bool = True,
) -> dict[str, Any]:
    """read -> embed -> write -> index for one source; returns the update report as a dict.

    `embedding` says which network and how (extractors/settings.py); `index` what to change
    of the store's index (unset fields keep the store's); `engine` where the new images are
    embedded (this process, or a Dask cluster: the commit and the index stay here). An
    unchanged source is recognised from a listing and `stat` calls alone: no model is built.
    The report's `model_path` says whether the network ran compiled and why.
    """
    src = read_source(source)
    if embedding.split_from is not None:
        src = splits_of(src, Store(embedding.split_from))
    st = resolve_store(store, workspace, source=src.root, backbone=embedding.backbone)
    backbone = embedding.backbone or (st.manifest()["backbone"] if st.exists else DEFAULT_BACKBONE)
    st.check_backbone(backbone)
    plain = embedding.weights is None and not index.given
    if plain and st.unchanged(src, backbone, embedding.layers):
        m = st.manifest()  # no model built, nothing written
        rows, dups = m["rows"], m.get("duplicates", 0)
        unchanged = UpdateReport(
            str(st.path), scanned=len(src.records), kept=rows, rows=rows, duplicates=dups
        )
        return _report(st, unchanged, src, engine.kind, compiled=False)
    bb = backbone_for(backbone, workspace, weights=embedding.weights, device=embedding.device)
    layers = embedding.layers
    if layers is None and st.exists:
        layers = [v["module"] for v in st.manifest().get("layers", {}).values()]
    bb.set_layers(layers or [])
    weights = weights_file(backbone, workspace, embedding.weights)
    runner = make_engine(engine, embedding, progress, weights)
    report = st.update(
        src, bb, seed=embedding.seed, index=index, engine=runner, grouping=embedding.grouping()
    )
    return _report(st, report, src, engine.kind, compiled=bb.compiled)  # False where it fell back


def splits_of(src: Source, other: Store) -> Source:
    """`src` with the split `other` gives each of its images (by path), where `src` gives none:
    the stores of several backbones of one run then hold one split."""
    import dataclasses

    if not other.exists:
        raise StoreError(f"--split-from {other.path}: no store there")
    rows = other.table(["path", "split"]).to_pydict()
    split = dict(zip(rows["path"], rows["split"], strict=True))
    records = tuple(
        r if r.split is not None else dataclasses.replace(r, split=split.get(r.path))
        for r in src.records
    )
    return dataclasses.replace(src, records=records)


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


def embed_summary(report: dict[str, Any]) -> str:
    """One line for a run's log: "nothing new" or what changed in the store."""
    if not (report["embedded"] or report["removed"]):
        how = " (cached)" if report.get("cached") else ""
        return f"nothing new{how}: {plural(report['rows'], 'image')} unchanged in {report['store']}"
    return (
        f"{plural(report['embedded'], 'image')} embedded, {report['removed']} removed, "
        f"{report['kept']} unchanged, {report['failed']} failed: "
        f"{plural(report['rows'], 'row')} in {report['store']}"
    )
