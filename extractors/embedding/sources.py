"""Image sources: class-per-folder trees, CSV/Parquet manifests, folders of unlabelled images."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import math
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from extractors.common import HeadstartError
from extractors.embedding import objects
from extractors.embedding.images import IMAGE_EXTENSIONS, is_image_path
from extractors.store.layout import os_path, stored_name, stored_path

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
    # url -> (bytes, mtime_ns) of the objects a listing found (extractors/embedding/objects.py):
    # an update reads their stamps from here instead of asking the object store again.
    stamps: Mapping[str, objects.Stamp] = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        """A short human name for the source (folder, prefix or manifest file stem)."""
        return source_name(self.root)

    @property
    def labelled(self) -> bool:
        return any(r.label is not None for r in self.records)


def source_name(source: str | Path) -> str:
    """A source's short name (its folder's, prefix's or manifest's stem): the default
    experiment and store names."""
    return Path(str(source).rstrip("/").rsplit("/", 1)[-1]).stem or "source"


def _walk_images(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.startswith(".") and is_image_path(fn):
                found.append(Path(dirpath) / fn)
    return found


def _abspath(p: Path) -> str:
    """Canonical path as stored (extractors/store/layout.py `stored_path`: a name that is not UTF-8
    kept losslessly); a dangling symlink keeps its own name, so its failure names it."""
    return stored_path(str(p.resolve() if p.exists() else p.absolute()))


def _unique(records: list[ImageRecord], where: str) -> tuple[ImageRecord, ...]:
    """Each file once: the same path listed twice (a manifest row repeated, a class folder
    that links to another, a link to a file of another class) is one image; listed with two
    labels, splits or groups it is an error naming them, not the first one kept silently."""
    first: dict[str, ImageRecord] = {}
    clashes: dict[str, list[ImageRecord]] = {}
    for rec in records:
        seen = first.setdefault(rec.path, rec)
        if seen != rec:
            clashes.setdefault(rec.path, [seen]).append(rec)
    if clashes:
        shown = []
        for path, recs in list(clashes.items())[:3]:
            what = ", ".join(
                dict.fromkeys(
                    "/".join(str(v) for v in (r.label, r.split, r.group) if v is not None) or "-"
                    for r in recs
                )
            )
            shown.append(f"{path} -> {what}")
        more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
        raise SourceError(
            f"{where} lists {len(clashes)} file(s) with conflicting labels (label/split/group): "
            f"{'; '.join(shown)}{more}. Give each file one label (a linked class folder or a "
            "repeated manifest row names the same file twice)"
        )
    return tuple(first.values())


def _from_folder(root: Path, layout: str) -> Source:
    top_images = [p for p in root.iterdir() if p.is_file() and is_image_path(p)]
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if layout == "auto":
        layout = "folders" if class_dirs and not top_images else "unlabelled"
    if layout == "folders":
        records = [
            ImageRecord(_abspath(p), label=stored_name(d.name))
            for d in class_dirs
            for p in _walk_images(d)
        ]
        return Source(_abspath(root), "folders", _unique(records, f"folder {root}"))
    records = [ImageRecord(_abspath(p)) for p in _walk_images(root)]
    return Source(_abspath(root), "unlabelled", _unique(records, f"folder {root}"))


MANIFEST_COLUMNS = ("path", "label", "split", "group")


def _read_manifest(path: str) -> pa.Table:
    """A manifest (a local file, or an object fsspec opens) as a table; a CSV's cells as the
    text a person wrote (no type guessing: `007` stays `007`, `NA` is a class), an empty
    cell missing."""
    try:
        data = io.BytesIO(objects.read_bytes(path))
        if path.lower().endswith(".parquet"):
            return pq.read_table(data)
        text = io.TextIOWrapper(data, encoding="utf-8-sig", newline="")
        names = next(csv.reader(text), [])
        text.detach()
        data.seek(0)
        return pacsv.read_csv(
            data,
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                strings_can_be_null=True,
                null_values=[""],
            ),
        )
    except Exception as exc:
        shown = objects.failure_reason(exc) if isinstance(exc, OSError) else exc
        raise SourceError(f"cannot read manifest {path}: {shown}") from None


def _column_text(table: pa.Table, name: str, where: str) -> list[str | None]:
    """A manifest column as text, each value as a person would write it in a CSV: missing
    (null, NaN, empty, blank) as None; numbers in a column whose numbers are all whole without
    a decimal point (a float column with gaps, as pandas writes it: 1.0 -> "1", like an integer
    column); true/false as "True"/"False". Lists, dates and other types are refused."""
    col = table.column(name)
    kind = col.type
    if pa.types.is_dictionary(kind):
        col, kind = col.cast(kind.value_type), kind.value_type
    values = col.to_pylist()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind):
        text = [None if v is None or not v.strip() else v.strip() for v in values]
        numbers = [t for t in text if t is not None]
        if numbers and all(_WHOLE.fullmatch(t) for t in numbers):
            text = [None if t is None else t.split(".")[0] for t in text]
        return text
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return [None if v is None else str(v) for v in values]
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        numbers = [v for v in values if v is not None and not math.isnan(v)]
        whole = all(float(v).is_integer() for v in numbers)
        return [
            None if v is None or math.isnan(v) else str(int(v)) if whole else str(v) for v in values
        ]
    raise SourceError(
        f"{where}: column {name!r} holds {kind}, not text or numbers; write one "
        f"{'file path' if name == 'path' else 'value'} per row"
    )


_WHOLE = re.compile(r"[+-]?[0-9]+\.0*")  # a whole number written as a float ("1.0")


def _from_manifest(path: str) -> Source:
    table = _read_manifest(path)
    where = f"manifest {path}"
    # " Label" or "PATH" (a spreadsheet's header) names the column, not a column ignored.
    names = [
        n.strip().lower() if n.strip().lower() in MANIFEST_COLUMNS else n
        for n in table.column_names
    ]
    twice = sorted(n for n in set(names) if names.count(n) > 1 and n in MANIFEST_COLUMNS)
    if twice:
        raise SourceError(f"{where} has more than one {twice[0]!r} column: keep one")
    table = table.rename_columns(names)
    cols = set(names)
    if "path" not in cols:
        raise SourceError(
            f"{where} has no 'path' column (columns: {sorted(cols)}); "
            "expected path,label[,split][,group]"
        )
    kind = table.schema.field("path").type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise SourceError(
            f"{where}: column 'path' holds {kind}, not text; write one file path per row"
        )
    paths = table.column("path").to_pylist()
    none = [None] * len(paths)
    labels, splits, groups = (
        _column_text(table, c, where) if c in cols else none for c in MANIFEST_COLUMNS[1:]
    )
    records = []
    for i, (p, lab, spl, grp) in enumerate(zip(paths, labels, splits, groups, strict=True)):
        if p is None or not p.strip():
            if lab is None and spl is None and grp is None:
                continue  # an empty row
            raise SourceError(f"{where}: row {i + 2} has an empty path")
        spl = None if spl is None else spl.lower()
        if spl is not None and spl not in SPLITS:
            raise SourceError(
                f"{where}: row {i + 2} has split {spl!r}; use one of {', '.join(SPLITS)}"
            )
        records.append(ImageRecord(_listed_path(p.strip(), path), lab, spl, grp))
    root = path if objects.is_url(path) else _abspath(Path(path))
    return Source(root, "manifest", _unique(records, where))


def _listed_path(p: str, manifest: str) -> str:
    """A manifest's path as stored: a URL as it is; a relative path against the manifest's
    own folder (or prefix, for a manifest in object storage); a store's own path column
    (file:// URIs) read back as it was."""
    if objects.is_url(p):
        return _plain_url(p, f"manifest {manifest}")
    if objects.is_url(manifest):
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(manifest), p))
        joined = joined.replace(":/", "://", 1)
        if urlsplit(joined).netloc != urlsplit(manifest).netloc:
            raise SourceError(
                f"manifest {manifest}: the path {p!r} leads out of its bucket; give a full URL"
            )
        return joined
    p = os_path(p)
    return _abspath(Path(p) if Path(p).is_absolute() else Path(manifest).parent / p)


