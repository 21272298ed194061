"""A store's on-disk layout, the one place it is documented (docs/store.md points here): its
file names, the embeddings schema, ids, fingerprints and the default store directory.

One directory per (source, backbone):

    <store>/
      manifest.json        backbone, weights, preprocessing, dim, rows, created/updated,
                           source, split seed, labels, dataset fingerprint, index summary
      embeddings.parquet   one row per image:
                             id         int64   first 63 bits of the content SHA-256 (stable)
                             path       string  absolute path of the file; a path that is
                                        not valid UTF-8 (bytes like 0xff in a name: old shares,
                                        archives) is stored as a file:// URI of its
                                        percent-encoded bytes (RFC 8089), which no plain path
                                        starts with: `os_path` gives the path to open back
                             sha256     string  hex SHA-256 of the file's bytes
                             label      string  class name, null when unlabelled; bytes of a
                                        folder name that are not UTF-8 written as \\xNN
                             split      string  train | val | test
                             width      int32   decoded size, EXIF orientation applied
                             height     int32
                             bytes      int64   file size and modification time, used to skip
                             mtime_ns   int64   re-hashing unchanged files on re-runs
                             embedding  fixed_size_list<float32>[dim]  pooled penultimate features
                             emb_<module> fixed_size_list<float32>  pooled features of the
                                        extra layers asked for with --layers (manifest "layers")
      failures.parquet     files of the source that are not in the store: path, reason
                           (undecodable, unreadable, duplicate content of another path: the
                           manifest counts those as "duplicates", the rest as "failures")
      staging/             part-NNNNNN.parquet rows embedded by an update that has not committed
                           yet, same schema, split null unless given; staging.json its backbone.
                           A re-run after a crash reuses them; removed after the commit.
      index.faiss          FAISS index on L2-normalised embeddings, ids == `id`; its kind (flat,
                           hnsw, ivf_flat, ivf_pq), why it was chosen, the tuned search
                           parameters and the recall curve are the manifest's "index" entry
                           (extractors/index/maintain.py)
      rows.arrow           the rows' metadata for serving (id, path, label, split, width,
                           height, bytes, mtime_ns, row = position in embeddings.parquet),
                           sorted by id, label and split dictionary-encoded: an uncompressed
                           Arrow IPC file that search processes memory-map (one copy in the
                           page cache), stamped with the Parquet file it was made from
      vectors.f32          ivf_pq only: normalised float32 rows for exact re-ranking, read
      vector_ids.npy       memory-mapped; the ids file says which id each row holds, and
      vector_lookup.npy    the lookup the ids sorted and the row of each (written with it)
      heads/               fitted heads (skops) per training run, heads/latest.json -> best
      audit.parquet        the latest audit's findings (flows/steps/audit.py: path, id, label,
      audit.json           split, issue, score, suggested_label, related) and its summary,
                           with the fingerprint it audited; both or neither replaced
      .lock                held while a writer updates the store

Every file is written to a temporary name and renamed into place (the re-rank vectors are
appended past their committed length), so a reader sees the old or the new version, never a
torn one; `COMMIT_FILES` below lists every file a commit writes, for every index kind, and a
commit that fails at any write puts all of them back (extractors/store/rollback.py). The
manifest is written last and records the row count and fingerprint; an index that does not
match the Parquet ids (or, for ivf_pq, re-rank vectors that do not match their ids) is rebuilt
by the next update or `headstart index --rebuild`, and `Store.verify` lists anything on disk
that is not sound.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.parquet"
FAILURES = "failures.parquet"
# The reason of a file whose bytes another path of the source holds: listed in FAILURES (it is
# not a row) but counted apart, as a duplicate: the store is whole without it.
DUPLICATE = "duplicate content of "
INDEX = "index.faiss"
ROWS = "rows.arrow"
VECTORS = "vectors.f32"  # ivf_pq: normalised rows for exact re-ranking
VECTOR_IDS = "vector_ids.npy"
VECTOR_LOOKUP = "vector_lookup.npy"  # ivf_pq: (2, n) int64, the ids sorted and their rows
RERANK_FILES = (VECTORS, VECTOR_IDS, VECTOR_LOOKUP)  # ivf_pq's, written (or removed) together
INDEX_FILES = (INDEX, *RERANK_FILES)  # every index kind's files: flat, hnsw and ivf_flat use INDEX
# Every file a commit (an update, an index rebuild, a split move) may replace, grow or remove,
# whatever the index kind, in the order written; the rollback of a failed commit
# (extractors/store/rollback.py) keeps and restores exactly these. A writer of a new file adds
# it here.
COMMIT_FILES = (EMBEDDINGS, ROWS, FAILURES, *INDEX_FILES, MANIFEST)
GROWN_IN_PLACE = (VECTORS,)  # appended past the committed length rather than replaced
STAGING = "staging"
AUDIT, AUDIT_SUMMARY = "audit.parquet", "audit.json"
AUDIT_FILES = (AUDIT, AUDIT_SUMMARY)  # written together, or neither (Store.keep_audit)
AUDIT_ISSUES = ("label", "outlier", "near_duplicate")  # the kinds of audit findings
STAGING_TAG = "staging.json"
HEADS_DIR = "heads"  # fitted heads, a folder per training run (heads/train.py)
LATEST_HEADS = f"{HEADS_DIR}/latest.json"  # the last training run's heads and its best
CHECKPOINT_ROWS = 1024  # rows per staging part: at most this much work is redone after a crash


def schema(dim: int, layers: dict[str, int] | None = None) -> pa.Schema:
    """The Parquet schema of the embeddings table; `layers` adds {column: dim} feature columns."""
    extra = [(col, pa.list_(pa.float32(), d)) for col, d in (layers or {}).items()]
    return pa.schema(
        [
            ("id", pa.int64()),
            ("path", pa.string()),
            ("sha256", pa.string()),
            ("label", pa.string()),
            ("split", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("bytes", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("embedding", pa.list_(pa.float32(), dim)),
            *extra,
        ]
    )


META_COLUMNS = ["id", "path", "sha256", "label", "split", "width", "height", "bytes", "mtime_ns"]


# bytes and mtime_ns: a duplicate's `stat` when it was found (a scheduled check compares them
# instead of hashing it again); null for other failures and absent in older stores.
FAILURE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("reason", pa.string()),
        ("bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
    ]
)


def content_id(sha256_hex: str) -> int:
    """Stable int64 id from a content hash (first 63 bits, so it is never negative)."""
    return int(sha256_hex[:16], 16) >> 1


FILE_URI = "file://"  # the prefix of a stored path that is not valid UTF-8 (never of a plain one)


def stored_path(path: str) -> str:
    """The `path` column's text for an absolute path as Python's os functions give it: the
    path itself, or, when it is not valid UTF-8 (undecodable bytes, held as surrogates), a
    file:// URI of its percent-encoded bytes. Reversible: `os_path(stored_path(p)) == p`."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return FILE_URI + urllib.parse.quote(os.fsencode(path), safe="/")
    return path


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # a scheme: s3://, gs://, https://


