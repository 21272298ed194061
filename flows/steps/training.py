"""Training stage: heads fitted on a store and tracked in MLflow, reused when nothing changed,
and the decision to escalate to fine-tuning."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow.compute as pc

from extractors import DEFAULT_WORKSPACE
from extractors.common import plural, write_json_atomic
from extractors.store.layout import LATEST_HEADS
from extractors.store.store import Store
from extractors.workspace import weights_file
from flows.tracking import models, results
from flows.tracking.tracker import Tracker
from heads.classifier import ImageClassifier
from heads.evaluate import HeadResult, Splits
from heads.plots import embedding_map_png
from heads.train import Trained, save_heads, splits_of, train_heads


def load_splits(store: Store, feature: str = "embedding") -> Splits:
    """A store's labelled rows of one feature column, by split (checked for training)."""
    X, meta = store.arrays(where_labelled=True, feature=feature)
    labels, split = meta["label"].to_pylist(), meta["split"].to_pylist()
    return splits_of(X, labels, split, where=f"store {store.path}")


def check_trainable(store: Store) -> None:
    """Raise TrainingDataError when the store cannot support training heads."""
    load_splits(store)


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
    # The manifest (its fingerprint) is read before the rows: an embed that commits while
    # this trains leaves an older fingerprint on record, so the next run retrains, never
    # reusing heads fitted on data older than what it records.
    manifest = st.manifest()
    features = {f: load_splits(st, f) for f in st.features()}
    test_rows = _test_rows(st)
    trained = train_heads(features, heads=heads, seed=seed, progress=progress)
    Tracker(workspace).log_dataset(parent_run_id, manifest, st.path)
    leak = split_leaks(st)
    run = {"mlflow_run_id": parent_run_id}
    saved = save_heads(st.path, manifest, trained.results, run_tag=parent_run_id, extra=run)
    table, model_uris = _log_heads(
        st, manifest, parent_run_id, workspace, trained, saved, test_rows
    )
    tracker = Tracker(workspace)
    experiment = tracker.experiment_of(parent_run_id)
    registered = models.register_best(tracker, model_uris[trained.best.name], experiment)
    best_run = next(row["run_id"] for row in table if row["head"] == trained.best.name)
    image = _register_best(st, saved[trained.best.name], best_run, experiment, workspace, seed)
    _log_training(parent_run_id, workspace, manifest, trained, leak, registered, image, seed)
    summary = {
        "store": str(st.path),
        "heads": table,
        "best": trained.best.name,
        "skipped": trained.skipped,
        "imbalanced": trained.imbalanced,
        "registered": registered,
        "image_model": image,
        "leaks": leak,
        "splits": split_line(trained),
    }
    _remember_training(st, parent_run_id, manifest, heads, seed, summary)
    return summary


