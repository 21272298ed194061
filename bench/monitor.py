"""Benchmark: the production monitor's false alarms, detections and cost (issue 31), in one run.

    uv run python bench/monitor.py                      # writes bench/results/monitor-<date>.json
    uv run python bench/monitor.py --trials 200 --rows 0   # skip the 1M-row speed figure

Real images with the default backbone (efficientnet_lite0, CPU): scikit-learn's 1,797
handwritten digits (as `materialise_digits` writes them) are the training distribution;
crops of 17 scikit-image photos (96-256 px) are foreign. Half the digits, shuffled, train the
head (logistic regression) and are the OOD reference; in each trial the other half is split
afresh into a calibration set (the val split's role: OOD calibration, drift reference, the
head's reference mean top probability) and batches:

    in-distribution  `--batch` held-out digits: any alarm is a false alarm
    mixed            the same with a fifth replaced by foreign crops: an alarm is a detection;
                     AUROC of `ood_score` ranking the foreign images first
    foreign          `--batch` foreign crops

All with `MonitorSettings()` defaults (extractors/settings.py). Cost: the OOD score of one
image (its k-NN search and p-value) against the head's prediction and the backbone's
embedding of it, ratios from one run; and at `--rows` (1M) generated reference vectors
(bench/search.py's collection, 1,280-d) in an IVF index (nlist 1024, nprobe 16), the score's
ms per image batched and one image at a time, unfiltered (the reference is every row; held-out
calibration rows leave themselves out) and filtered to 80% of the ids inside FAISS (the
store's index restricted to its train rows), with its error against exact k-th neighbour
similarities.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from extractors.monitor.drift import batch_report  # noqa: E402
from extractors.monitor.ood import KnnOOD  # noqa: E402
from extractors.settings import MonitorSettings  # noqa: E402

PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "camera",
    "coins", "horse", "gravel", "brick", "grass", "page", "text", "immunohistochemistry",
    "moon", "cell",
)  # fmt: skip
TESTS = ("embedding_drift", "ood", "prediction_drift", "confidence")


def embed(backbone, images: list) -> tuple[np.ndarray, float]:
    """Embeddings of PIL images, and the seconds per image (decode done, transform + net)."""
    import torch

    out, start = [], time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), 64):
            x = torch.stack([backbone.transform(im) for im in images[i : i + 64]])
            out.append(backbone.embed(x).numpy())
    return np.concatenate(out).astype(np.float32), (time.perf_counter() - start) / len(images)


def real_embeddings(crops: int, seed: int, per_class: int = 1000) -> dict:
    from PIL import Image
    from skimage import data

    from extractors.embedding.backbones import create_backbone
    from flows.sample_data import materialise_digits

    backbone = create_backbone("efficientnet_lite0", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        files = sorted(materialise_digits(Path(tmp), per_class=per_class).glob("*/*.png"))
        digits = [Image.open(f).convert("RGB") for f in files]
        labels = np.array([int(f.parent.name) for f in files])
    rng = np.random.default_rng(seed)
    foreign, names = [], []
    for name in PHOTOS:
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        for _ in range(crops):
            side = int(rng.integers(96, min(257, *photo.size)))
            x, y = (int(rng.integers(0, s - side + 1)) for s in photo.size)
            foreign.append(photo.crop((x, y, x + side, y + side)))
            names.append(name)
    d, d_s = embed(backbone, digits)
    f, _ = embed(backbone, foreign)
    return {"digits": d, "labels": labels, "foreign": f, "names": np.array(names),
            "embed_s_per_image": d_s}  # fmt: skip


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    from scipy.stats import rankdata

    ranks, n_pos = rankdata(scores), int(positive.sum())
    return float(
        (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(scores) - n_pos))
    )


def trials(emb: dict, args: argparse.Namespace) -> tuple[dict, dict]:
    """False alarms over in-distribution batches, detections over mixed and foreign ones;
    and the fitted (head, detector, test vectors) for the cost figures."""
    from sklearn.linear_model import LogisticRegression

    s, rng = MonitorSettings(), np.random.default_rng(args.seed)
    order = rng.permutation(len(emb["digits"]))
    half = len(order) // 2
    train, pool = order[:half], order[half:]
    x, y, foreign = emb["digits"], emb["labels"], emb["foreign"]
    head = LogisticRegression(max_iter=3000).fit(x[train], y[train])
    shares = dict(zip(*np.unique(y[train], return_counts=True), strict=True))
    runs: dict[str, list] = {"in_distribution": [], "mixed": [], "foreign": []}
    aurocs, flagged_foreign = [], []
    for _ in range(args.trials):
        part = rng.permutation(pool)
        calib, batch = x[part[: args.calibration]], x[part[args.calibration :][: args.batch]]
        ood = KnnOOD(s.ood_k).fit(x[train], calib)
        top_ref = float(head.predict_proba(calib).max(axis=1).mean())
        n_foreign = args.batch // 5
        picked = rng.choice(len(foreign), args.batch, replace=False)
        mixed = np.concatenate([batch[: args.batch - n_foreign], foreign[picked[:n_foreign]]])
        for kind, vectors in (("in_distribution", batch), ("mixed", mixed),
                              ("foreign", foreign[picked])):  # fmt: skip
            proba = head.predict_proba(vectors)
            p = ood.p_values(vectors)
            r = batch_report(vectors, calib, ood=ood, p_values=p, label_shares=shares,
                             predicted=head.classes_[proba.argmax(axis=1)],
                             top_proba=proba.max(axis=1), reference_top_proba=top_ref,
                             settings=s)  # fmt: skip
            runs[kind].append(r)
            if kind == "mixed":
                is_foreign = np.arange(len(vectors)) >= args.batch - n_foreign
                aurocs.append(auroc(1 - p, is_foreign))
                flagged_foreign.append(float((p[is_foreign] <= s.ood_level).mean()))
    out = {kind: summary(rs) for kind, rs in runs.items()}
    out["mixed"].update(auroc_mean=float(np.mean(aurocs)), auroc_min=float(np.min(aurocs)),
                        foreign_flagged_share=float(np.mean(flagged_foreign)))  # fmt: skip
    return out, {"head": head, "ood": ood, "vectors": x[pool]}


def summary(reports: list[dict]) -> dict:
    """Alarm rate, each test's alarm rate, mean flagged share and witness AUC."""
    n = len(reports)
    return {
        "batches": n,
        "alarm_rate": sum(r["alarm"] for r in reports) / n,
        "test_alarm_rates": {t: sum(r[t]["alarm"] for r in reports) / n for t in TESTS},
        "flagged_share_mean": float(np.mean([r["ood"]["share"] for r in reports])),
        "witness_auc_mean": float(np.mean([r["embedding_drift"]["auc"] for r in reports])),
    }