def is_url(path: str) -> bool:
    """True for a URL fsspec opens (s3://bucket/key, https://host/a.jpg: a `path` value of an
    object, extractors/embedding/objects.py); False for a local path, including one stored as
    a file:// URI (`stored_path`: its name is not valid UTF-8)."""
    return bool(URL.match(path)) and not path.startswith(FILE_URI)


def absolute(source: str | Path) -> str:
    """A source as a location that means the same from any folder: a URL as it is, a local
    path made absolute."""
    text = str(source)
    return text if is_url(text) else str(Path(text).expanduser().resolve())


def os_path(stored: str) -> str:
    """The path to open for a `path` value (see `stored_path`): plain paths as they are."""
    if stored.startswith(FILE_URI):
        return os.fsdecode(urllib.parse.unquote_to_bytes(stored[len(FILE_URI) :]))
    return stored


def stored_name(name: str) -> str:
    """A file or folder name as text for a label: bytes that are not UTF-8 as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def slug(text: str) -> str:
    """File-system-safe short name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def default_store_dir(workspace: str | Path, source_root: str, backbone: str) -> Path:
    """data/stores/<source name>-<path hash>__<backbone>: one store per (source, backbone); a
    source in object storage (a URL) is named by its URL."""
    if is_url(source_root):
        url = source_root.rstrip("/")
        stem, tag = Path(url.rsplit("/", 1)[-1]).stem, hashlib.sha256(url.encode()).hexdigest()[:6]
    else:
        root = Path(os_path(source_root)).resolve()
        stem, tag = stored_name(root.stem), hashlib.sha256(os.fsencode(root)).hexdigest()[:6]
    return Path(workspace) / "stores" / f"{slug(stem)}-{tag}__{slug(backbone)}"


def embedding_matrix(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """A fixed-size-list column as a (rows, dim) float32 matrix, without a Python loop."""
    col = table[column].combine_chunks()
    dim = col.type.list_size
    if len(col) == 0:
        return np.zeros((0, dim), np.float32)
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), dim)


def fingerprint(table: pa.Table) -> str:
    """Dataset fingerprint: hash of the sorted (sha256, label, split) triples."""
    h = hashlib.sha256()
    rows = sorted(
        zip(
            table["sha256"].to_pylist(),
            table["label"].to_pylist(),
            table["split"].to_pylist(),
            strict=True,
        ),
        key=lambda r: r[0],
    )
    for sha, label, split in rows:
        h.update(f"{sha}\t{label}\t{split}\n".encode())
    return h.hexdigest()[:16]
