"""Image sources: class-per-folder trees, CSV/Parquet manifests, folders of unlabelled images."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from extractors.common import HeadstartError
from extractors.images import IMAGE_EXTENSIONS, is_image_path

SPLITS = ("train", "val", "test")


class SourceError(HeadstartError, ValueError):
    """The source cannot be read as an image set; the message says what to do."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a source: where it is, its label (None when unlabelled), given split, and
    the group it belongs to (a manifest's `group` column: rows of a group share one split)."""

    path: str
    label: str | None = None
    split: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class Source:
    """A resolved image source."""

    root: str
    kind: str  # "folders" | "manifest" | "unlabelled" | "files"
    records: tuple[ImageRecord, ...]

    @property
    def name(self) -> str:
        """A short human name for the source (folder or manifest file stem)."""
        return Path(self.root).stem or "source"

    @property
    def labelled(self) -> bool:
        return any(r.label is not None for r in self.records)


def _walk_images(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.startswith(".") and is_image_path(fn):
                found.append(Path(dirpath) / fn)
    return found


def _abspath(p: Path) -> str:
    """Canonical path; a dangling symlink keeps its own name, so its failure names it."""
    return str(p.resolve() if p.exists() else p.absolute())


def _from_folder(root: Path, layout: str) -> Source:
    top_images = [p for p in root.iterdir() if p.is_file() and is_image_path(p)]
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if layout == "auto":
        layout = "folders" if class_dirs and not top_images else "unlabelled"
    if layout == "folders":
        records = [
            ImageRecord(_abspath(p), label=d.name) for d in class_dirs for p in _walk_images(d)
        ]
        return Source(str(root.resolve()), "folders", tuple(records))
    records = [ImageRecord(_abspath(p)) for p in _walk_images(root)]
    return Source(str(root.resolve()), "unlabelled", tuple(records))


def _from_manifest(path: Path) -> Source:
    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(path)
    except Exception as exc:
        raise SourceError(f"cannot read manifest {path}: {exc}") from None
    cols = set(table.column_names)
    if "path" not in cols:
        raise SourceError(
            f"manifest {path} has no 'path' column (columns: {sorted(cols)}); "
            "expected path,label[,split][,group]"
        )
    paths = table.column("path").to_pylist()
    labels = table.column("label").to_pylist() if "label" in cols else [None] * len(paths)
    splits = table.column("split").to_pylist() if "split" in cols else [None] * len(paths)
    groups = table.column("group").to_pylist() if "group" in cols else [None] * len(paths)
    records = []
    for i, (p, lab, spl, grp) in enumerate(zip(paths, labels, splits, groups, strict=True)):
        if p is None or str(p).strip() == "":
            raise SourceError(f"manifest {path}: row {i + 2} has an empty path")
        full = Path(p) if Path(p).is_absolute() else path.parent / p
        spl = None if spl is None or str(spl).strip() == "" else str(spl).strip().lower()
        if spl is not None and spl not in SPLITS:
            raise SourceError(
                f"manifest {path}: row {i + 2} has split {spl!r}; use one of {', '.join(SPLITS)}"
            )
        lab = None if lab is None or str(lab).strip() == "" else str(lab)
        grp = None if grp is None or str(grp).strip() == "" else str(grp)
        records.append(ImageRecord(str(full.resolve()), lab, spl, grp))
    return Source(str(path.resolve()), "manifest", tuple(records))


def read_source(source: str | Path, layout: str = "auto") -> Source:
    """Resolve a folder or manifest into records; `layout` is auto, folders or unlabelled.

    auto: a folder whose top level holds only sub-folders is read as one class per sub-folder;
    a folder with images at its top level is read as unlabelled (searched recursively);
    a .csv or .parquet file is a manifest with columns path,label[,split][,group] (rows of one
    group, e.g. the photos of one patient or one product, are kept in one split).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"source {path} does not exist: give a folder of images or a manifest")
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".parquet"):
            raise SourceError(f"{path} is a file but not a .csv or .parquet manifest")
        src = _from_manifest(path)
    else:
        if layout not in ("auto", "folders", "unlabelled"):
            raise SourceError(f"unknown layout {layout!r}: use auto, folders or unlabelled")
        src = _from_folder(path, layout)
    if not src.records:
        raise SourceError(
            f"no images found in {path} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "put images in it, one sub-folder per class for training heads"
        )
    return src


def read_sources(paths: list[str | Path], layout: str = "auto") -> Source:
    """One folder or manifest (as `read_source`), or any number of image files (unlabelled;
    a file that does not decode is then that file's failure, not the whole run's)."""
    paths = [Path(p).expanduser() for p in paths]
    if not paths:
        raise SourceError("give a folder, a .csv/.parquet manifest, or image files")
    one = paths[0]
    if len(paths) == 1 and (
        one.is_dir() or one.suffix.lower() in (".csv", ".parquet") or not one.exists()
    ):
        return read_source(one, layout)
    for p in paths:
        if p.is_dir() or p.suffix.lower() in (".csv", ".parquet"):
            raise SourceError(f"{p}: give one folder or manifest, or image files, not a mix")
    records = tuple(dict.fromkeys(ImageRecord(_abspath(p)) for p in paths))
    root = os.path.commonpath([str(Path(r.path).parent) for r in records])
    return Source(root, "files", records)


def stratified_split(
    keys: Sequence[str],
    labels: Sequence[str | None],
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> list[str]:
    """Seeded stratified train/val/test assignment, stable for a given set of keys.

    Within each label the keys are ordered by a seeded hash, then cut by `fractions`, with at
    least one val and one test image per class when the class has three or more.
    Unlabelled rows go to train (they are for search only).
    """
    by_label: dict[str | None, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    out = ["train"] * len(keys)
    for lab, idx in by_label.items():
        if lab is None:
            continue
        idx.sort(key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode()).hexdigest())
        n = len(idx)
        n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
        n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
        for j, i in enumerate(idx):
            if j < n_test:
                out[i] = "test"
            elif j < n_test + n_val:
                out[i] = "val"
    return out
