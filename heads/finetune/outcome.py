"""What a fine-tuning run produced: its `FineTuned` outcome, the record of a finished run
(`done.json`) and the reuse of that record by a run with the same key."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extractors.common import write_json_atomic
from extractors.embedding.objects import stamp
from heads.evaluate import HeadResult, scored_on_test
from heads.settings import FineTuneSettings

DONE = "done.json"


@dataclass
class FineTuned:
    """What a fine-tuning run produced."""

    result: HeadResult  # test metrics etc., comparable with the heads
    history: list[dict[str, float]]  # one row per epoch
    workdir: Path  # backbone.safetensors, head.safetensors, config.json
    key: str  # the `finetuned:<key>` backbone name's id
    resumed_from_epoch: int  # 0 when trained from scratch, -1 when the finished run was reused
    skipped: list[dict[str, str]]  # {path, split, reason}: files that no longer decode
    test_paths: list[str]  # the test images scored, in the order of result.test_proba
    test_ids: list[str] = field(default_factory=list)  # their content ids, where given


def head_result(
    cfg: FineTuneSettings,
    classes: list[str],
    proba: np.ndarray,
    y_test: np.ndarray,
    summary: dict[str, Any],
) -> HeadResult:
    """The run as a head's result (`finetune:<strategy>`), scored like the heads on test."""
    name = f"finetune:{cfg.strategy}"
    params = {"strategy": cfg.strategy, "image_size": summary["image_size"]}
    if cfg.strategy == "partial":
        params["blocks"] = cfg.blocks
    params["best_epoch"] = summary["best_epoch"]
    return HeadResult(
        name=name,
        estimator=None,
        params=params,
        sweep=[],
        val_score=summary["val_accuracy"],
        selection_metric="accuracy",
        fit_seconds=summary["fit_seconds"],
        extra=dict(summary),
        **scored_on_test(proba, np.asarray(classes), y_test, seed=cfg.seed),
    )


def record(
    summary: dict[str, Any],
    history: list[dict[str, float]],
    proba: np.ndarray,
    test_y: Any,
    test_paths: list[str],
    ids: dict[str, str],
    skipped: list[dict[str, str]],
) -> dict[str, Any]:
    """What `done.json` keeps of a finished run: enough to give its outcome back unchanged;
    the test images' content ids all or none."""
    saved = {
        "summary": summary,
        "history": history,
        "test_proba": proba.tolist(),
        "test_y": test_y.tolist(),
        "test_paths": test_paths,
        "test_ids": [ids[p] for p in test_paths if p in ids],
        "skipped": skipped,
    }
    if len(saved["test_ids"]) != len(test_paths):
        saved["test_ids"] = []  # some test image without an id: its paths name them
    return saved


def finished(
    workdir: Path, result: HeadResult, saved: dict[str, Any], resumed_from_epoch: int
) -> FineTuned:
    """Write the finished run's record (`saved`, see `record`) and give back its outcome."""
    write_json_atomic(workdir / DONE, saved)
    return FineTuned(
        result,
        saved["history"],
        workdir,
        workdir.name,
        resumed_from_epoch,
        saved["skipped"],
        saved["test_paths"],
        saved["test_ids"],
    )


def reuse(
    workdir: Path,
    classes: list[str],
    cfg: FineTuneSettings,
    test: tuple[list[str], np.ndarray],
    ids: dict[str, str],
) -> FineTuned:
    """A finished run with the same key: its saved outcome (test labels and the files it
    skipped included), no retraining. `test` = (paths, labels) of this call's test split:
    the labels of the files still there stand in for runs saved before `test_y` was."""
    cls_index = {c: i for i, c in enumerate(classes)}
    here = [(p, cls_index[str(c)]) for p, c in zip(*test, strict=True)]
    here = [(p, c) for p, c in here if _still_there(p)]
    y = np.asarray([c for _, c in here], dtype=np.int64)
    return _reuse(workdir / DONE, workdir, classes, cfg, y, [p for p, _ in here], ids)


def _still_there(path: str) -> bool:
    try:
        stamp(path)
    except OSError:
        return False
    return True


def _reuse(
    done: Path,
    workdir: Path,
    classes: list[str],
    cfg: FineTuneSettings,
    test_y: np.ndarray,
    test_paths: list[str],
    ids: dict[str, str],
) -> FineTuned:
    """A finished run with the same key: its saved outcome (test labels and the files it
    skipped included; `test_y` for runs saved before they were), no retraining. The same key
    can come from the same images at other paths (a copy of the folder): its test images are
    named by their content ids, and given back at this call's paths with those ids."""
    saved = json.loads(done.read_text())
    saved_ids = list(saved.get("test_ids") or [])
    paths = list(saved.get("test_paths", test_paths))
    if saved_ids and len(saved_ids) == len(paths):
        here: dict[str, list[str]] = {}
        for p in test_paths:  # content id -> this call's test paths, in order
            if p in ids:
                here.setdefault(ids[p], []).append(p)
        pairs = zip(saved_ids, paths, strict=True)
        paths = [here[i].pop(0) if here.get(i) else old for i, old in pairs]
    proba = np.asarray(saved["test_proba"], dtype=np.float64)
    test_y = np.asarray(saved.get("test_y", test_y), dtype=np.int64)
    result = head_result(cfg, classes, proba, np.asarray(classes)[test_y], saved["summary"])
    return FineTuned(
        result,
        saved["history"],
        workdir,
        workdir.name,
        -1,
        saved.get("skipped", []),
        paths,
        saved_ids,
    )
