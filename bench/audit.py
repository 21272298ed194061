"""`headstart audit` on the demo's store: where its time goes, and the old path against the new.

    uv run python bench/audit.py                      # builds the demo store (1,740 digits)
    uv run python bench/audit.py --store DIR          # a store of your own (labels as they are)
    uv run python bench/audit.py --skip-old --json bench/results/audit.json

Without --store it embeds the demo's digits (10 classes x 174, scikit-learn's digits as PNG)
with `--flips` of them moved to the next class's folder (wrong labels the audit must find), and
times that `embed` too, as a yardstick of the machine. Then:

- old: the label stage as it was, scikit-learn's `cross_val_predict` (5 folds) of logistic
  regression on the raw embeddings, then cleanlab; its time is what the audit's was, give or
  take the seconds of the neighbour and near-duplicate searches;
- new: `headstart audit --store DIR --json` as a whole process (start-up included), and its
  phases in this process (labels, neighbours, near-duplicates);
- the label issues of both: how many are shared, and how many flips each ranks in its top k
  (k = the number of flips).

Ratios are from one run (the machine is shared and noisy); the seconds are this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_store(folder: Path, flips: int) -> tuple[Path, set[str], float]:
    """The demo's digits with `flips` labels moved to the next class, embedded into a store;
    (the store, the flipped paths, the seconds `embed` took)."""
    from extractors.embedding.backbones import create_backbone
    from extractors.embedding.sources import read_source
    from extractors.store.store import Store
    from flows.sample_data import materialise_digits

    root = materialise_digits(folder / "digits", per_class=174)
    flipped = set()
    for n in range(flips):
        src, dst = str(n % 10), str((n % 10 + 1) % 10)
        f = sorted((root / src).glob("*.png"))[n // 10]
        moved = root / dst / f"flipped_{f.name}"
        f.rename(moved)
        flipped.add(str(moved.resolve()))
    store = Store(folder / "store")
    start = time.perf_counter()
    store.update(read_source(root), create_backbone("efficientnet_lite0", device="cpu"))
    return store.path, flipped, time.perf_counter() - start


def old_labels(store: Path) -> tuple[list[str], float]:
    """The label stage as it was before the audit was sped up: (issue paths, seconds)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from extractors.store.store import Store
    from heads.audit import label_issues
    from heads.classical import build_head

    start = time.perf_counter()
    X, meta = Store(store).arrays()
    y = np.asarray(meta["label"].to_pylist(), dtype=object).astype(str)
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    est = build_head("logreg", pre="none", C=1.0, seed=0)
    proba = cross_val_predict(est, X, y, cv=cv, method="predict_proba")
    found = label_issues(y, np.asarray(proba, np.float64), sorted(np.unique(y).tolist()))
    paths = meta["path"].to_pylist()
    return [paths[i] for i in found.rows], time.perf_counter() - start


def new_phases(store: Path) -> dict[str, float]:
    """The audit's phases in this process, in seconds."""
    from extractors.store.dedup import near_duplicate_groups
    from extractors.store.store import Store
    from flows.steps.audit import _neighbour_distances, head_of
    from heads.audit import label_issues, out_of_sample_proba

    st = Store(store)
    head, params, _ = head_of(st)
    t0 = time.perf_counter()
    X, meta = st.arrays(feature=params.get("feature", "embedding"))
    y = np.asarray(meta["label"].to_pylist(), dtype=object).astype(str)
    proba, classes = out_of_sample_proba(X, y, head, params)
    label_issues(y, proba, classes)
    t1 = time.perf_counter()
    _neighbour_distances(st, *st.arrays(where_labelled=False))
    t2 = time.perf_counter()
    near_duplicate_groups(st)
    t3 = time.perf_counter()
    return {"labels": t1 - t0, "neighbours": t2 - t1, "near_duplicates": t3 - t2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--store", type=Path, help="audit this store instead of building the demo's")
    ap.add_argument("--flips", type=int, default=20, help="wrong labels in the built store")
    ap.add_argument("--skip-old", action="store_true", help="do not time the old label stage")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    figures: dict = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_at_start": os.getloadavg()[0],  # the machine is shared: how busy it was
    }
    flipped: set[str] = set()
    if args.store is None:
        store, flipped, figures["embed_s"] = build_store(Path(tmp.name), args.flips)
        print(f"embed of the demo's digits ({args.flips} flipped): {figures['embed_s']:.1f} s")
    else:
        store = args.store
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "flows.cli", "audit", "--store", str(store), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    figures["audit_s"] = time.perf_counter() - start
    result = json.loads(done.stdout)
    new = [r["path"] for r in result["findings"] if r["issue"] == "label"]
    print(f"new: `headstart audit` as a process: {figures['audit_s']:.1f} s")
    figures["phases_s"] = new_phases(store)
    print("    phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in figures["phases_s"].items()))
    if not args.skip_old:
        old, figures["old_labels_s"] = old_labels(store)
        ratio = figures["old_labels_s"] / figures["phases_s"]["labels"]
        print(f"old: label stage {figures['old_labels_s']:.1f} s ({ratio:.1f}x the new one's)")
        shared = len(set(old) & set(new))
        figures |= {"old_issues": len(old), "new_issues": len(new), "shared_issues": shared}
        print(f"label issues: old {len(old)}, new {len(new)}, shared {shared}")
        if flipped:
            k = len(flipped)
            figures["old_flips_in_top_k"] = len(set(old[:k]) & flipped)
            print(f"old: {figures['old_flips_in_top_k']} of {k} flips in its top {k}")
    if flipped:
        k = len(flipped)
        figures["new_flips_in_top_k"] = len(set(new[:k]) & flipped)
        print(f"new: {figures['new_flips_in_top_k']} of {k} flips in its top {k}")
    if "embed_s" in figures:
        print(f"audit / embed of the same store: {figures['audit_s'] / figures['embed_s']:.2f}")
    figures["load_average_at_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
