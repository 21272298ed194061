"""Scoring stage: which model scores (a head, a fine-tuned network, a registered model), which
store lends its embeddings, and the predictions table written (heads/scoring/runner.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from extractors import DEFAULT_WORKSPACE
from extractors.embedding.engines import LocalEngine
from extractors.embedding.sources import read_sources, source_name
from extractors.settings import EmbedSettings, MonitorSettings
from extractors.store.layout import LATEST_HEADS, MANIFEST
from extractors.store.store import Store, StoreError
from extractors.workspace import backbone_for, defaults, resolve_store
from flows.steps.monitoring import batch_figures, watch
from heads.classifier import BoundClassifier, ImageClassifier
from heads.scoring.runner import ScoreReport, score_into_folder, score_source
from heads.scoring.table import hold_folder, output_format, read_parts


def default_model(
    store: str | Path | None = None, workspace: str | Path = DEFAULT_WORKSPACE
) -> str | None:
    """What a bare `predict` and `score` use: the champion of the image model registered by
    the last training of `store` (default: the latest store with heads, said in one line);
    None when that training registered none."""
    return _champion_of(resolve_store(store, workspace, need="heads"))


def _champion_of(st: Store) -> str | None:
    latest = st.path / LATEST_HEADS
    if not latest.exists():
        raise StoreError(f"no trained heads in {st.path}; run `headstart train` first")
    name = (json.loads(latest.read_text()).get("registered") or {}).get("name")
    return f"models:/{name}@champion" if name else None


def scoring_model(
    source: str,
    model: str | None,
    experiment: str | None,
    store: str | Path | None,
    workspace: str | Path = DEFAULT_WORKSPACE,
) -> tuple[str, str]:
    """(model, experiment) of a `score` run: the champion of `<experiment>-image`; with
    neither given, the champion of the source's own experiment (its name) when one is
    registered, else `default_model` (what a bare `predict` uses) and its experiment, said in
    one line; the experiment of a model given alone is the source's name."""
    if model is None and experiment is None:
        from flows.tracking.image_model import RegistryError, image_name, resolve

        try:
            resolve(f"models:/{image_name(source_name(source))}@champion", workspace)
            experiment = source_name(source)
        except RegistryError:
            model = default_model(store, workspace)
            if model is not None:
                stem = source_name(source)
                defaults.info(f"model: {model} (no champion of {stem!r}; --experiment picks)")
    name = experiment or _experiment_of(model) or source_name(source)
    return model or f"models:/{name}-image@champion", name


def _experiment_of(model: str | None) -> str | None:
    """`digits` of `models:/digits-image@champion` or `models:/digits-image/3`; else None."""
    if not model or not model.startswith("models:/"):
        return None
    spec = model.removeprefix("models:/")
    name = spec.partition("@")[0] if "@" in spec else spec.rpartition("/")[0]
    return name.removesuffix("-image") if name.endswith("-image") else None


def resolve_model(
    model: str | None = None,
    head: str | Path | None = None,
    store: str | Path | None = None,
    workspace: str | Path = DEFAULT_WORKSPACE,
    device: str = "auto",
) -> tuple[BoundClassifier, Path | None]:
    """The model that scores, on its own backbone, and the store it was trained on (if any).

    `model`: `finetuned:<id>`, or `models:/<name>@<alias>` / `models:/<name>/<version>` (a
    registered image model, flows/tracking/image_model.py); `head`: a saved head file; neither:
    `default_model`, the champion `score` uses too (the best head of the store's latest
    training when it registered no image model)."""
    if model is None and head is None:
        st = resolve_store(store, workspace, need="heads")
        model = _champion_of(st)
        if model is None:
            return _best_head(st, workspace, device)
        bound, trained_on = _registered(model, workspace, device)
        defaults.info(
            f"model: {model}, version {bound.name.rpartition('/')[2]} "
            "(the champion; --model or --head picks another)"
        )
        return bound, trained_on
    if model is not None and model.startswith("models:/"):
        return _registered(model, workspace, device)
    if model is not None:
        if not model.startswith("finetuned:"):
            raise StoreError(
                f"--model takes finetuned:<id> or models:/<name>@<alias>, not {model!r}; "
                "use --head for a head file"
            )
        net = backbone_for(model, workspace, device=device)
        return ImageClassifier.of_finetuned(net).bind(net), None
    return _bind_head(ImageClassifier.from_head(head), Path(head), workspace, device)


def _registered(
    model: str, workspace: str | Path, device: str
) -> tuple[BoundClassifier, Path | None]:
    from flows.tracking.image_model import load_registered

    return load_registered(model, workspace, device)


def _best_head(
    st: Store, workspace: str | Path, device: str
) -> tuple[BoundClassifier, Path | None]:
    """The best head of the store's latest training, named by its file."""
    best = json.loads((st.path / LATEST_HEADS).read_text())
    head = st.path / best["best_path"]
    defaults.info(f"model: the best head of the latest training, {best['best']} ({head})")
    clf = ImageClassifier.from_head(head, name=f"{best['best']} ({head})")
    return _bind_head(clf, head, workspace, device)


def _bind_head(
    clf: ImageClassifier, head: Path, workspace: str | Path, device: str
) -> tuple[BoundClassifier, Path | None]:
    bb = backbone_for(clf.backbone, workspace, device=device)
    trained_on = json.loads(head.with_suffix(".json").read_text()).get("store")
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
    monitor: MonitorSettings = MonitorSettings(),
) -> ScoreReport:
    """Score a folder, a manifest or image files into `out` (Parquet or CSV): one row per
    image with its out-of-distribution score, resumable (heads/scoring/runner.py)."""
    output_format(out)  # a wrong extension fails before any model loads
    source = read_sources(list(sources))
    bound, trained_on = resolve_model(model, head, store, workspace, embedding.device)
    donor = donor_store(bound, store, trained_on, workspace)
    engine = LocalEngine(embedding, progress)
    scorer = watch(bound, trained_on, monitor) or bound
    return score_source(
        source, bound.backbone, scorer, out, engine, donor, previous=previous, progress=progress
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
    monitor: MonitorSettings = MonitorSettings(),
) -> dict[str, Any]:
    """Score the files of `source` that the predictions folder has not scored yet (new, or
    changed since) with `model`, appended as its next part, with each image's
    out-of-distribution score and the batch's drift figures (`monitor`, None when the
    training store cannot serve as the reference); "nothing new" writes nothing.
    The folder's lock (heads/scoring/table.py: `hold_folder`) is taken before the model
    is loaded: a second run at once waits (up to FOLDER_WAIT_S, then fails with one line),
    then adds only what is still new."""
    folder = Path(predictions).expanduser().resolve()
    src = read_sources([source])
    with hold_folder(folder):  # before the model: a run waiting for another holds none
        bound, trained_on = resolve_model(model, None, store, workspace, embedding.device)
        donor = donor_store(bound, store, trained_on, workspace)
        engine = LocalEngine(embedding, progress)
        watched = watch(bound, trained_on, monitor)
        report, out, previous = score_into_folder(
            src, bound.backbone, watched or bound, folder, engine, donor, progress=progress
        )
    figures = None
    if watched is not None and out is not None and trained_on is not None:
        figures = batch_figures(watched, trained_on, monitor)
    return report.as_dict() | {
        "monitor": figures,
        "nothing_new": report.rows == 0,
        "part": str(out) if out is not None else None,
        "predictions": str(folder),
        "total_rows": report.rows + (0 if previous is None else previous.num_rows),
    }
