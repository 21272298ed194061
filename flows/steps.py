"""Plain, typed pipeline steps (no Prefect here): the flows and the CLI call these."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from extractors import DEFAULT_BACKBONE
from extractors.backbones import check_name, create_backbone
from extractors.images import ImageError, load_rgb
from extractors.index import search
from extractors.sources import read_source
from extractors.store import Store, StoreBusy, StoreError, default_store_dir
from flows import DEFAULT_WORKSPACE, tracking
from flows.engine import make_engine
from heads.classical import class_scores
from heads.evaluate import HeadResult
from heads.persist import load_head, write_json_atomic
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
    index_settings: dict[str, Any] | None = None,
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    compile_model: bool = False,
) -> dict[str, Any]:
    """read -> embed -> write -> index for one source; returns the update report as a dict.

    `index_settings` (max_memory, recall, kind; None keeps the store's) steer the index.

    `engine="dask"` shards the new files over a local Dask cluster of `workers` processes,
    or the one at `address` (flows/engine.py); the commit and the index stay here.

    `compile_model` runs the network through torch.compile (Backbone.compile): faster once
    compiled, worth it for thousands of images.

    `layers` adds pooled features of more stages as columns (stage indices such as -2, -1 or
    module names); by default an existing store keeps its own.
    """
    src = read_source(source, layout=layout)
    st = resolve_store(store, workspace, source=src.root, backbone=backbone)
    if backbone is None:
        backbone = st.manifest()["backbone"] if st.exists else DEFAULT_BACKBONE
    st.check_backbone(backbone)
    bb = backbone_for(backbone, workspace, weights=weights, device=device)
    if layers is None and st.exists:
        layers = [v["module"] for v in st.manifest().get("layers", {}).values()]
    bb.set_layers(layers or [])
    if compile_model:
        bb.compile()
    runner = make_engine(
        engine,
        address,
        workers,
        batch_size,
        progress,
        weights_file(backbone, workspace, weights),
        compile_model=compile_model,
    )
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
    out = report.as_dict()
    out.update(
        index=st.manifest()["index"],
        source=src.root,
        source_kind=src.kind,
        engine=engine,
        compiled=bb.compiled,  # False where compiling failed and it ran eagerly
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
    progress: bool = False,
) -> dict[str, Any]:
    """Fit the heads, save them in the store, log one nested MLflow run (and model) per head,
    and register the best head as a new version of `<experiment>-head`."""
    st = Store(store)
    trained = train_heads(st, heads=heads, seed=seed, progress=progress)
    results, splits = trained.results, trained.splits
    saved = save_heads(st, results, run_tag=parent_run_id, extra={"mlflow_run_id": parent_run_id})
    manifest = st.manifest()
    context = {
        "backbone": manifest["backbone"],
        "store": str(st.path),
        "fingerprint": manifest["fingerprint"],
    }
    table, model_uris = [], {}
    examples = {"embedding": splits.X_train[:5]}  # real rows for the models' signatures
    for r in results:
        feature = r.params.get("feature", "embedding")
        if feature not in examples:  # a --layers column: read once
            examples[feature] = st.arrays(where_labelled=True, feature=feature)[0][:5]
        run_id, model_uris[r.name] = tracking.log_head_run(
            parent_run_id, workspace, r, saved[r.name], context, examples[feature]
        )
        table.append(_row(r, run_id, path=str(saved[r.name])))
    experiment = tracking.experiment_of(parent_run_id, workspace)
    registered = tracking.register_best(model_uris[results[0].name], experiment, workspace)
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
            params={
                "imbalanced": trained.imbalanced,
                "selection_metric": results[0].selection_metric,
            },
            metrics={
                "n_train": len(splits.y_train),
                "n_val": len(splits.y_val),
                "n_test": len(splits.y_test),
                "n_classes": len(splits.classes),
                "best_val_score": results[0].val_score,
                "best_test_accuracy": results[0].metrics["accuracy"],
            },
            tags={
                "best_head": results[0].name,
                "skipped_heads": "; ".join(trained.skipped.values()) or "none",
                "registered_model": registered["uri"],
            },
            artifacts=[emap],
        )
    summary = {
        "store": str(st.path),
        "heads": table,
        "best": results[0].name,
        "skipped": trained.skipped,
        "imbalanced": trained.imbalanced,
        "registered": registered,
    }
    write_json_atomic(
        st.path / "heads" / LAST_TRAINING,
        {
            "run": parent_run_id,
            "fingerprint": manifest["fingerprint"],
            "heads": sorted(heads) if heads else None,
            "seed": seed,
            "summary": summary,
        },
    )
    return summary


LAST_TRAINING = "last_training.json"


def reusable_training(
    store: str | Path, heads: list[str] | None = None, seed: int = 0
) -> tuple[dict[str, Any] | None, str]:
    """The last training's summary when the store's data, the heads asked for and the seed
    are all unchanged (then retraining would reproduce it), and why it is or is not reused."""
    st = Store(store)
    path = st.path / "heads" / LAST_TRAINING
    if not path.exists():
        return None, "first training of this store"
    last = json.loads(path.read_text())
    now = st.manifest()["fingerprint"]
    if last["fingerprint"] != now:
        return None, f"data changed (fingerprint {last['fingerprint']} -> {now})"
    if last["heads"] != (sorted(heads) if heads else None) or last["seed"] != seed:
        return None, "other heads or seed than the last training"
    reason = f"data unchanged since run {last['run']} (fingerprint {now}): heads reused"
    return last["summary"] | {"reused_from": last["run"]}, reason


def _row(r: HeadResult, run_id: str, **extra: Any) -> dict[str, Any]:
    """One line of the heads table (CLI, JSON and Prefect artifact alike)."""
    return {
        "head": r.name,
        "params": {k: v for k, v in r.params.items() if k != "feature" or v != "embedding"},
        "val_score": r.val_score,
        "selection_metric": r.selection_metric,
        **r.metrics,
        "run_id": run_id,
        **extra,
    }


def escalation_decision(
    summary: dict[str, Any], target: float | None, finetune: bool = False
) -> dict[str, Any]:
    """Escalate to fine-tuning when asked, or when the best head's val score is below target."""
    best = next(h for h in summary["heads"] if h["head"] == summary["best"])
    score, metric = best["val_score"], best["selection_metric"].replace("_", " ")
    if finetune:
        escalate, reason = True, "fine-tuning requested (--finetune)"
    elif target is not None and score < target:
        escalate = True
        reason = f"best head {best['head']} val {metric} {score:.3f} < target {target:.3f}"
    elif target is not None:
        escalate = False
        reason = f"best head {best['head']} val {metric} {score:.3f} >= target {target:.3f}"
    else:
        escalate, reason = False, "no target set"
    return {
        "escalate": escalate,
        "reason": reason,
        "best_head": best["head"],
        "best_val_score": score,
    }


def finetune_and_track(
    store: str | Path,
    parent_run_id: str,
    workspace: str | Path = DEFAULT_WORKSPACE,
    settings: dict[str, Any] | None = None,
    best_head: dict[str, Any] | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune the store's backbone on its labelled rows (same splits as the heads), log a
    nested MLflow run, and return its table row plus the `finetuned:<id>` backbone name."""
    from heads.finetune import FineTuneConfig, finetune, run_key

    st = Store(store)
    manifest = st.manifest()
    cfg = FineTuneConfig(**(settings or {}))
    meta = st.table(["path", "label", "split"])
    labels = np.asarray(meta["label"].to_pylist(), dtype=object)
    split = np.asarray(meta["split"].to_pylist(), dtype=object)
    paths = np.asarray(meta["path"].to_pylist(), dtype=object)
    labelled = np.array([lab is not None for lab in labels])
    data = {
        s: (list(paths[labelled & (split == s)]), labels[labelled & (split == s)].astype(str))
        for s in ("train", "val", "test")
    }
    classes = sorted({str(c) for c in labels[labelled]})
    bb = backbone_for(manifest["backbone"], workspace, device=device)
    key = run_key(cfg, bb, manifest["fingerprint"], classes)
    workdir = Path(workspace) / "finetuned" / key
    out = finetune(bb, data, classes, cfg, workdir, progress=progress)
    result = out.result
    result.extra["backbone"] = f"finetuned:{key}"
    params = {
        "base_backbone": manifest["backbone"],
        "store": str(st.path),
        "fingerprint": manifest["fingerprint"],
        **{f"finetune.{k}": v for k, v in asdict(cfg).items()},
        "image_size": result.extra["image_size"],
        "device": result.extra["device"],
    }
    run_id = tracking.log_finetune_run(
        parent_run_id, workspace, result, out.history, params, out.workdir
    )
    row = _row(result, run_id, backbone=f"finetuned:{key}", path=str(out.workdir))
    row |= {
        "image_size": result.extra["image_size"],
        "epochs_run": len(out.history),
        "best_epoch": result.extra["best_epoch"],
        "seconds_per_epoch": float(np.mean([h["epoch_seconds"] for h in out.history])),
        "reused": out.resumed_from_epoch == -1,
        "resumed_from_epoch": max(0, out.resumed_from_epoch),
    }
    if best_head is not None:
        gain = result.metrics["accuracy"] - best_head["accuracy"]
        row["vs_best_head"] = {"head": best_head["head"], "test_accuracy_gain": gain}
        tracking.log_to_run(
            parent_run_id,
            workspace,
            metrics={"finetune_test_accuracy": result.metrics["accuracy"], "finetune_gain": gain},
            tags={"finetuned_backbone": f"finetuned:{key}"},
        )
    return row


def backbone_for(
    name: str,
    workspace: str | Path = DEFAULT_WORKSPACE,
    weights: str | Path | None = None,
    device: str = "auto",
):
    """create_backbone, with `finetuned:<id>` found in the workspace's finetuned/ folder."""
    return create_backbone(name, weights=weights_file(name, workspace, weights), device=device)


def weights_file(
    name: str, workspace: str | Path = DEFAULT_WORKSPACE, weights: str | Path | None = None
) -> str | None:
    """The weights file a backbone loads: `weights`, or a fine-tuned one's in the workspace."""
    if name.startswith("finetuned:") and weights is None:
        weights = Path(workspace) / "finetuned" / name.partition(":")[2]
    return None if weights is None else str(weights)


def compare(
    workspace: str | Path = DEFAULT_WORKSPACE,
    experiment: str | None = None,
    last: int | None = None,
) -> list[dict[str, Any]]:
    """Heads and fine-tuned networks side by side, as logged in MLflow."""
    return tracking.compare_runs(workspace, experiment=experiment, last=last)


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
    bb = backbone_for(m["backbone"], workspace, device=device)
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
    model: str | None = None,
) -> list[dict[str, Any]]:
    """Label images with a saved head (default: the best head of the store's latest run), or
    with a fine-tuned network's own classifier (`model="finetuned:<id>"`)."""
    if model is not None:
        if not model.startswith("finetuned:"):
            raise StoreError(f"--model takes finetuned:<id>, not {model!r}; use --head for heads")
        bb = backbone_for(model, workspace, device=device)
        classes, who = bb.classes, model

        def scores_of(img: str | Path) -> np.ndarray:
            return bb.predict_proba(bb.transform(load_rgb(img))[None]).numpy()[0]

    else:
        if head is None:
            st = resolve_store(store, workspace)
            latest = st.path / "heads" / "latest.json"
            if not latest.exists():
                raise StoreError(f"no trained heads in {st.path}; run `headstart train` first")
            head = st.path / json.loads(latest.read_text())["best_path"]
        estimator, meta = load_head(head)
        bb = backbone_for(meta["backbone"], workspace, device=device)
        if meta.get("weights") and bb.weights != meta["weights"]:
            raise StoreError(f"head {head} was trained on {meta['weights']}, not {bb.weights}")
        feature = meta.get("feature", "embedding")
        if feature != "embedding":
            bb.set_layers([meta["feature_module"]])
        classes, who = [str(c) for c in estimator.classes_], meta.get("head")

        def scores_of(img: str | Path) -> np.ndarray:
            emb, extra = bb.embed_all(bb.transform(load_rgb(img))[None])
            x = (emb if feature == "embedding" else extra[feature]).numpy()
            return class_scores(estimator, x)[0]

    out = []
    for img in images:
        try:
            scores = scores_of(img)
        except ImageError as exc:
            out.append({"image": str(img), "error": str(exc)})
            continue
        order = np.argsort(-scores)[:top]
        out.append(
            {
                "image": str(img),
                "label": classes[order[0]],
                "model": who,
                "top": [{"label": classes[j], "score": round(float(scores[j]), 4)} for j in order],
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


def heads_table(summary: dict[str, Any], finetuned: dict[str, Any] | None = None) -> list[dict]:
    """The heads of a run as flat rows (best first) for a Prefect table artifact."""
    rows = [*summary["heads"], *([finetuned] if finetuned else [])]
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss")
    return [
        {
            "head": r["head"],
            "chosen": ", ".join(f"{k}={v}" for k, v in r.get("params", {}).items()),
            "val": round(r["val_score"], 4),
            **{k: round(r[k], 4) for k in keys if r.get(k) is not None},
            "mlflow_run": r["run_id"],
        }
        for r in rows
    ]


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


def run_name(prefix: str) -> str:
    return f"{prefix}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
