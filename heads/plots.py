"""Plots people would rather look at than read: confusion matrices, 2-D embedding maps,
sweeps, training curves, mistakes and index tuning curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from extractors.common import atomic_path

# Class and file names are data: `$x^2$` in a label is text, never matplotlib's math.
matplotlib.rcParams["text.parse_math"] = False


def confusion_matrix_png(
    cm: np.ndarray, classes: Sequence[str], title: str, path: str | Path
) -> Path:
    """Row-normalised confusion matrix with counts in the cells."""
    n = len(classes)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set(
        xticks=range(n),
        yticks=range(n),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    color = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", color=color, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def embedding_map_png(
    X: np.ndarray, labels: Sequence[str], title: str, path: str | Path, seed: int = 0
) -> Path:
    """PCA of the embeddings to 2-D, one colour per label."""
    from sklearn.decomposition import PCA

    pts = PCA(n_components=2, random_state=seed).fit_transform(X) if len(X) > 2 else X[:, :2]
    return label_scatter_png(pts, labels, title, path, ("PC 1", "PC 2"))


def label_scatter_png(
    pts: np.ndarray,
    labels: Sequence[str | None],
    title: str,
    path: str | Path,
    axes: tuple[str, str] | None = None,
) -> Path:
    """2-D points, one colour per label (unlabelled in grey), written atomically."""
    labels = np.asarray(labels, dtype=object)
    names = sorted({lab for lab in labels if lab is not None})
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab20")
    for i, lab in enumerate([*names, None]):
        m = labels == lab if lab is not None else np.array([x is None for x in labels], bool)
        if m.any():
            color = "lightgrey" if lab is None else cmap(i % 20)
            name = "unlabelled" if lab is None else str(lab)
            ax.scatter(pts[m, 0], pts[m, 1], s=10, color=color, label=name, alpha=0.8)
    ax.set_title(title)
    if axes:
        ax.set(xlabel=axes[0], ylabel=axes[1])
    else:
        ax.set(xticks=[], yticks=[])
    if len(names) <= 20:
        ax.legend(markerscale=2, fontsize=8, loc="best", frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def sweep_png(result, path: str | Path) -> Path:
    """Validation score along the head's first grid parameter, one line per other setting."""
    rows = result.sweep
    keys = [k for k in rows[0] if k not in ("val_score", "val_log_loss")]
    x_key = next((k for k in keys if k != "pre"), "pre")
    series: dict[str, list[tuple[Any, float]]] = {}
    for r in rows:
        label = ", ".join(f"{k}={r[k]}" for k in keys if k != x_key)
        series.setdefault(label, []).append((r[x_key], r["val_score"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    numeric = all(isinstance(v, int | float) for v, _ in next(iter(series.values())))
    for label, pts in series.items():
        xs = [v for v, _ in pts] if numeric else [str(v) for v, _ in pts]
        ax.plot(xs, [s for _, s in pts], marker="o", ms=3, label=label)
    if numeric and x_key == "C":
        ax.set_xscale("log")
    chosen = ", ".join(f"{k}={v}" for k, v in result.params.items() if k != "feature")
    ax.set(
        xlabel=x_key,
        ylabel=f"validation {result.selection_metric}",
        title=f"{result.name} sweep (chosen: {chosen})",
    )
    if len(series) <= 12:
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def curves_png(history: list[dict[str, float]], title: str, path: str | Path) -> Path:
    """Per-epoch loss and accuracy of a fine-tuning run, train and validation."""
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        a.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", ms=3, label=key)
    for key in ("train_accuracy", "val_accuracy"):
        b.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", ms=3, label=key)
    a.set(xlabel="epoch", ylabel="loss", title=title)
    b.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    a.legend(frameon=False)
    b.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def mistakes_png(
    rows: Sequence[dict[str, Any]], title: str, path: str | Path, n: int = 16, pairs: int = 6
) -> Path:
    """The images a model gets most wrong: its `n` highest-loss mistakes as thumbnails (true
    label -> prediction, probability), then its most confused (true, predicted) pairs.
    `rows` are test predictions: path, label, prediction, probability, loss. A file that no
    longer reads is a grey tile. Names are drawn as text, never markup or math."""
    from collections import Counter

    from extractors.embedding.images import ImageError, load_rgb

    wrong = sorted((r for r in rows if r["label"] != r["prediction"]), key=lambda r: -r["loss"])
    shown = wrong[:n]
    cols = 4
    grid = max(1, -(-len(shown) // cols))
    fig = plt.figure(figsize=(2.2 * cols, 2.4 * grid + 2.2))
    spec = fig.add_gridspec(grid + 1, cols, height_ratios=[2.4] * grid + [2.0])
    for i in range(grid * cols):
        ax = fig.add_subplot(spec[i // cols, i % cols])
        ax.axis("off")
        if i >= len(shown):
            continue
        r = shown[i]
        try:
            image = load_rgb(r["path"], min_side=96)
            image.thumbnail((160, 160))
            ax.imshow(np.asarray(image))
        except ImageError:
            ax.imshow(np.full((8, 8), 0.8), cmap="gray", vmin=0, vmax=1)
        ax.set_title(
            f"{r['label']} -> {r['prediction']} ({r['probability']:.2f})\n{Path(r['path']).name}",
            fontsize=7,
        )
    ax = fig.add_subplot(spec[grid, :])
    confused = Counter((r["label"], r["prediction"]) for r in wrong).most_common(pairs)
    if confused:
        names = [f"{a} -> {b}" for (a, b), _ in confused]
        ax.barh(range(len(confused)), [c for _, c in confused], color="tab:red")
        ax.set_yticks(range(len(confused)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("test images (true -> predicted)")
        ax.set_title("most confused pairs", fontsize=9)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no mistakes on the test split", ha="center", va="center")
    fig.suptitle(f"{title}: {len(wrong)} of {len(rows)} test images wrong", fontsize=10)
    fig.tight_layout()
    with atomic_path(Path(path).with_suffix(".png")) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path).with_suffix(".png")


def index_curve_png(entry: dict[str, Any], path: str | Path) -> Path:
    """An index's tuning sweep: recall against milliseconds per query, one line per re-rank
    factor, each point labelled with its search knob, the recall target dashed."""
    tuning = entry["tuning"]
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[dict]] = {}
    for row in tuning["curve"]:
        key = f"rerank x{row['rerank']}" if "rerank" in row else entry["type"]
        groups.setdefault(key, []).append(row)
    for key, rows in groups.items():
        ax.plot([r["ms_per_query"] for r in rows], [r["recall"] for r in rows], "o-", label=key)
        for r in rows:
            knob = {k: v for k, v in r.items() if k in ("nprobe", "efSearch")}
            if knob:
                ax.annotate(
                    ",".join(map(str, knob.values())),
                    (r["ms_per_query"], r["recall"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.axhline(tuning.get("target", 0.95), color="grey", ls="--", lw=1, label="recall target")
    ax.set_xlabel("ms per query (batched)")
    ax.set_ylabel(f"recall@{tuning.get('k', 10)} on held-out queries")
    size = entry.get("file_bytes", 0) / 2**20
    ax.set_title(f"{entry['type']}: {entry['ntotal']:,} vectors, {size:.1f} MB", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def history_png(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Scoring batches over time (`headstart monitor`): the out-of-distribution share and the
    embedding-drift witness AUC, alarms marked in red."""
    import datetime as dt

    rows = sorted(rows, key=lambda r: r["at"])
    at = [dt.datetime.fromisoformat(r["at"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(at, [r.get("ood.share", 0.0) for r in rows], "o-", label="share out of distribution")
    ax.plot(at, [r.get("embedding_drift.auc", 0.5) for r in rows], "s--", label="drift AUC")
    alarms = [i for i, r in enumerate(rows) if r["alarm"]]
    if alarms:
        ax.scatter(
            [at[i] for i in alarms],
            [1.0] * len(alarms),
            color="red",
            marker="v",
            label="alarm",
            zorder=3,
        )
    ax.set(ylim=(0, 1.05), ylabel="share / AUC", title="scoring batches")
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