def _plain_url(url: str, where: str) -> str:
    """`url`, refused when it carries credentials (user:password@, a presigned signature):
    they would be stored in the store's rows and printed."""
    parts = urlsplit(url)
    if parts.username or parts.password or "signature=" in parts.query.lower():
        raise SourceError(
            f"{where}: a URL with credentials in it ({parts.scheme}://{parts.hostname}/…); "
            "give the credentials in the environment or ~/.aws/credentials, never in a path"
        )
    return url


def _from_prefix(url: str, layout: str) -> Source:
    """The objects under a prefix (s3://bucket/photos/), read as a folder is: one class per
    sub-prefix when the prefix holds only sub-prefixes, else unlabelled; keys starting with
    a dot skipped. Their stamps come from the one listing (no request per object)."""
    root = url.rstrip("/")
    listed = {
        u: st
        for u, st in objects.list_objects(root + "/").items()
        if is_image_path(u) and not any(s.startswith(".") for s in u[len(root) + 1 :].split("/"))
    }
    nested = any("/" in u[len(root) + 1 :] for u in listed)
    top = any("/" not in u[len(root) + 1 :] for u in listed)
    if layout == "auto":
        layout = "folders" if nested and not top else "unlabelled"
    if layout == "folders":
        records = [
            ImageRecord(u, label=u[len(root) + 1 :].split("/")[0])
            for u in listed
            if "/" in u[len(root) + 1 :]
        ]
        return Source(root, "folders", tuple(records), stamps=listed)
    return Source(root, "unlabelled", tuple(ImageRecord(u) for u in listed), stamps=listed)


