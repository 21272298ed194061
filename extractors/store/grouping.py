"""Group-aware split: near-duplicate images, and rows sharing a manifest's `group`, are kept in
one train/val/test split, so no test image has a near-twin the heads trained or were chosen on.

Protocol (each update, for the rows it assigns a split to: new rows without a given one):

- Links. Each such row is linked to its NEIGHBOURS nearest rows, new and committed, whose
  cosine similarity is at least `threshold`, and to every row that shares its manifest
  `group`. Groups are the connected components of the links.
- Joining. A group holding rows that already have a split (committed rows keep theirs; a
  source may give some) puts its new rows in that split: the one most of them have (ties:
  train, val, test).
- Splitting. The other groups are cut as `sources.stratified_split` cuts rows, group by group:
  within each class (a group's most common label) groups are ordered by a seeded hash and fill
  test, then val, then train. Without near-duplicates this is exactly the row-wise split.
- Too large. Links chain: at a low threshold a whole class of similar images (the demo's 8x8
  digits) can become one group. A group is too large when it holds more than MAX_SHARE of its
  class, except that up to SMALL_GROUP rows may hold twice that share (in a class of 10, a group
  of 4 still leaves rows for every split; one of 5 could leave train none). It is regrouped
  from its own links at a stricter threshold, halfway to
  1, until its pieces fit; past STRICTEST its rows are split one by one. The update says so.

The threshold: `bench/grouping.py` measures, with the default backbone, 256-px crops of real
photos against copies re-encoded as JPEG (quality 60-95) and resized by up to ±15%. The copies
score 0.70-1.00 against their originals (5th percentile 0.86), crops of different photos at most
0.58. At 0.95 (the `dedup` default) 47% of the copies would be cut off their originals; at 0.80,
1.5%, and those mostly join their group through a sibling copy.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from extractors.common import normalize
from extractors.settings import GROUP_THRESHOLD

NEIGHBOURS = 16  # links looked for per row
MAX_SHARE = 0.2  # a group may hold at most this share of its class (the test split's share)...
SMALL_GROUP = 10  # ...or, up to this many rows, twice that share
STRICTEST = 0.995  # past this, a group still too large is split row by row
EXACT_ROWS = 20_000  # new rows linked by an exact scan up to this many, else by an IVF index
SPLIT_ORDER = ("train", "val", "test")  # ties between splits a group straddles go to the first
FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class Grouping:
    """How the split groups rows: by near-duplicates at `threshold` (and manifest groups),
    or not at all (`by="none"`: every row on its own, the plain stratified split)."""

    by: str = "near-duplicates"
    threshold: float = GROUP_THRESHOLD

    def record(self) -> dict[str, Any]:
        return {"by": self.by, "threshold": self.threshold if self.by != "none" else None}


Edge = tuple[int, int, float]  # (id, id, cosine similarity)


@dataclass
class Groups:
    """Groups of ids, and what was regrouped because it was too large to keep whole."""

    members: list[list[int]]
    regrouped: list[dict[str, Any]] = field(default_factory=list)

    def of(self) -> dict[int, int]:
        return {i: g for g, group in enumerate(self.members) for i in group}

    def note(self, threshold: float) -> str:
        """One line about the groups that were too large, or '' when none was."""
        if not self.regrouped:
            return ""
        big = max(self.regrouped, key=lambda r: r["size"])
        of = f"class {big['label']!r}" if big["classes"] == 1 else f"{big['classes']} classes"
        return (
            f"note: {len(self.regrouped)} near-duplicate group(s) at cosine >= {threshold} "
            f"were too large to keep in one split (the largest: {big['size']} images of {of}: "
            "links chain similar images); they were regrouped at a stricter cosine (up to "
            f"{max(r['regrouped_at'] for r in self.regrouped):.3f})"
        )


def knn_edges(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    vectors: np.ndarray,
    ids: np.ndarray,
    threshold: float,
    k: int = NEIGHBOURS,
    batch: int = 4096,
) -> list[Edge]:
    """Links from each row (`vectors`, `ids`) to its k nearest rows by `search` scoring at
    least `threshold` (itself left out)."""
    edges: list[Edge] = []
    for start in range(0, len(ids), batch):
        scores, found = search(normalize(vectors[start : start + batch]), k + 1)
        for qid, row_s, row_i in zip(ids[start : start + batch], scores, found, strict=True):
            keep = (row_i >= 0) & (row_s >= threshold) & (row_i != qid)
            pairs = zip(row_i[keep], row_s[keep], strict=True)
            edges.extend((int(qid), int(o), float(s)) for o, s in pairs)
    return edges


def exact_search(
    vectors: np.ndarray, ids: np.ndarray
) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """Nearest rows among `vectors` by cosine: an exact scan up to EXACT_ROWS rows, else an
    IVF index trained on a sample (near-duplicates sit in the same list, so few probes do)."""
    import faiss

    vectors = normalize(vectors)
    dim = vectors.shape[1]
    if len(ids) <= EXACT_ROWS:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        nlist = int(4 * math.sqrt(len(ids)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(ids), min(len(ids), 64 * nlist), False)
        index.train(vectors[np.sort(sample)])
        index.nprobe = 16
    index.add_with_ids(vectors, np.ascontiguousarray(ids, np.int64))
    return lambda q, k: index.search(q, min(k, index.ntotal))


def components(nodes: Iterable[int], edges: Iterable[Edge], threshold: float) -> list[list[int]]:
    """Connected components of the links scoring at least `threshold`."""
    parent = {n: n for n in nodes}

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b, s in edges:
        if s >= threshold and a in parent and b in parent:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    out: dict[int, list[int]] = {}
    for n in parent:
        out.setdefault(find(n), []).append(n)
    return [sorted(g) for g in out.values()]


def group_rows(
    labels: dict[int, str | None],
    edges: Sequence[Edge],
    threshold: float,
    same_group: dict[int, str] | None = None,
    class_sizes: Counter | None = None,
) -> Groups:
    """Groups of the ids of `labels` from near-duplicate links and shared group keys, with
    the too-large guard (see the module docstring): a class's size is `class_sizes` (all its
    rows, committed ones included), by default its count in `labels`."""
    keyed: dict[str, list[int]] = {}
    for i, key in (same_group or {}).items():
        keyed.setdefault(key, []).append(i)
    forced = [(g[0], other, 2.0) for g in keyed.values() for other in g[1:]]  # never loosened
    links = [*edges, *forced]
    per_class = class_sizes or Counter(lab for lab in labels.values() if lab is not None)

    def too_large(group: list[int]) -> str | None:
        named = Counter(labels[i] for i in group if labels[i] is not None)
        if not named:
            return None
        label, _ = named.most_common(1)[0]
        n = per_class[label]
        limit = max(MAX_SHARE * n, min(SMALL_GROUP, 2 * MAX_SHARE * n))
        return label if len(group) > limit else None

    done: list[list[int]] = []
    regrouped: list[dict[str, Any]] = []
    todo = [(g, threshold) for g in components(labels, links, threshold)]
    while todo:
        group, t = todo.pop()
        label = too_large(group) if len(group) > 1 else None
        if label is None:
            done.append(group)
            continue
        stricter = t + (1 - t) / 2
        if t == threshold:
            classes = len({labels[i] for i in group} - {None})
            regrouped.append(
                {"size": len(group), "label": label, "classes": classes, "regrouped_at": stricter}
            )
        else:
            regrouped[-1]["regrouped_at"] = max(regrouped[-1]["regrouped_at"], stricter)
        if t >= STRICTEST:
            pieces = components(group, [e for e in forced if e[0] in group], 2.0)
            done.extend(pieces)
            continue
        inside = set(group)
        own = [e for e in links if e[0] in inside and e[1] in inside]
        todo.extend((piece, stricter) for piece in components(group, own, stricter))
    done.sort(key=lambda g: g[0])
    return Groups(done, regrouped)


def assign_splits(
    groups: Groups,
    labels: dict[int, str | None],
    keys: dict[int, str],
    fixed: dict[int, str],
    seed: int,
    fractions: tuple[float, float, float] = FRACTIONS,
) -> tuple[dict[int, str], int]:
    """The split of every id of `labels` not in `fixed` (ids whose split is already set), and
    how many of them joined a group that had one. `keys` (the rows' content hashes) seed the
    order, as in `stratified_split`."""
    out: dict[int, str] = {}
    joined = 0
    free: list[tuple[str, list[int], str | None]] = []
    for group in groups.members:
        todo = [i for i in group if i not in fixed]
        if not todo:
            continue
        anchored = Counter(fixed[i] for i in group if i in fixed)
        if anchored:
            split = min(anchored, key=lambda s: (-anchored[s], SPLIT_ORDER.index(s)))
            out.update(dict.fromkeys(todo, split))
            joined += len(todo)
            continue
        named = Counter(labels[i] for i in todo if labels[i] is not None)
        label = named.most_common(1)[0][0] if named else None
        order = min(_rank(seed, keys[i]) for i in todo)
        free.append((order, todo, label))
    by_label: dict[str | None, list[tuple[str, list[int]]]] = {}
    for order, todo, label in free:
        by_label.setdefault(label, []).append((order, todo))
    for label, cut in by_label.items():
        if label is None:
            out.update({i: "train" for _, todo in cut for i in todo})  # for search only
            continue
        cut.sort()
        n = sum(len(todo) for _, todo in cut)
        n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
        n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
        filled = {"test": 0, "val": 0}
        for _, todo in cut:
            split = next(
                (s for s, cap in (("test", n_test), ("val", n_val)) if filled[s] < cap), None
            )
            split = split or "train"
            if split != "train":
                filled[split] += len(todo)
            out.update(dict.fromkeys(todo, split))
    return out, joined


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()
