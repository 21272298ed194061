"""Ranking stage: candidate networks scored on a labelled source before any training. Each
backbone embeds the source into its own store (the one `embed` and `run` use, updated
incrementally), and each feature column of that store (the penultimate `embedding` and any
`--layers` column) is one candidate, scored from its train rows by LogME and H-score
(heads/transferability.py), best LogME first; the ranking is logged to one MLflow run."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from extractors import DEFAULT_WORKSPACE
from extractors.common import HeadstartError
from extractors.embedding.sources import read_source
from extractors.settings import EmbedSettings
from extractors.store.store import Store
from flows.steps.embedding import embed_source, preflight
from heads.transferability import h_score, logme

RANKED_BY = "logme"


class RankingError(HeadstartError, ValueError):
    """A ranking that cannot be made as asked; the message says what to do."""


def rank_backbones(
    source: str | Path,
    backbones: list[str],
    embedding: EmbedSettings = EmbedSettings(),
    workspace: str | Path = DEFAULT_WORKSPACE,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed `source` with each backbone (its default store, `embedding`'s other settings,
    `--layers` included) and score every feature column on the same train images; returns
    the source, the train size and the candidates, best LogME first, each with its scores
    and seconds (`embed_s`: the backbone's embed step, shared by its columns; `score_s`: the
    estimates of this column)."""
    backbones = list(dict.fromkeys(backbones))  # once each, in the order given
    if not backbones:
        raise RankingError(
            "give the candidates with --backbone, e.g. --backbone efficientnet_lite0"
        )
    for b in backbones:  # every name and the labels checked before anything is embedded
        preflight(source, None, b, workspace, need_labels=True)
    stores, embed_s = {}, {}
    for b in backbones:  # one split, the first store's (as `run` with several --backbone)
        start = time.perf_counter()
        first = next(iter(stores.values()), None)
        settings = embedding.replace(backbone=b, split_from=first and str(first.path))
        report = embed_source(source, settings, workspace=workspace, progress=progress)
        stores[b], embed_s[b] = Store(report["store"]), time.perf_counter() - start
    paths = shared_train_paths(list(stores.values()))
    candidates = [
        {"backbone": b, "feature": feature, "store": str(st.path), "embed_s": embed_s[b]}
        | score(*train_rows(st, feature, paths))
        for b, st in stores.items()
        for feature in st.features()
    ]
    candidates.sort(key=lambda c: -c[RANKED_BY])
    src = read_source(source)
    return {
        "source": src.root,
        "source_name": src.name,
        "train_images": len(paths),
        "ranked_by": RANKED_BY,
        "candidates": candidates,
    }


def shared_train_paths(stores: list[Store]) -> set[str]:
    """The labelled images in the train split of every store: one split when the stores took
    the first's (`split_from`), fewer when a store was split before by its own network's
    near-duplicate groups; every candidate is scored on the same images."""
    shared: set[str] | None = None
    labels: dict[str, str] = {}
    for st in stores:
        meta = st.table(["path", "label", "split"]).to_pylist()
        train = {r["path"] for r in meta if r["split"] == "train" and r["label"] is not None}
        labels |= {r["path"]: r["label"] for r in meta if r["path"] in train}
        shared = train if shared is None else shared & train
    if len({labels[p] for p in shared or ()}) < 2:
        raise RankingError(
            "the candidates' stores share train images of fewer than two classes: add images "
            "per class, or rank fewer networks at a time"
        )
    return shared or set()


def train_rows(st: Store, feature: str, paths: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of the store's labelled rows of `paths`, in column `feature`, in
    path order."""
    x, meta = st.arrays(feature=feature)
    rows = [(p, i) for i, p in enumerate(meta["path"].to_pylist()) if p in paths]
    order = [i for _, i in sorted(rows)]
    return x[order], np.asarray(meta["label"].to_pylist(), dtype=object)[order].astype(str)


def score(x: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The transferability estimates of one candidate, and the seconds they took."""
    start = time.perf_counter()
    scores = {"logme": logme(x, labels), "h_score": h_score(x, labels)}
    return scores | {"dim": int(x.shape[1]), "score_s": time.perf_counter() - start}


def metric_key(candidate: dict[str, Any]) -> str:
    """A candidate's name in MLflow metric keys: `backbone/feature`, in the characters MLflow
    takes."""
    from flows.tracking.tracker import metric_key as safe  # MLflow: only where it logs

    return safe(f"{candidate['backbone']}/{candidate['feature']}")


def log_ranking(ranking: dict[str, Any], workspace: str | Path) -> str:
    """One MLflow run (experiment: the source's name, tag `headstart.kind=rank`) with each
    candidate's scores and seconds as metrics and the ranking as ranking.json; its id."""
    from flows.runs import run_name
    from flows.tracking.tracker import Tracker

    tracker = Tracker(workspace)
    params = {
        "source": ranking["source"],
        "candidates": ", ".join(metric_key(c) for c in ranking["candidates"]),
        "ranked_by": ranking["ranked_by"],
        "train_images": ranking["train_images"],
        "best": metric_key(ranking["candidates"][0]),
    }
    with tracker.parent_run(ranking["source_name"], run_name("rank"), params) as run_id:
        metrics = {
            f"{name}.{metric_key(c)}": c[name]
            for c in ranking["candidates"]
            for name in ("logme", "h_score", "embed_s", "score_s")
        }
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ranking.json"
            path.write_text(json.dumps(ranking, indent=2))
            tracker.log_to_run(
                run_id, metrics=metrics, tags={"headstart.kind": "rank"}, artifacts=[path]
            )
    return run_id