def read_source(source: str | Path, layout: str = "auto") -> Source:
    """Resolve a folder, prefix or manifest into records; `layout` is auto, folders or unlabelled.

    auto: a folder whose top level holds only sub-folders is read as one class per sub-folder;
    a folder with images at its top level is read as unlabelled (searched recursively);
    a .csv or .parquet file is a manifest with columns path,label[,split][,group] (rows of one
    group, e.g. the photos of one patient or one product, are kept in one split), each column
    read as text a person wrote (`_column_text`), so a CSV and a Parquet of one table agree.
    A URL fsspec opens (s3://bucket/prefix/, a manifest at s3://bucket/list.csv) is read the
    same way, its paths URLs (extractors/embedding/objects.py). Each file is listed once
    (paths resolved); one file with two labels is a SourceError.
    """
    if layout not in ("auto", "folders", "unlabelled"):
        raise SourceError(f"unknown layout {layout!r}: use auto, folders or unlabelled")
    if objects.is_url(str(source)):
        url = _plain_url(str(source), "source")
        return _nonempty(_from_url(url, layout), url)
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"source {path} does not exist: give a folder of images or a manifest")
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".parquet"):
            raise SourceError(f"{path} is a file but not a .csv or .parquet manifest")
        return _nonempty(_from_manifest(str(path)), str(path))
    return _nonempty(_from_folder(path, layout), str(path))


def _from_url(url: str, layout: str) -> Source:
    if _is_manifest(url):
        return _from_manifest(url)
    try:
        return _from_prefix(url, layout)
    except OSError as exc:
        why = (
            "no such bucket" if isinstance(exc, FileNotFoundError) else objects.failure_reason(exc)
        )
        raise SourceError(
            f"cannot list {url}: {why} (check the bucket, the credentials and, for an "
            "S3-compatible server, AWS_ENDPOINT_URL)"
        ) from None


def _nonempty(src: Source, where: str) -> Source:
    if not src.records:
        raise SourceError(
            f"no images found in {where} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "put images in it, one sub-folder per class for training heads"
        )
    return src


def _is_manifest(path: str) -> bool:
    return path.lower().endswith((".csv", ".parquet"))


def read_sources(paths: list[str | Path], layout: str = "auto") -> Source:
    """One folder, prefix or manifest (as `read_source`), or any number of image files or
    object URLs (unlabelled; a file that does not decode is then that file's failure, not
    the whole run's)."""
    if not paths:
        raise SourceError("give a folder, a .csv/.parquet manifest, or image files")
    texts = [str(p) for p in paths]
    if any(objects.is_url(t) for t in texts):
        if len(texts) == 1 and (_is_manifest(texts[0]) or not is_image_path(texts[0])):
            return read_source(texts[0], layout)
        if not all(objects.is_url(t) and is_image_path(t) for t in texts):
            raise SourceError(
                "give one prefix or manifest, or image URLs (or local files), not a mix"
            )
        records = tuple(dict.fromkeys(ImageRecord(_plain_url(t, "image")) for t in texts))
        folders = [t.rsplit("/", 1)[0].split("/") for t in texts]
        same = itertools.takewhile(lambda c: len(set(c)) == 1, zip(*folders, strict=False))
        root = "/".join(c[0] for c in same)
        return Source(root, "files", records)
    local = [Path(p).expanduser() for p in paths]
    one = local[0]
    if len(local) == 1 and (one.is_dir() or _is_manifest(one.name) or not one.exists()):
        return read_source(one, layout)
    for p in local:
        if p.is_dir() or _is_manifest(p.name):
            raise SourceError(f"{p}: give one folder or manifest, or image files, not a mix")
    records = tuple(dict.fromkeys(ImageRecord(_abspath(p)) for p in local))
    root = os.path.commonpath([str(Path(os_path(r.path)).parent) for r in records])
    return Source(stored_path(root), "files", records)


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
