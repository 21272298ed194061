"""Plain, typed pipeline steps (no Prefect here): the flows and the CLI call these."""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from extractors import DEFAULT_BACKBONE
from extractors.backbones import check_name, create_backbone
from extractors.images import ImageError, load_rgb
from extractors.index import search
from extractors.sources import read_source
from extractors.store import Store, StoreError, default_store_dir
from flows import DEFAULT_WORKSPACE, tracking
from heads.classical import class_scores
from heads.persist import load_head
from heads.plots import embedding_map_png
from heads.train import TrainingDataError, load_splits, save_heads, train_heads


def resolve_store(
    store: str | Path | None,
    workspace: str | Path = DEFAULT_WORKSPACE,
    source: str | Path | None = None,
    backbone: str | None = None,
) -> Store:
    """An explicit --store; else the (source, backbone) default; else the latest store."""
    if store is not None:
        return Store(store)
    if source is not None:
        src_root = str(Path(source).expanduser().resolve())
        return Store(default_store_dir(workspace, src_root, backbone or DEFAULT_BACKBONE))
    stores = sorted(
        (p.parent for p in (Path(workspace) / "stores").glob("*/manifest.json")),
        key=lambda p: (p / "manifest.json").stat().st_mtime,
    )
    if not stores:
        raise StoreError(
            f"no store found under {Path(workspace) / 'stores'}; run `headstart embed SOURCE` "
            "(or `headstart demo`) first, or pass --store DIR"
        )
    return Store(stores[-1])


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


def check_trainable(store: Store) -> None:
    """Raise TrainingDataError when the store cannot support training heads."""
    load_splits(store)


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
) -> dict[str, Any]:
    """read -> embed -> write -> index for one source; returns the update report as a dict.

    `layers` adds pooled features of more stages as columns (stage indices such as -2, -1 or
    module names); by default an existing store keeps its own.
    """
    src = read_source(source, layout=layout)
    st = resolve_store(store, workspace, source=src.root, backbone=backbone)
    if backbone is None:
        backbone = st.manifest()["backbone"] if st.exists else DEFAULT_BACKBONE
    st.check_backbone(backbone)
    bb = create_backbone(backbone, weights=weights, device=device)
    if layers is None and st.exists:
        layers = [v["module"] for v in st.manifest().get("layers", {}).values()]
    bb.set_layers(layers or [])
    report = st.update(
        src,
        bb,
        seed=seed,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        fast_decode=fast_decode,
    )
    out = report.as_dict()
    out.update(
        source=src.root,
        source_kind=src.kind,
        source_name=src.name,
        backbone=bb.name,
        weights=bb.weights,
        dim=bb.dim,
        fingerprint=st.manifest()["fingerprint"],
    )
    return out


