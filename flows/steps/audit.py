"""Audit stage: a store's suspect rows (wrong labels, outliers, near-duplicates) as one table,
by the protocol of heads/audit.py, with the head kind and settings of its latest training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from extractors.common import atomic_path, plural
from extractors.store.dedup import near_duplicate_groups
from extractors.store.layout import LATEST_HEADS
from extractors.store.store import Store
from heads.audit import OUTLIER_K, folds_for, label_issues, out_of_sample_proba, outliers
from heads.scoring.table import output_format

FINDINGS = pa.schema(
    [
        ("path", pa.string()),
        ("id", pa.int64()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("issue", pa.string()),  # label | outlier | near_duplicate
        ("score", pa.float64()),  # higher = more suspect, comparable within an issue kind
        ("suggested_label", pa.string()),  # label issues: the most probable class
        ("related", pa.string()),  # the nearest neighbour's or the near-duplicate's path
    ]
)
# Before any training: logistic regression on the embeddings as they are. (Standardising 1,280
# dimensions on a hundred images overfits: every probability near 0 or 1, no ranking left.)
DEFAULT_HEAD = ("logreg", {"pre": "none", "C": 1.0})


def head_of(store: Store) -> tuple[str, dict[str, Any], str]:
    """The best head kind of the store's latest training with its chosen settings (logistic
    regression's defaults before any training), and where that choice came from."""
    latest = store.path / LATEST_HEADS
    if not latest.exists():
        return (*DEFAULT_HEAD, "no training yet: logistic regression, default settings")
    best = json.loads(latest.read_text())
    meta = json.loads((store.path / best["best_path"]).with_suffix(".json").read_text())
    params = dict(meta.get("params", {}))
    if meta.get("selection_metric") == "balanced_accuracy":  # trained with balanced weights
        params["class_weight"] = "balanced"
    return meta["head"], params, f"best head of training {best['run']}: {meta['head']} {params}"


def audit_store(
    store: str | Path, threshold: float = 0.95, seed: int = 0, progress: bool = False
) -> tuple[pa.Table, dict[str, Any]]:
    """(the findings, most suspect first within each issue kind; a summary: counts per kind,
    the estimated label-noise rate, the head and folds used). `progress`: a bar with an
    estimate of the time left for the folds and for the neighbour search (stderr)."""
    st = Store(store)
    head, params, why = head_of(st)
    feature = params.get("feature", "embedding")
    X_all, meta_all = st.arrays(where_labelled=False)  # read once: every row, for neighbours
    labelled = meta_all["label"].is_valid().to_numpy(zero_copy_only=False)
    if feature == "embedding":
        X, meta = X_all[labelled], meta_all.filter(labelled)
    else:
        X, meta = st.arrays(where_labelled=True, feature=feature)
    rows: list[dict[str, Any]] = []
    y = np.asarray(meta["label"].to_pylist(), dtype=object).astype(str)
    folds = folds_for(y)
    with _bar(progress, folds, f"audit: labels, {folds} folds of {head}", "fold") as bar:
        proba, classes = out_of_sample_proba(X, y, head, params, seed, tick=bar.update)
    labels = label_issues(y, proba, classes)
    info = meta.to_pylist()
    for i, score, suggested in zip(labels.rows, labels.scores, labels.suggested, strict=True):
        rows.append(_finding(info[i], "label", score, suggested, None))
    with _bar(progress, len(X_all), "audit: neighbours", "img") as bar:
        dist, nearest, closest = _neighbour_distances(st, X_all, meta_all, tick=bar.update)
    found, cut = outliers(dist)
    every = meta_all.to_pylist()
    paths = {r["id"]: r["path"] for r in every}
    for i in found:
        rows.append(_finding(every[i], "outlier", dist[i], None, paths.get(nearest[i])))
    # Members of the dedup groups but each group's first; since a group is a connected
    # component (it can chain many images), each is related to its own nearest image, with
    # that similarity as its score.
    with _bar(progress, 1, "audit: near-duplicates", "search") as bar:
        groups = near_duplicate_groups(st, threshold=threshold).to_pylist()
        bar.update()
    position = {r["id"]: i for i, r in enumerate(every)}
    seen: set[int] = set()
    for g in groups:
        if g["group"] not in seen:
            seen.add(g["group"])
            continue
        i = position[g["id"]]
        rows.append(_finding(g, "near_duplicate", closest[i], None, paths.get(nearest[i])))
    kinds = ("label", "outlier", "near_duplicate")
    rows.sort(key=lambda r: (kinds.index(r["issue"]), -r["score"]))  # most suspect first
    table = pa.Table.from_pylist(rows, schema=FINDINGS)
    counts = {
        k: sum(1 for r in rows if r["issue"] == k) for k in ("label", "outlier", "near_duplicate")
    }
    summary = {
        "store": str(st.path),
        "fingerprint": st.manifest()["fingerprint"],
        "rows": len(every),
        "labelled_rows": len(info),
        "issues": counts,
        "label_noise_rate": labels.noise_rate,
        "head": why,
        "outlier_distance_cut": cut,
        "near_duplicate_threshold": threshold,
        "folds": folds,
    }
    return table, summary