def _log_heads(
    st: Store,
    manifest: dict[str, Any],
    parent_run_id: str,
    workspace: str | Path,
    trained: Trained,
    saved: dict[str, Path],
    test_rows: dict[str, list[Any]],
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """One nested MLflow run (and model) per head: the heads table (best first) and each
    head's model URI."""
    context = {
        "backbone": manifest["backbone"],
        "store": str(st.path),
        "fingerprint": manifest["fingerprint"],
        "manifest": manifest,
    }
    table, model_uris = [], {}
    tracker = Tracker(workspace)
    examples = {"embedding": trained.splits.X_train[:5]}  # real rows for the models' signatures
    for r in trained.results:
        feature = r.params.get("feature", "embedding")
        if feature not in examples:  # a --layers column: read once
            examples[feature] = st.arrays(where_labelled=True, feature=feature)[0][:5]
        run_id, model_uris[r.name] = models.log_head_run(
            tracker, parent_run_id, r, saved[r.name], context, examples[feature], test_rows
        )
        table.append(_row(r, run_id, path=str(saved[r.name])))
    return table, model_uris


def _register_best(
    st: Store,
    head: Path,
    run_id: str,
    experiment: str,
    workspace: str | Path,
    seed: int,
) -> dict[str, Any]:
    """The best head (saved at `head`) registered as an image model with its backbone, and
    named in heads/latest.json (predict uses the registered version)."""
    best = ImageClassifier.from_head(head)
    network = weights_file(best.backbone, workspace)  # a fine-tuned body travels with it
    image = register_image_model(
        best,
        run_id,
        experiment,
        workspace,
        seed,
        None if network is None else Path(network),
    )
    latest = st.path / LATEST_HEADS  # predict names the registered version
    write_json_atomic(
        latest,
        json.loads(latest.read_text())
        | {"registered": {"name": image["name"], "version": image["version"]}},
    )
    return image


def _log_training(
    parent_run_id: str,
    workspace: str | Path,
    manifest: dict[str, Any],
    trained: Trained,
    leak: dict[str, Any],
    registered: dict[str, Any],
    image: dict[str, Any],
    seed: int,
) -> None:
    """The training's params, metrics, tags and embedding map on the parent run."""
    splits = trained.splits
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
        Tracker(workspace).log_to_run(
            parent_run_id,
            params={
                "imbalanced": trained.imbalanced,
                "selection_metric": trained.best.selection_metric,
            },
            metrics={
                **{k: v for k, v in leak.items() if isinstance(v, int)},
                "n_train": len(splits.y_train),
                "n_val": len(splits.y_val),
                "n_test": len(splits.y_test),
                "n_classes": len(splits.classes),
                "best_val_score": trained.best.val_score,
                "best_test_accuracy": trained.best.metrics["accuracy"],
            },
            tags={
                "best_head": trained.best.name,
                "skipped_heads": "; ".join(trained.skipped.values()) or "none",
                "registered_model": registered["uri"],
                "image_model": image["uri"],
                "champion_decision": f"at this run: {image['champion']['line']}",
            },
            artifacts=[emap],
        )


def _remember_training(
    st: Store,
    parent_run_id: str,
    manifest: dict[str, Any],
    heads: list[str] | None,
    seed: int,
    summary: dict[str, Any],
) -> None:
    """Record what this training was run on, for `reusable_training` to compare with."""
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


def _test_rows(store: Store) -> dict[str, list[Any]]:
    """path, sha256 and label of the test split's rows, in the order heads are scored on them
    (the labelled rows of `Store.arrays`, test split, as `load_splits` takes them)."""
    _, meta = store.arrays(where_labelled=True)
    test = meta.filter(pc.equal(meta["split"], "test"))
    return {c: test[c].to_pylist() for c in ("path", "sha256", "label")}


def split_leaks(store: Store) -> dict[str, Any]:
    """Near-duplicate groups (as the store's split groups them, extractors/store/grouping.py) whose
    images sit in more than one split, and a line that says so when the test score is
    measured on such a split."""
    from extractors.store.dedup import LEAK_CHECK_MAX_ROWS, leak_check, store_grouping
    from extractors.store.grouping import Grouping

    rows = store.manifest()["rows"]
    if rows > LEAK_CHECK_MAX_ROWS:
        return {"line": f"leaks: not checked at {rows:,} rows (run `headstart dedup`)"}
    grouping = store_grouping(store)
    if grouping.by == "none":  # split row by row: still check, at the default threshold
        grouping = Grouping()
    found = leak_check(store, grouping)
    at = f"cosine >= {grouping.threshold}"
    if not found["leaky_groups"]:
        return found | {"line": f"leaks: no near-duplicate groups ({at}) span splits"}
    stuck = found["too_large_groups"]
    twins = found["twinned_test_images"]
    line = (
        f"warning: {plural(found['leaky_groups'], 'near-duplicate group')} ({at}) "
        f"{'spans' if found['leaky_groups'] == 1 else 'span'} splits; "
        f"{plural(twins, 'test image')} {'has' if twins == 1 else 'have'} a near-twin in train "
        f"or val ({found['twinned_test_images'] / max(found['split_sizes']['test'], 1):.0%} of "
        "test): the test scores may be optimistic"
    )
    if stuck:
        line += (
            f"; {stuck} of these groups {'is' if stuck == 1 else 'are'} too large to keep in "
            "one split (over a fifth of "
            "their class), so this split cannot be leak-free: add images, or group them "
            "with a manifest `group` column"
        )
    if found["groups_to_move"]:
        line += "; `headstart dedup --fix-splits` proposes the moves that can be made"
    return found | {"line": line}


FEW_TEST_IMAGES = 100  # below this, a test score's interval is wider than +-0.05 or so


def split_line(trained: Trained) -> str:
    """How large each split really is, and how far the best head's test accuracy can be
    trusted: its 95% bootstrap interval (heads/evaluate.py), said plainly when it is wide."""
    s = trained.splits
    sizes = {"train": len(s.y_train), "val": len(s.y_val), "test": len(s.y_test)}
    total = sum(sizes.values()) or 1
    parts = ", ".join(f"{k} {n} ({n / total:.0%})" for k, n in sizes.items())
    m = trained.best.metrics
    line = (
        f"splits: {parts}; best head's test accuracy {m['accuracy']:.3f}, 95% interval "
        f"[{m['accuracy_ci_low']:.3f}, {m['accuracy_ci_high']:.3f}]"
    )
    if sizes["test"] < FEW_TEST_IMAGES:
        line += f": only {plural(sizes['test'], 'test image')}, so the interval is wide"
    return line


def register_image_model(
    clf: ImageClassifier,
    run_id: str,
    experiment: str,
    workspace: str | Path,
    seed: int = 0,
    network: Path | None = None,
) -> dict[str, Any]:
    """Log `clf` as an image model in its run, register it as a new version of
    `<experiment>-image` (alias `newest`), and let the champion rule decide on it."""
    from flows.tracking import champion, image_model

    client = Tracker(workspace).client()
    ended = client.get_run(run_id).info.end_time  # the run spans its model's fit: keep that
    with mlflow.start_run(run_id=run_id, nested=True):
        uri = image_model.log_image_model(clf, network=network)
    client.set_terminated(run_id, "FINISHED", end_time=ended)
    registered = image_model.register(uri, experiment, workspace)
    decision = champion.consider(registered["name"], registered["version"], workspace, seed)
    return registered | {"champion": decision.as_dict() | {"line": decision.line()}}


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
    """One line of the heads table (CLI, JSON and Prefect artifact alike); with `--layers`
    columns, the head's val score on each column (`val_by_feature`: the ladder's rungs)."""
    by_feature = r.extra.get("val_by_feature") or {}
    return {
        "head": r.name,
        "params": {k: v for k, v in r.params.items() if k != "feature" or v != "embedding"},
        "val_score": r.val_score,
        "selection_metric": r.selection_metric,
        **r.metrics,
        **({"val_by_feature": by_feature} if len(by_feature) > 1 else {}),
        "run_id": run_id,
        **extra,
    }


def escalation_decision(
    summary: dict[str, Any], target: float | None, finetune: bool = False
) -> dict[str, Any]:
    """Escalate to fine-tuning when asked, or when no frozen candidate reaches the target: the
    ladder (flows/candidates.py) over the store's feature columns, a rung each, its verdicts
    kept when there are `--layers` columns; with `embedding` alone, its one rung is the best
    head, and the reason says so."""
    from flows.candidates import ladder, rungs_of

    rungs = rungs_of(summary)
    decision = ladder(rungs, target, finetune)
    if len(rungs) > 1:
        return decision
    best = next(h for h in summary["heads"] if h["head"] == summary["best"])
    score, metric = best["val_score"], best["selection_metric"].replace("_", " ")
    reason = decision["reason"]
    if target is not None and not finetune:
        verdict = "<" if decision["escalate"] else ">="
        reason = f"best head {best['head']} val {metric} {score:.3f} {verdict} target {target:.3f}"
    return {
        "escalate": decision["escalate"],
        "reason": reason,
        "best_head": best["head"],
        "best_val_score": score,
    }


def compare(
    workspace: str | Path = DEFAULT_WORKSPACE,
    experiment: str | None = None,
    last: int | None = None,
) -> list[dict[str, Any]]:
    """Heads and fine-tuned networks side by side, as logged in MLflow."""
    return results.compare_runs(Tracker(workspace), experiment=experiment, last=last)


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
