"""Inference stage: nearest images, labels from a head or a fine-tuned network, and what a
store holds. Imports neither MLflow nor Prefect; scikit-learn and skops only to load a head."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from extractors import DEFAULT_WORKSPACE
from extractors.ann import search
from extractors.images import ImageError
from extractors.store import StoreError
from flows.workspace import backbone_for, resolve_store


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
    query = bb.embed(bb.prepare(image)).numpy()
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
            return bb.predict_proba(bb.prepare(img)).numpy()[0]

    else:
        from heads.classical import class_scores
        from heads.persist import load_head

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
            emb, extra = bb.embed_all(bb.prepare(img))
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
