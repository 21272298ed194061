"""The group-aware split: re-encoded, resized copies of real photos never span two splits under
the default split (and do under `--split-groups none`), new copies join their original's
split, a manifest's groups share a split, chains too large to keep whole are regrouped, and
`fix-splits` moves the rows of an older store out of the test split."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from extractors.embedding.sources import read_source, stratified_split
from extractors.store.dedup import split_groups, split_moves
from extractors.store.grouping import Grouping, assign_splits, group_rows
from extractors.store.store import Store

PHOTOS = {  # three classes of real photos; each photo gives crops, each crop copies
    "animal": ("chelsea", "astronaut", "coffee"),
    "thing": ("rocket", "camera", "coins"),
    "texture": ("gravel", "brick", "grass"),
}


def _photo_set(root: Path, crops: int = 3, copies: int = 2, seed: int = 0) -> dict[str, list]:
    """256-px crops of real photos in class folders, each with `copies` copies re-encoded as
    JPEG (quality 60-95) and resized by up to ±15%: {original path: [copy paths]}."""
    rng = np.random.default_rng(seed)
    families: dict[str, list] = {}
    for label, names in PHOTOS.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for name in names:
            img = Image.fromarray(getattr(data, name)()).convert("RGB")
            w, h = img.size
            for c in range(crops):
                x, y = int(rng.integers(0, w - 256)), int(rng.integers(0, h - 256))
                crop = img.crop((x, y, x + 256, y + 256))
                orig = root / label / f"{name}_{c}.png"
                crop.save(orig)
                family = []
                for k in range(copies):
                    side = int(256 * rng.uniform(0.85, 1.15))
                    out = root / label / f"{name}_{c}_copy{k}.jpg"
                    crop.resize((side, side), Image.BICUBIC).save(
                        out, quality=int(rng.integers(60, 96))
                    )
                    family.append(str(out.resolve()))
                families[str(orig.resolve())] = family
    return families


def _splits(store: Store) -> dict[str, str]:
    t = store.table(["path", "split"])
    return dict(zip(t["path"].to_pylist(), t["split"].to_pylist(), strict=True))


def _spanning(families: dict[str, list], splits: dict[str, str]) -> list[tuple[str, str]]:
    return [
        (a, b)
        for orig, family in families.items()
        for a, b in itertools.combinations([orig, *family], 2)
        if splits[a] != splits[b]
    ]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("grouping") / "photos"
    return root, _photo_set(root)


def test_copies_of_real_photos_never_span_two_splits(photos, backbone, tmp_path) -> None:
    root, families = photos
    grouped = Store(tmp_path / "grouped")
    report = grouped.update(read_source(root), backbone, progress=False)
    splits = _splits(grouped)
    assert _spanning(families, splits) == []
    # Every image has copies, so every image is in a group (crops of one photo may share one).
    assert report.grouping["grouped_rows"] == 3 * len(families)
    assert 9 <= report.grouping["groups"] <= len(families)
    for label in PHOTOS:  # still a stratified split: every class has val and test images
        assert {s for p, s in splits.items() if f"/{label}/" in p} == {"train", "val", "test"}
    m = grouped.manifest()
    assert m["split_groups"]["by"] == "near-duplicates" and m["split_groups"]["threshold"] == 0.8
    # The same images split row by row put some copies on the other side of their original.
    plain = Store(tmp_path / "plain")
    plain.update(read_source(root), backbone, progress=False, grouping=Grouping("none"))
    assert len(_spanning(families, _splits(plain))) > 5
    assert plain.manifest()["split_groups"] == {
        "by": "none", "threshold": None, "groups": 0, "grouped_rows": 0, "joined": 0,
        "regrouped": [],
    }  # fmt: skip
    # ...which `fix-splits` repairs, moving rows out of the test split and never into it.
    groups, meta = split_groups(plain, Grouping())
    moves = split_moves(groups, meta)
    assert moves and all(m["to"] != "test" for m in moves)
    before = plain.manifest()["fingerprint"]
    plain.move_splits({m["id"]: m["to"] for m in moves}, {"fixed": {"moved": len(moves)}})
    assert _spanning(families, _splits(plain)) == []
    assert plain.manifest()["fingerprint"] != before
    assert plain.manifest()["splits"]["test"] < Store(tmp_path / "grouped").manifest()["rows"]
    assert split_moves(*split_groups(plain, Grouping())) == []  # a re-run moves nothing


def test_new_copies_take_the_split_of_their_original(photos, backbone, tmp_path) -> None:
    root, families = photos
    first = tmp_path / "first"
    for orig in families:  # the originals first, then their copies in a later update
        rel = Path(orig).relative_to(root.resolve())
        (first / rel.parent).mkdir(parents=True, exist_ok=True)
        (first / rel).write_bytes(Path(orig).read_bytes())
    store = Store(tmp_path / "store")
    store.update(read_source(first), backbone, progress=False)
    before = _splits(store)
    for family in families.values():
        for copy in family:
            rel = Path(copy).relative_to(root.resolve())
            (first / rel).write_bytes(Path(copy).read_bytes())
    report = store.update(read_source(first), backbone, progress=False)
    after = _splits(store)
    assert all(after[p] == s for p, s in before.items())  # committed rows keep their splits
    assert report.grouping["joined"] >= 0.9 * sum(len(f) for f in families.values())
    renamed = {str((first / Path(o).relative_to(root.resolve())).resolve()): [
        str((first / Path(c).relative_to(root.resolve())).resolve()) for c in f
    ] for o, f in families.items()}  # fmt: skip
    assert _spanning(renamed, after) == []


def test_rows_of_a_manifest_group_share_one_split(digits_dir, backbone, tmp_path) -> None:
    files = sorted(p for p in digits_dir.rglob("*.png"))
    groups = {f: f"writer{i % 7}" for i, f in enumerate(files)}  # 7 "writers", ~14 images each
    manifest = tmp_path / "m.csv"
    rows = [f"{f},{f.parent.name},{g}" for f, g in groups.items()]
    manifest.write_text("path,label,group\n" + "\n".join(rows) + "\n")
    store = Store(tmp_path / "store")
    store.update(read_source(manifest), backbone, progress=False, grouping=Grouping(threshold=1.0))
    splits = _splits(store)
    by_group: dict[str, set] = {}
    for f, g in groups.items():
        by_group.setdefault(g, set()).add(splits[str(f.resolve())])
    assert all(len(s) == 1 for s in by_group.values())
    assert {s for ss in by_group.values() for s in ss} == {"train", "val", "test"}


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_without_near_duplicates_the_split_is_the_row_wise_one(seed: int) -> None:
    rng = np.random.default_rng(seed)
    keys = [f"{i:064x}" for i in rng.integers(0, 2**62, 300)]
    labels = [str(x) for x in rng.integers(0, 4, 300)]
    ids = dict(enumerate(labels))
    groups = group_rows(ids, [], 0.8)
    got, joined = assign_splits(groups, ids, dict(enumerate(keys)), {}, seed)
    assert [got[i] for i in range(300)] == stratified_split(keys, labels, seed) and joined == 0


def test_a_chain_too_large_to_keep_whole_is_regrouped_stricter() -> None:
    labels = dict.fromkeys(range(100), "a")
    chain = [(i, i + 1, 0.85) for i in range(99)]  # links a whole class at 0.80
    twins = [(10, 11, 0.99), (40, 41, 0.97)]  # two true near-duplicate pairs within it
    groups = group_rows(labels, chain + twins, 0.8)
    assert groups.regrouped == [{"size": 100, "label": "a", "classes": 1, "regrouped_at": 0.9}]
    assert [10, 11] in groups.members and [40, 41] in groups.members
    assert len(groups.members) == 98 and "100 images of class 'a'" in groups.note(0.8)
    split, _ = assign_splits(groups, labels, {i: f"{i:x}" for i in range(100)}, {}, 0)
    assert split[10] == split[11] and split[40] == split[41]


def test_a_group_joins_the_split_most_of_its_committed_rows_have() -> None:
    from collections import Counter

    labels = dict.fromkeys(range(5), "a")
    links = [(0, 1, 0.9), (0, 2, 0.9), (0, 3, 0.9)]
    groups = group_rows(labels, links, 0.8, class_sizes=Counter(a=100))  # the store's class
    fixed = {1: "test", 2: "val", 3: "val"}  # committed rows (a leak already)
    split, joined = assign_splits(groups, labels, {i: str(i) for i in range(5)}, fixed, 0)
    assert split[0] == "val" and joined == 1 and 1 not in split


def test_in_small_classes_a_group_never_takes_a_whole_split() -> None:
    labels = {i: str(i // 5) for i in range(50)}  # 10 classes of 5, each one chained group
    edges = [(i, i + 1, 0.85) for i in range(49) if i // 5 == (i + 1) // 5]
    groups = group_rows(labels, edges, 0.8)
    assert max(len(g) for g in groups.members) <= 2
    split, _ = assign_splits(groups, labels, {i: f"{i:x}" for i in range(50)}, {}, 0)
    for c in range(10):
        assert {split[i] for i in range(5 * c, 5 * c + 5)} == {"train", "val", "test"}
