"""bench/gpu.py's training parts: torch L-BFGS logistic regression (heads/torch_linear.py) on
the device against scikit-learn's on the CPU, and one epoch of `full` fine-tuning
(heads/finetune/) with its checkpoint resumed into a fresh network.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def objective(model: Any, X: np.ndarray, y_idx: np.ndarray, C: float) -> float:
    """scikit-learn's multinomial objective of a fitted model, in float64:
    C * sum_i cross-entropy(x_i W + b, y_i) + ||W||^2 / 2."""
    W = np.asarray(model.coef_, dtype=np.float64)
    z = X.astype(np.float64) @ W.T + np.asarray(model.intercept_, dtype=np.float64)
    zmax = z.max(axis=1, keepdims=True)
    lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    loss = lse - z[np.arange(len(y_idx)), y_idx]
    return float(C * loss.sum() + 0.5 * (W * W).sum())


def heads_part(
    n: int, dim: int, classes: int, device: str, cpu_sweep_s: float, deadline: float
) -> dict[str, Any]:
    """50,000 x 2,048 x 100 classes (bench/heads.py's data, split 60/20/20). The project's C
    sweep (heads/classical.py's grid, warm-started) on `device`; at C=1, torch's fit against
    scikit-learn's on the CPU: objective and test accuracy; then scikit-learn's own sweep,
    stopped after `cpu_sweep_s` seconds (what it covered is said)."""
    from sklearn.linear_model import LogisticRegression

    from bench.heads import make_data
    from heads.classical import HEADS
    from heads.torch_linear import TorchLogisticRegression

    X, y = make_data(n, dim, classes)
    a, b = int(0.6 * n), int(0.8 * n)
    Xtr, ytr, Xva, yva, Xte, yte = X[:a], y[:a], X[a:b], y[a:b], X[b:], y[b:]
    grid = [float(c) for c in HEADS["logreg"].grid["C"]]
    TorchLogisticRegression(device=device).fit(Xtr[:256], ytr[:256])  # CUDA/cuBLAS warm-up
    est = TorchLogisticRegression(max_iter=1000, warm_start=True, device=device)
    t0, accs = time.perf_counter(), []
    for C in grid:
        accs.append(float((est.set_params(C=C).fit(Xtr, ytr).predict(Xva) == yva).mean()))
    sweep_s = time.perf_counter() - t0
    C = 1.0
    t0 = time.perf_counter()
    ours = TorchLogisticRegression(C=C, max_iter=1000, device=device).fit(Xtr, ytr)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = LogisticRegression(C=C, max_iter=1000, tol=1e-4).fit(Xtr, ytr)
    ref_s = time.perf_counter() - t0
    y_idx = np.searchsorted(ref.classes_, ytr)
    o_ours, o_ref = objective(ours, Xtr, y_idx, C), objective(ref, Xtr, y_idx, C)
    acc_ours = float((ours.predict(Xte) == yte).mean())
    acc_ref = float((ref.predict(Xte) == yte).mean())
    cpu = _cpu_sweep(Xtr, ytr, grid, min(cpu_sweep_s, max(0.0, deadline - time.perf_counter())))
    return {
        "data": {"train": a, "val": b - a, "test": n - b, "dim": dim, "classes": classes},
        "device": device,
        "sweep": {"C": grid, "val_accuracy": accs, "seconds": sweep_s, "points": len(grid)},
        "best_C": grid[int(np.argmax(accs))],
        "at_C_1": {
            "objective_ours": o_ours,
            "objective_sklearn": o_ref,
            "objective_rel_diff": (o_ours - o_ref) / abs(o_ref),
            "test_accuracy_ours": acc_ours,
            "test_accuracy_sklearn": acc_ref,
            "seconds_ours": ours_s,
            "seconds_sklearn": ref_s,
            "iterations_ours": int(ours.n_iter_[0]),
            "iterations_sklearn": int(ref.n_iter_[0]),
        },
        "sklearn_sweep": cpu,
        "sweep_speedup": cpu["seconds"] / sweep_s if cpu["complete"] else None,
    }


def _cpu_sweep(X: np.ndarray, y: np.ndarray, grid: list[float], limit: float) -> dict[str, Any]:
    """scikit-learn's warm-started sweep over `grid` until `limit` seconds have passed."""
    from sklearn.linear_model import LogisticRegression

    est = LogisticRegression(max_iter=1000, tol=1e-4, warm_start=True)
    t0, done = time.perf_counter(), 0
    for C in grid:
        if time.perf_counter() - t0 > limit:
            break
        est.set_params(C=C).fit(X, y)
        done += 1
    return {
        "points_done": done,
        "seconds": time.perf_counter() - t0,
        "complete": done == len(grid),
    }


def finetune_part(
    bb_factory: Any,
    paths: list[str],
    labels: np.ndarray,
    image_size: int,
    batch: int,
    folder: Path,
) -> dict[str, Any]:
    """One epoch of `full` fine-tuning through the project's loaders and loop (the LP-FT
    probe first, bf16 autocast on CUDA, a checkpoint after the epoch); then a fresh network
    resumes from that checkpoint: it must start at epoch 1 with the same weights."""
    from extractors.embedding.backbones import crop_fraction
    from heads.finetune.data import loaders, readable_splits
    from heads.finetune.loop import CHECKPOINT, load_checkpoint, setup, train
    from heads.finetune.network import FineTuneNet, cpu_state
    from heads.settings import FineTuneSettings

    bb = bb_factory()
    dev = bb.device
    cfg = FineTuneSettings(strategy="full", epochs=1, batch_size=batch, image_size=image_size)
    classes = sorted({str(c) for c in labels})
    n = len(paths)
    cut = [0, int(0.8 * n), int(0.9 * n), n]
    data = {
        s: (paths[cut[i] : cut[i + 1]], labels[cut[i] : cut[i + 1]].astype(str))
        for i, s in enumerate(("train", "val", "test"))
    }
    min_side = int(image_size / crop_fraction(bb.preprocessing))
    splits, _ = readable_splits(data, {c: i for i, c in enumerate(classes)}, min_side, print)
    loads = loaders(splits, bb.preprocessing, image_size, min_side, cfg, dev)
    net = FineTuneNet(bb, len(classes)).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    workdir = folder / "finetune"
    t0 = time.perf_counter()
    run = train(net, bb, loads, cfg, workdir, image_size, False, lambda _m: None)
    total = time.perf_counter() - t0
    row = run.history[0]
    n_train, n_val = len(splits["train"][0]), len(splits["val"][0])
    bb2 = bb_factory()
    net2 = FineTuneNet(bb2, len(classes)).to(dev)
    run2 = setup(net2, bb2, dataclasses.replace(cfg, epochs=2), max(1, len(loads.train)))
    load_checkpoint(workdir / CHECKPOINT, run2)
    before, after = cpu_state(net), cpu_state(net2)
    same = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return {
        "backbone": bb.name,
        "device": str(dev),
        "image_size": image_size,
        "batch": batch,
        "train_images": n_train,
        "val_images": n_val,
        "epoch_seconds": row["epoch_seconds"],
        "train_images_per_s": n_train / row["epoch_seconds"],
        "probe_and_setup_seconds": total - row["epoch_seconds"],
        "train_loss": row["train_loss"],
        "val_accuracy": row["val_accuracy"],
        "peak_gpu_memory_gb": (
            torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        ),
        "resume": {
            "start_epoch": run2.start_epoch,
            "history_rows": len(run2.history),
            "same_weights": bool(same),
            "optimizer_state": len(run2.opt.state) > 0,
            "resumes": bool(same and run2.start_epoch == 1 and len(run2.opt.state) > 0),
        },
    }