def train_and_track(
    store: str | Path,
    parent_run_id: str,
    workspace: str | Path = DEFAULT_WORKSPACE,
    heads: list[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the heads, save them in the store, and log one nested MLflow run per head."""
    st = Store(store)
    results, splits = train_heads(st, heads=heads, seed=seed)
    saved = save_heads(st, results, run_tag=parent_run_id, extra={"mlflow_run_id": parent_run_id})
    manifest = st.manifest()
    context = {
        "backbone": manifest["backbone"],
        "store": str(st.path),
        "fingerprint": manifest["fingerprint"],
    }
    table = []
    for r in results:
        run_id = tracking.log_head_run(parent_run_id, workspace, r, saved[r.name], context)
        table.append(
            {
                "head": r.name,
                "params": r.params,
                "val_accuracy": r.val_accuracy,
                **r.metrics,
                "run_id": run_id,
                "path": str(saved[r.name]),
            }
        )
    with tempfile.TemporaryDirectory() as tmp:
        X = np.concatenate([splits.X_train, splits.X_val, splits.X_test])
        y = np.concatenate([splits.y_train, splits.y_val, splits.y_test])
        emap = embedding_map_png(
            X,
            y,
            f"{manifest['source']['name']} ({manifest['backbone']})",
            Path(tmp) / "embedding_map.png",
            seed=seed,
        )
        tracking.log_to_run(
            parent_run_id,
            workspace,
            metrics={
                "n_train": len(splits.y_train),
                "n_val": len(splits.y_val),
                "n_test": len(splits.y_test),
                "n_classes": len(splits.classes),
                "best_val_accuracy": results[0].val_accuracy,
                "best_test_accuracy": results[0].metrics["accuracy"],
            },
            tags={"best_head": results[0].name},
            artifacts=[emap],
        )
    return {"store": str(st.path), "heads": table, "best": results[0].name}


def escalation_decision(
    summary: dict[str, Any], target: float | None, finetune: bool = False
) -> dict[str, Any]:
    """Escalate to fine-tuning when asked, or when the best head's val accuracy is below target."""
    best = next(h for h in summary["heads"] if h["head"] == summary["best"])
    score = best["val_accuracy"]
    if finetune:
        return {
            "escalate": True,
            "reason": "fine-tuning requested (--finetune)",
            "best_head": best["head"],
            "best_val_accuracy": score,
        }
    if target is not None and score < target:
        reason = f"best head {best['head']} val accuracy {score:.3f} < target {target:.3f}"
        return {
            "escalate": True,
            "reason": reason,
            "best_head": best["head"],
            "best_val_accuracy": score,
        }
    reason = (
        f"best head {best['head']} val accuracy {score:.3f} >= target {target:.3f}"
        if target is not None
        else "no target set"
    )
    return {
        "escalate": False,
        "reason": reason,
        "best_head": best["head"],
        "best_val_accuracy": score,
    }


def search_image(
    image: str | Path,
    store: str | Path | None = None,
    k: int = 5,
    workspace: str | Path = DEFAULT_WORKSPACE,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Nearest images in the store to `image`, embedded with the store's own backbone."""
    st = resolve_store(store, workspace)
    m = st.manifest()
    bb = create_backbone(m["backbone"], device=device)
    if bb.weights != m["weights"]:
        raise StoreError(f"store weights {m['weights']} differ from {bb.weights}")
    query = bb.embed(bb.transform(load_rgb(image))[None]).numpy()
    index = st.index(mmap=True)
    if index.ntotal == 0:
        return []
    scores, ids = search(index, query, k)
    meta = st.table(["id", "path", "label", "split"])
    rows = {i: r for i, r in zip(meta["id"].to_pylist(), meta.to_pylist(), strict=True)}
    return [
        {
            "id": int(i),
            "path": rows[int(i)]["path"],
            "label": rows[int(i)]["label"],
            "split": rows[int(i)]["split"],
            "score": round(float(s), 6),
        }
        for s, i in zip(scores[0], ids[0], strict=True)
        if i >= 0
    ]


def predict_images(
    images: list[str | Path],
    head: str | Path | None = None,
    store: str | Path | None = None,
    workspace: str | Path = DEFAULT_WORKSPACE,
    top: int = 3,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Label images with a saved head (default: the best head of the store's latest run)."""
    if head is None:
        st = resolve_store(store, workspace)
        latest = st.path / "heads" / "latest.json"
        if not latest.exists():
            raise StoreError(f"no trained heads in {st.path}; run `headstart train` first")
        head = st.path / json.loads(latest.read_text())["best_path"]
    estimator, meta = load_head(head)
    bb = create_backbone(meta["backbone"], device=device)
    if meta.get("weights") and bb.weights != meta["weights"]:
        raise StoreError(f"head {head} was trained on {meta['weights']}, not {bb.weights}")
    feature = meta.get("feature", "embedding")
    if feature != "embedding":
        bb.set_layers([meta["feature_module"]])
    out = []
    for img in images:
        try:
            emb, extra = bb.embed_all(bb.transform(load_rgb(img))[None])
            x = (emb if feature == "embedding" else extra[feature]).numpy()
        except ImageError as exc:
            out.append({"image": str(img), "error": str(exc)})
            continue
        scores = class_scores(estimator, x)[0]
        order = np.argsort(-scores)[:top]
        out.append(
            {
                "image": str(img),
                "label": str(estimator.classes_[order[0]]),
                "head": meta.get("head"),
                "top": [
                    {"label": str(estimator.classes_[j]), "score": round(float(scores[j]), 4)}
                    for j in order
                ],
            }
        )
    return out


def store_info(
    store: str | Path | None = None, workspace: str | Path = DEFAULT_WORKSPACE
) -> dict[str, Any]:
    """What a store holds: manifest, counts, failures, index consistency, heads."""
    st = resolve_store(store, workspace)
    info = {
        "store": str(st.path),
        **st.manifest(),
        # Checked as found on disk (search rebuilds an inconsistent index before using it).
        "index_consistent": st.index_if_consistent() is not None,
        "failures_table": st.failures().to_pylist(),
    }
    latest = st.path / "heads" / "latest.json"
    if latest.exists():
        info["heads"] = json.loads(latest.read_text())
    return info


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
        "seed": seed,
        "target": target,
    }


def embed_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Counts and per-stage throughput of the embedding step, as MLflow metrics."""
    keys = ("scanned", "embedded", "kept", "removed", "failed", "rows", "resumed")
    counts = {f"images_{k}": float(report[k]) for k in keys}
    return counts | {f"embed_{k}": float(v) for k, v in report.get("stats", {}).items()}


def run_name(prefix: str) -> str:
    return f"{prefix}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