def _bar(progress: bool, total: int, desc: str, unit: str) -> Any:
    """A progress bar with the time left (tqdm, as the other stages), or none; every step
    shown (a fold is seconds, never too often to draw)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not progress,
        dynamic_ncols=True,
        mininterval=0,
        miniters=1,
    )


def _finding(
    row: dict[str, Any], issue: str, score: float, suggested: str | None, related: str | None
) -> dict[str, Any]:
    return {
        "path": row["path"],
        "id": row["id"],
        "label": row["label"],
        "split": row["split"],
        "issue": issue,
        "score": float(score),
        "suggested_label": suggested,
        "related": related,
    }


def _neighbour_distances(
    st: Store, X: np.ndarray, meta: pa.Table, batch: int = 1024, tick: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's mean cosine distance to its OUTLIER_K nearest other rows, through the
    store's FAISS index; the id of its nearest other row, and their similarity. `tick(n)`
    after each batch of n rows."""
    index = st.index(mmap=True)
    ids = meta["id"].to_numpy()
    k = min(OUTLIER_K + 1, max(index.ntotal, 1))
    dist = np.zeros(len(X))
    nearest = np.full(len(X), -1, np.int64)
    closest = np.zeros(len(X))
    for s in range(0, len(X), batch):
        scores, found = index.search(X[s : s + batch], k)
        for j in range(len(found)):
            keep = (found[j] >= 0) & (found[j] != ids[s + j])
            sims, others = scores[j][keep][:OUTLIER_K], found[j][keep]
            dist[s + j] = float(1 - sims.mean()) if len(sims) else 0.0
            nearest[s + j] = others[0] if len(others) else -1
            closest[s + j] = float(sims[0]) if len(sims) else 0.0
        if tick is not None:
            tick(len(found))
    return dist, nearest, closest


def write_findings(table: pa.Table, out: str | Path) -> Path:
    """The findings as Parquet or CSV (by extension), written atomically."""
    fmt = output_format(out)
    with atomic_path(out) as tmp:
        if fmt == "csv":
            pacsv.write_csv(table, tmp)
        else:
            pq.write_table(table, tmp)
    return Path(out)


def audit_and_track(
    store: str | Path, parent_run_id: str, workspace: str | Path, seed: int = 0
) -> dict[str, Any]:
    """Audit the store and log it to the pipeline's parent run: counts per issue kind and the
    estimated label-noise rate as metrics, the findings as the MLflow table `audit.json`."""
    from flows.tracking.tracker import Tracker

    tracker = Tracker(workspace)
    table, summary = audit_store(store, seed=seed)
    keep_in_store(store, table, summary)
    counts = summary["issues"]
    tracker.log_to_run(
        parent_run_id,
        metrics={
            "audit_label_issues": counts["label"],
            "audit_outliers": counts["outlier"],
            "audit_near_duplicates": counts["near_duplicate"],
            "audit_label_noise_rate": summary["label_noise_rate"],
        },
        tags={"audit_head": summary["head"][:250]},
    )
    tracker.client().log_table(parent_run_id, table.to_pandas(), "audit.json")
    line = (
        f"audit: {plural(counts['label'], 'label issue')} (estimated label noise "
        f"{summary['label_noise_rate']:.1%}), {plural(counts['outlier'], 'outlier')}, "
        f"{plural(counts['near_duplicate'], 'near-duplicate')}: `headstart audit --out FILE` "
        "lists them"
    )
    return summary | {"line": line}


def fix_splits(store: str | Path, workspace: str | Path, apply: bool = False) -> dict[str, Any]:
    """The moves that stop the store's near-duplicate groups spanning splits (test rows move
    out, never in; extractors/store/dedup.py `split_moves`), the trainings whose test scores were
    measured on the split as it is, and, with `apply`, the moves made."""
    from extractors.store.dedup import leak_check, split_groups, split_moves, store_grouping
    from extractors.store.grouping import Grouping
    from flows.tracking.results import runs_scored_on
    from flows.tracking.tracker import Tracker

    st = Store(store)
    grouping = store_grouping(st)
    if grouping.by == "none":  # the store was split row by row: check at the default
        grouping = Grouping()
    before = st.manifest()
    groups, meta = split_groups(st, grouping)
    moves = split_moves(groups, meta)
    leaky = len({m["group"] for m in moves})
    fingerprint = before["fingerprint"]
    runs = runs_scored_on(Tracker(workspace), str(st.path), fingerprint) if moves else []
    result: dict[str, Any] = {
        "store": str(st.path),
        "threshold": grouping.threshold,
        "leaky_groups": leaky,
        "moves": moves,
        "out_of_test": sum(1 for m in moves if m["from"] == "test"),
        "runs_on_leaking_split": runs,
        "applied": False,
        "note": groups.note(grouping.threshold),
        # groups at the threshold itself that span splits, too large for any move to keep
        # whole: counted only when nothing can be moved (extractors/store/dedup.py)
        "too_large_to_keep": 0 if moves else leak_check(st, grouping)["leaky_groups"],
    }
    if apply:
        note = {"fixed": {"moved": len(moves), "groups": leaky, "threshold": grouping.threshold}}
        after = st.move_splits({m["id"]: m["to"] for m in moves}, note)
        result |= {"applied": True, "fingerprint": [before["fingerprint"], after["fingerprint"]]}
    return result


def keep_in_store(store: str | Path, table: pa.Table, summary: dict[str, Any]) -> None:
    """The findings and summary as the store's latest audit (what the search page's issues
    view shows), written together under the store's lock."""
    Store(store).keep_audit(table, summary)
