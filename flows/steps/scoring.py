"""Scoring stage: which model scores (a head, a fine-tuned network, a registered model), which
store lends its embeddings, and the predictions table written (heads/scoring/runner.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from extractors import DEFAULT_WORKSPACE
from extractors.embedding.engines import LocalEngine
from extractors.embedding.sources import read_sources
from extractors.settings import EmbedSettings
from extractors.store.layout import LATEST_HEADS, MANIFEST
from extractors.store.store import StoreError
from extractors.workspace import backbone_for, resolve_store
from heads.classifier import BoundClassifier, ImageClassifier
from heads.scoring.runner import ScoreReport, score_into_folder, score_source
from heads.scoring.table import hold_folder, output_format, read_parts


def resolve_model(
    model: str | None = None,
    head: str | Path | None = None,
    store: str | Path | None = None,
    workspace: str | Path = DEFAULT_WORKSPACE,
    device: str = "auto",
) -> tuple[BoundClassifier, Path | None]:
    """The model that scores, on its own backbone, and the store it was trained on (if any).

    `model`: `finetuned:<id>`, or `models:/<name>@<alias>` / `models:/<name>/<version>` (a
    registered image model, flows/tracking/image_model.py); `head`: a saved head file; neither: the
    best head of the store's latest training."""
    if model is not None and model.startswith("models:/"):
        from flows.tracking.image_model import load_registered

        return load_registered(model, workspace, device)
    if model is not None:
        if not model.startswith("finetuned:"):
            raise StoreError(
                f"--model takes finetuned:<id> or models:/<name>@<alias>, not {model!r}; "
                "use --head for a head file"
            )
        net = backbone_for(model, workspace, device=device)
        return ImageClassifier.of_finetuned(net).bind(net), None
    if head is None:
        st = resolve_store(store, workspace, need="heads")
        latest = st.path / LATEST_HEADS
        if not latest.exists():
            raise StoreError(f"no trained heads in {st.path}; run `headstart train` first")
        best = json.loads(latest.read_text())
        head = st.path / best["best_path"]
        registered = best.get("registered") or {}
        name = (
            f"{registered['name']}/{registered['version']}"
            if registered.get("name")
            else f"{best['best']} ({head})"
        )
        clf = ImageClassifier.from_head(head, name=name)
    else:
        clf = ImageClassifier.from_head(head)
    bb = backbone_for(clf.backbone, workspace, device=device)
    trained_on = json.loads(Path(head).with_suffix(".json").read_text()).get("store")
    return clf.bind(bb), Path(trained_on) if trained_on else None


def donor_store(
    bound: BoundClassifier,
    store: str | Path | None,
    trained_on: Path | None,
    workspace: str | Path = DEFAULT_WORKSPACE,
) -> Path | None:
    """A store whose rows the scoring can reuse: the one given, else the model's own, else
    any store of the workspace embedded with the same backbone and weights."""
    bb = bound.backbone
    candidates = [Path(store)] if store is not None else []
    candidates += [trained_on] if trained_on is not None else []
    candidates += sorted(p.parent for p in (Path(workspace) / "stores").glob(f"*/{MANIFEST}"))
    for c in candidates:
        try:
            m = json.loads((Path(c) / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if (m.get("backbone"), m.get("weights")) == (bb.name, bb.weights):
            return Path(c)
    return None


def predict_to_file(
    sources: list[str | Path],
    out: str | Path,
    model: str | None = None,
    head: str | Path | None = None,
    store: str | Path | None = None,
    workspace: str | Path = DEFAULT_WORKSPACE,
    embedding: EmbedSettings = EmbedSettings(),
    previous: pa.Table | None = None,
    progress: bool = True,
) -> ScoreReport:
    """Score a folder, a manifest or image files into `out` (Parquet or CSV): one row per
    image, resumable (heads/scoring/runner.py)."""
    output_format(out)  # a wrong extension fails before any model loads
    source = read_sources(list(sources))
    bound, trained_on = resolve_model(model, head, store, workspace, embedding.device)
    donor = donor_store(bound, store, trained_on, workspace)
    engine = LocalEngine(embedding, progress)
    return score_source(
        source, bound.backbone, bound, out, engine, donor, previous=previous, progress=progress
    )


def predict_images(
    images: list[str | Path],
    head: str | Path | None = None,
    store: str | Path | None = None,
    workspace: str | Path = DEFAULT_WORKSPACE,
    top: int = 3,
    device: str = "auto",
    model: str | None = None,
) -> list[dict[str, Any]]:
    """Label a few images (the terminal's `predict` without --out), with the top classes."""
    import numpy as np

    bound, _ = resolve_model(model, head, store, workspace, device)
    errors: dict[str, str] = {}
    probas = bound.predict_files(
        [str(i) for i in images], on_error=lambda p, e: errors.__setitem__(p, str(e))
    )
    out = []
    for img, scores in zip(images, probas, strict=True):
        if scores is None:
            out.append({"image": str(img), "error": errors[str(img)]})
            continue
        order = np.argsort(-scores)[:top]
        classes = bound.classes
        out.append(
            {
                "image": str(img),
                "label": classes[order[0]],
                "model": bound.name,
                "top": [{"label": classes[j], "score": round(float(scores[j]), 4)} for j in order],
            }
        )
    return out


def read_predictions(folder: str | Path) -> pa.Table | None:
    """Every part of a predictions folder (the `score` flow's), or None when there is none."""
    return read_parts(folder)


def score_new(
    source: str | Path,
    predictions: str | Path,
    model: str,
    store: str | Path | None = None,
    workspace: str | Path = DEFAULT_WORKSPACE,
    embedding: EmbedSettings = EmbedSettings(),
    progress: bool = False,
) -> dict[str, Any]:
    """Score the files of `source` that the predictions folder has not scored yet (new, or
    changed since) with `model`, appended as its next part; "nothing new" writes nothing.
    The folder's lock (heads/scoring/table.py: `hold_folder`) is taken before the model
    is loaded: a second run at once waits (up to FOLDER_WAIT_S, then fails with one line),
    then adds only what is still new."""
    folder = Path(predictions).expanduser().resolve()
    src = read_sources([source])
    with hold_folder(folder):  # before the model: a run waiting for another holds none
        bound, trained_on = resolve_model(model, None, store, workspace, embedding.device)
        donor = donor_store(bound, store, trained_on, workspace)
        engine = LocalEngine(embedding, progress)
        report, out, previous = score_into_folder(
            src, bound.backbone, bound, folder, engine, donor, progress=progress
        )
    return report.as_dict() | {
        "nothing_new": report.rows == 0,
        "part": str(out) if out is not None else None,
        "predictions": str(folder),
        "total_rows": report.rows + (0 if previous is None else previous.num_rows),
    }
