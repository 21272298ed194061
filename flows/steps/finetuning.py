"""Fine-tuning stage: a store's backbone fine-tuned on its labelled rows, tracked in MLflow."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from extractors import DEFAULT_WORKSPACE
from extractors.embedding import finetuned
from extractors.store.store import Store
from extractors.workspace import backbone_for
from flows.steps.training import _row
from flows.tracking import models
from flows.tracking.tracker import Tracker
from heads.settings import FineTuneSettings

if TYPE_CHECKING:
    import pyarrow as pa

    from heads.evaluate import HeadResult
    from heads.finetune.outcome import FineTuned


def finetune_and_track(
    store: str | Path,
    parent_run_id: str,
    workspace: str | Path = DEFAULT_WORKSPACE,
    settings: FineTuneSettings = FineTuneSettings(),
    best_head: dict[str, Any] | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune the store's backbone on its labelled rows (same splits as the heads), log a
    nested MLflow run, and return its table row plus the `finetuned:<id>` backbone name."""
    from heads.finetune.run import finetune, run_key

    st = Store(store)
    manifest = st.manifest()
    cfg = settings
    meta = st.table(["path", "sha256", "label", "split"])
    data, classes = _labelled_splits(meta)
    bb = backbone_for(manifest["backbone"], workspace, device=device)
    key = run_key(cfg, bb, manifest["fingerprint"], classes)
    workdir = finetuned.folder_of(key, workspace)
    # Images are named by content: the run's key is the data's (not its paths'), so a finished
    # run is reused for a copy of the folder, and its test rows must come back at these paths.
    sha_of = dict(zip(meta["path"].to_pylist(), meta["sha256"].to_pylist(), strict=True))
    out = finetune(bb, data, classes, cfg, workdir, progress=progress, ids=sha_of)
    result = out.result
    result.extra["backbone"] = f"finetuned:{key}"
    run_id = _log_run(
        st, manifest, parent_run_id, workspace, cfg, out, _test_rows(meta, out, sha_of)
    )
    image = _register(key, run_id, parent_run_id, workspace, cfg, out)
    row = _finetuned_row(out, run_id, key, image)
    if best_head is not None:
        row["vs_best_head"] = _compare_with(best_head, result, key, parent_run_id, workspace)
    return row


def _labelled_splits(
    meta: pa.Table,
) -> tuple[dict[str, tuple[list[str], np.ndarray]], list[str]]:
    """data[split] = (paths, labels) of the labelled rows, and the classes, sorted."""
    labels = np.asarray(meta["label"].to_pylist(), dtype=object)
    split = np.asarray(meta["split"].to_pylist(), dtype=object)
    paths = np.asarray(meta["path"].to_pylist(), dtype=object)
    labelled = np.array([lab is not None for lab in labels])
    data = {
        s: (list(paths[labelled & (split == s)]), labels[labelled & (split == s)].astype(str))
        for s in ("train", "val", "test")
    }
    return data, sorted({str(c) for c in labels[labelled]})


def _test_rows(meta: pa.Table, out: FineTuned, sha_of: dict[str, str]) -> dict[str, list[Any]]:
    """path, sha256 and label of the test images the run scored, in its order (a reused run's
    images found by content where they moved)."""
    labels = meta["label"].to_pylist()
    label_of = dict(zip(meta["path"].to_pylist(), labels, strict=True))
    label_of_sha = dict(zip(meta["sha256"].to_pylist(), labels, strict=True))
    shas = out.test_ids or [sha_of.get(p) for p in out.test_paths]
    pairs = zip(out.test_paths, shas, strict=True)
    return {
        "path": out.test_paths,
        "sha256": shas,
        "label": [label_of.get(p, label_of_sha.get(h)) for p, h in pairs],
    }


def _log_run(
    st: Store,
    manifest: dict[str, Any],
    parent_run_id: str,
    workspace: str | Path,
    cfg: FineTuneSettings,
    out: FineTuned,
    test_rows: dict[str, list[Any]],
) -> str:
    """The fine-tuning run's nested MLflow run (and the parent's dataset): its id."""
    result = out.result
    params = {
        "backbone": manifest["backbone"],  # the network it started from
        "manifest": manifest,
        "store": str(st.path),
        "fingerprint": manifest["fingerprint"],
        **{f"finetune.{k}": v for k, v in asdict(cfg).items()},
        "image_size": result.extra["image_size"],
        "device": result.extra["device"],
    }
    tracker = Tracker(workspace)
    tracker.log_dataset(parent_run_id, manifest, st.path)
    run_id = models.log_finetune_run(
        tracker, parent_run_id, result, out.history, params, out.workdir, test_rows, out.skipped
    )
    return run_id


def _register(
    key: str,
    run_id: str,
    parent_run_id: str,
    workspace: str | Path,
    cfg: FineTuneSettings,
    out: FineTuned,
) -> dict[str, Any]:
    """The fine-tuned network registered as an image model (the champion rule decides on it)."""
    from flows.steps.training import register_image_model
    from heads.classifier import ImageClassifier

    net = backbone_for(f"finetuned:{key}", workspace, device="cpu")
    experiment = Tracker(workspace).experiment_of(parent_run_id)
    image = register_image_model(
        ImageClassifier.of_finetuned(net), run_id, experiment, workspace, cfg.seed, out.workdir
    )
    return image


def _finetuned_row(out: FineTuned, run_id: str, key: str, image: dict[str, Any]) -> dict[str, Any]:
    """The run's line of the heads table, with what fine-tuning adds to a head's."""
    result = out.result
    row = _row(result, run_id, backbone=f"finetuned:{key}", path=str(out.workdir))
    row |= {
        "image_size": result.extra["image_size"],
        "epochs_run": len(out.history),
        "best_epoch": result.extra["best_epoch"],
        "seconds_per_epoch": float(np.mean([h["epoch_seconds"] for h in out.history])),
        "reused": out.resumed_from_epoch == -1,
        "resumed_from_epoch": max(0, out.resumed_from_epoch),
        "skipped_files": len(out.skipped),
        "image_model": image,
    }
    return row


def _compare_with(
    best_head: dict[str, Any],
    result: HeadResult,
    key: str,
    parent_run_id: str,
    workspace: str | Path,
) -> dict[str, Any]:
    """The test-accuracy gain over the best head, logged to the parent run too."""
    gain = result.metrics["accuracy"] - best_head["accuracy"]
    Tracker(workspace).log_to_run(
        parent_run_id,
        metrics={"finetune_test_accuracy": result.metrics["accuracy"], "finetune_gain": gain},
        tags={"finetuned_backbone": f"finetuned:{key}"},
    )
    return {"head": best_head["head"], "test_accuracy_gain": gain}