def per_image_cost(fitted: dict, embed_s: float, repeats: int = 5) -> dict:
    """ms per image of the OOD score (search + p-value), of the head's predict_proba, and of
    embedding the image (backbone, CPU), on the same 1,000 (or fewer) held-out digits."""
    vectors = fitted["vectors"][:1000]

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(vectors)
            times.append(time.perf_counter() - start)
        return min(times) * 1000 / len(vectors)

    ood_ms = best(fitted["ood"].p_values)
    head_ms = best(fitted["head"].predict_proba)
    embed_ms = embed_s * 1000
    return {"reference_rows": fitted["ood"].n_reference_, "ood_ms": ood_ms, "head_ms": head_ms,
            "embed_ms": embed_ms, "ood_over_head": ood_ms / head_ms,
            "ood_over_embed_and_head": ood_ms / (embed_ms + head_ms)}  # fmt: skip


def million(rows: int, k: int, seed: int) -> dict:
    """The OOD score at `rows` generated reference vectors in an IVF index: ms per image
    (1,000 queries batched; 200 one at a time), unfiltered and filtered to 80% of the ids;
    and its error against the exact k-th neighbour similarity (200 queries)."""
    import faiss
    from search import Collection

    from extractors.index.ann import AnnIndex

    col = Collection(rows, seed)
    nlist, nprobe = 1024, 16
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(1280), 1280, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    start = time.perf_counter()
    index.train(col.draw(50_000, np.random.default_rng([seed, 7])))
    queries = col.queries(1000)
    exact = np.full((200, k), -np.inf, np.float32)
    for vectors, ids in col.batches():
        index.add_with_ids(vectors, ids)
        top = np.sort(np.concatenate([exact, queries[:200] @ vectors.T], axis=1), axis=1)
        exact = top[:, -k:]
    build_s = time.perf_counter() - start
    ann = AnnIndex(index, kind="ivf_flat")
    ann.set_params({"nprobe": nprobe})
    calibration = col.draw(1000, np.random.default_rng([seed, 8]))
    all_ids = np.arange(rows, dtype=np.int64) * 7 + 3
    allowed = np.sort(np.random.default_rng(seed).choice(all_ids, int(0.8 * rows), replace=False))
    out = {"rows": rows, "index": f"IVF{nlist},Flat nprobe={nprobe}", "build_s": build_s}
    vectors, ids = col.chunk(0)
    start = time.perf_counter()
    KnnOOD(k).fit(None, vectors[:1000], index=ann, calibration_ids=ids[:1000])
    out["calibration_in_index_fit_s"] = time.perf_counter() - start  # 1,000 rows leave-one-out
    for name, ids in (("unfiltered", None), ("filtered_80pct", allowed)):
        ood = KnnOOD(k).fit(None, calibration, index=ann, allowed_ids=ids)
        start = time.perf_counter()
        ood.p_values(queries)
        batched = (time.perf_counter() - start) * 1000 / len(queries)
        singles = []
        for q in queries[:200]:
            start = time.perf_counter()
            ood.p_values(q[None])
            singles.append((time.perf_counter() - start) * 1000)
        out[name] = {"ms_per_image_batched": batched,
                     "ms_one_image_p50": float(np.percentile(singles, 50)),
                     "ms_one_image_p99": float(np.percentile(singles, 99))}  # fmt: skip
    approx = 1.0 - KnnOOD(k).fit(None, calibration, index=ann).score(queries[:200])
    out["kth_similarity_abs_error_mean"] = float(np.abs(approx - exact[:, 0]).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--calibration", type=int, default=300)
    ap.add_argument("--per-class", type=int, default=1000, help="digits per class (all)")
    ap.add_argument("--crops", type=int, default=12, help="crops per foreign photo")
    ap.add_argument("--rows", type=int, default=1_000_000, help="0: skip the speed figure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, help="embeddings .npz: made if missing, else read")
    ap.add_argument("--json", type=Path, help="default bench/results/monitor-<date>.json")
    args = ap.parse_args()
    if args.cache and args.cache.exists():
        emb = dict(np.load(args.cache))
        emb["embed_s_per_image"] = float(emb["embed_s_per_image"])
    else:
        emb = real_embeddings(args.crops, args.seed, args.per_class)
        if args.cache:
            np.savez(args.cache, **emb)
    print(f"embedded {len(emb['digits'])} digits, {len(emb['foreign'])} crops", file=sys.stderr)
    found, fitted = trials(emb, args)
    print(f"{args.trials} trials done", file=sys.stderr)
    result = {
        "settings": MonitorSettings().as_dict(),
        "data": {
            "digits": len(emb["digits"]),
            "foreign": len(emb["foreign"]),
            "batch": args.batch,
            "calibration": args.calibration,
            "trials": args.trials,
        },
        **found,
        "cost": per_image_cost(fitted, emb["embed_s_per_image"]),
    }
    if args.rows:
        result["million"] = million(args.rows, MonitorSettings().ood_k, args.seed)
    print(json.dumps(result, indent=2))
    date = datetime.date.today().isoformat()
    path = args.json or ROOT / "bench" / "results" / f"monitor-{date}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
