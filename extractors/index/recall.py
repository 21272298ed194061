"""Search parameters tuned to a recall target, measured on held-out queries.

Protocol: queries are vectors that are *not* in the index (a held-out sample on a fresh build,
the rows about to be added on an update). Their true top-k comes from an exact scan over the
vectors that are in the index. Each point of the kind's grid (nprobe, efSearch, re-rank depth)
is timed on the whole query batch; the fastest point whose recall@k reaches the target wins,
or the most accurate one when none does (and the result says the target was missed).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from extractors.common import normalize
from extractors.index.ann import AnnIndex
from extractors.settings import DEFAULT_RECALL

TUNE_QUERIES = 500
K = 10


@dataclass
class Tuning:
    """The chosen search parameters and the curve they were picked from."""

    params: dict[str, int]
    recall: float
    ms_per_query: float
    target: float
    k: int
    queries: int
    reached: bool
    curve: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ExactTopK:
    """True top-k ids of each query over (vectors, ids) batches fed one at a time: each batch's
    own top-k by FAISS's exact k-NN (BLAS and a heap), merged into the running top-k."""

    def __init__(self, queries: np.ndarray, k: int):
        self.q, self.k = normalize(queries), k
        self.scores = np.full((len(queries), 0), -np.inf, np.float32)
        self.ids = np.zeros((len(queries), 0), np.int64)

    def add(self, vectors: np.ndarray, ids: np.ndarray, normalized: bool = False) -> None:
        """Fold in a batch; `normalized`: its rows are unit vectors already."""
        if not len(ids) or not len(self.q):
            return
        x = np.ascontiguousarray(vectors, np.float32) if normalized else normalize(vectors)
        s, pos = faiss.knn(self.q, x, min(self.k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
        all_s = np.concatenate([self.scores, s], axis=1)
        all_i = np.concatenate([self.ids, np.asarray(ids, np.int64)[pos]], axis=1)
        top = np.argsort(-all_s, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(all_s, top, 1)
        self.ids = np.take_along_axis(all_i, top, 1)

    def result(self) -> np.ndarray:
        return self.ids  # kept in order of score


def exact_topk(
    queries: np.ndarray, batches: Iterable[tuple[np.ndarray, np.ndarray]], k: int
) -> np.ndarray:
    """True top-k ids of each query over (vectors, ids) batches, streamed: memory is one batch."""
    acc = ExactTopK(queries, k)
    for vectors, ids in batches:
        acc.add(vectors, ids)
    return acc.result()


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of each query's true top-k found in its returned top-k."""
    k = min(k, truth.shape[1])
    if not k or not len(truth):
        return 1.0
    hits = sum(len(set(f[:k]) & set(t[:k])) for f, t in zip(found, truth, strict=True))
    return hits / (k * len(truth))


PROBES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
RERANKS = (4, 8, 12, 16, 24, 32)


def grid(kind: str, nlist: int = 0) -> list[list[dict[str, int]]]:
    """Search settings to try: rows of one main knob value (nprobe/efSearch), cheapest first;
    for ivf_pq each row sweeps the re-rank depth."""
    if kind == "flat":
        return [[{}]]
    if kind == "hnsw":
        return [[{"efSearch": e}] for e in (16, 24, 32, 48, 64, 96, 128, 256, 512)]
    probes = [p for p in PROBES if p <= max(nlist, 1)]
    if kind == "ivf_flat":
        return [[{"nprobe": p}] for p in probes]
    return [[{"nprobe": p, "rerank": r} for r in RERANKS] for p in probes]


def measure(
    ann: AnnIndex, queries: np.ndarray, truth: np.ndarray, params: dict[str, int], k: int
) -> dict[str, Any]:
    """Recall@k and batched latency of one setting."""
    ann.set_params(params)
    ann.search(queries[:8], k)  # warm caches and threads
    start = time.perf_counter()
    _, found = ann.search(queries, k)
    ms = 1000 * (time.perf_counter() - start) / max(len(queries), 1)
    return {**params, "recall": round(recall_at_k(found, truth, k), 4), "ms_per_query": ms}


def tune(
    ann: AnnIndex,
    queries: np.ndarray,
    truth: np.ndarray,
    target: float = DEFAULT_RECALL,
    k: int = K,
    nlist: int = 0,
) -> Tuning:
    """Sweep the kind's grid; keep the fastest setting that reaches `target` recall@k.

    Within a row, deeper re-ranking only costs more once the target is met, so the row stops
    there; the sweep stops when a row's cheapest setting is already slower than the best
    setting found, or meets the target by itself (larger values only cost more), or recall
    stops improving at the top of the range.
    """
    curve: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for row in grid(ann.kind, nlist):
        start = len(curve)
        for params in row:
            point = measure(ann, queries, truth, params, k)
            curve.append(point)
            if point["recall"] >= target:
                if best is None or point["ms_per_query"] < best["ms_per_query"]:
                    best = point
                break
        first = curve[start]
        if best is not None and (first is best or first["ms_per_query"] > best["ms_per_query"]):
            break
        if first["recall"] >= 0.999:
            break
    reached = best is not None
    best = best or max(curve, key=lambda p: (p["recall"], -p["ms_per_query"]))
    params = {k_: v for k_, v in best.items() if k_ not in ("recall", "ms_per_query")}
    ann.set_params(params)
    return Tuning(
        params=params,
        recall=best["recall"],
        ms_per_query=best["ms_per_query"],
        target=target,
        k=k,
        queries=len(queries),
        reached=reached,
        curve=curve,
    )


def check(
    ann: AnnIndex,
    queries: np.ndarray,
    truth: np.ndarray,
    k: int = K,
) -> float:
    """Recall@k of the index at its current parameters."""
    _, found = ann.search(queries, k)
    return recall_at_k(found, truth, k)


def held_out(n: int, seed: int = 0, count: int = TUNE_QUERIES) -> np.ndarray:
    """Positions of a seeded sample of rows kept out of the index while it is tuned."""
    count = min(count, max(n // 10, 1) if n > 1 else 0)
    return np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))
