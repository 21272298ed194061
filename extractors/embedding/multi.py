"""Several backbones from one read: each image file is read once and decoded once for all of
them (once per JPEG draft scale when their fast decodes land on different ones, so each gets
the pixels it would get alone), each backbone's own PIL preprocessing runs on the decoded
image, then each backbone is batched and run on its own and its batches go to its own staging
writer. A file that cannot be read or decoded fails for every backbone that needed it. What a
multi-backbone `headstart run` embeds with (extractors/store/update_many.py);
the pieces are embed.py's (decode threads with a per-file timeout, collation, the model)."""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from extractors.embedding import objects
from extractors.embedding.backbones import Backbone
from extractors.embedding.embed import (
    DECODE_TIMEOUT_S,
    EmbeddedBatch,
    EmbedStats,
    SplitTransform,
    _batches,
    _collate,
    _progress,
    default_workers,
    run_model,
    split_transform,
)
from extractors.embedding.engines import LocalEngine
from extractors.embedding.images import FORMATS, ImageError, open_rgb
from extractors.store.layout import schema
from extractors.store.plan import Pending
from extractors.store.staging import StagingWriter, batch_table


def _read(path: str) -> bytes | None:
    """A file's or object's bytes, read once (extractors/embedding/objects.py); None when they
    cannot be read here (then `open_rgb` opens the path itself and says why it fails)."""
    try:
        return objects.read_bytes(path) or None
    except OSError:
        return None


def draft_groups(data: bytes | None, sides: dict[int, int | None]) -> dict[int | None, list[int]]:
    """The backbones (numbers) that share one decode of an image, by the side to decode it at
    (None: full size). Backbones whose JPEG draft scale (the reduced scale `open_rgb` decodes
    at for their own side, asked of Pillow) is the same share the largest of their sides; a
    file that is not a JPEG, or not read here, is decoded once for all."""
    if data is None or len(set(sides.values())) == 1:
        return {_largest(sides.values()): list(sides)}
    size: dict[int, tuple[int, int]] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            for t, side in sides.items():
                with Image.open(io.BytesIO(data), formats=FORMATS) as im:  # the header only
                    if im.format != "JPEG":
                        return {_largest(sides.values()): list(sides)}
                    if side is not None:
                        im.draft(im.mode if im.mode in ("RGB", "L") else None, (side, side))
                    size[t] = im.size
    except Exception:  # not an image: open_rgb says why, once, for all
        return {_largest(sides.values()): list(sides)}
    groups: dict[tuple[int, int], list[int]] = {}
    for t in sides:
        groups.setdefault(size[t], []).append(t)
    return {_largest(sides[t] for t in ts): ts for ts in groups.values()}


def _largest(sides: Iterable[int | None]) -> int | None:
    """The side one decode keeps for all of `sides`: the largest; None if any is None."""
    sides = list(sides)
    return None if None in sides or not sides else max(s for s in sides if s is not None)


class SharedDecode(Dataset):
    """Item i: file `paths[i]` read once and decoded for each backbone that needs it
    (`needs[i]`, their numbers), as (i, {number: tensor | reason}, width, height, error,
    seconds). Backbones whose fast decode lands on the same JPEG scale share one decode (all
    of them do, for any other file: `draft_groups`); each runs its own PIL preprocessing, so
    its pixels are the ones it would get alone. `error` (the file cannot be read or decoded)
    is for every backbone at once; a reason in place of a tensor is one backbone's own."""

    def __init__(
        self,
        paths: Sequence[str],
        needs: Sequence[tuple[int, ...]],
        backbones: Sequence[Backbone],
        fast_decode: bool = True,
    ):
        self.paths, self.needs = list(paths), list(needs)
        self.sides = [b.decode_side if fast_decode else None for b in backbones]
        self.transforms = [b.transform for b in backbones]
        self.splits: list[SplitTransform | None] = [split_transform(t) for t in self.transforms]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, dict[int, Any] | None, int, int, str | None, float]:
        start = time.perf_counter()
        data = _read(self.paths[i])
        groups = draft_groups(data, {t: self.sides[t] for t in self.needs[i]})
        pixels: dict[int, Any] = {}
        width = height = 0
        for n, (side, ts) in enumerate(groups.items()):
            try:
                src = self.paths[i] if data is None else io.BytesIO(data)
                img, width, height = open_rgb(src, side)
            except Exception as exc:
                why = str(exc) if isinstance(exc, ImageError) else f"cannot preprocess image: {exc}"
                if n == 0:  # the file itself cannot be read or decoded: for all
                    return i, None, 0, 0, why, time.perf_counter() - start
                pixels |= dict.fromkeys(ts, why)
                continue
            for t in ts:
                split = self.splits[t]
                try:
                    pixels[t] = split.to_uint8(img) if split else self.transforms[t](img)
                except Exception as exc:  # a transform that cannot handle this image
                    pixels[t] = f"cannot preprocess image: {exc}"
        return i, pixels, width, height, None, time.perf_counter() - start


def embed_many(
    backbones: Sequence[Backbone],
    path_lists: Sequence[Sequence[str]],
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
    stats: Sequence[EmbedStats] | None = None,
    fast_decode: bool = True,
    timeout: float = DECODE_TIMEOUT_S,
) -> Iterator[tuple[int, EmbeddedBatch]]:
    """Yield (backbone number, batch): backbone t embeds the files of `path_lists[t]`, and its
    batches' indices are positions in that list. Each file of the union is opened and decoded
    once; each backbone's batches hold `batch_size` of its own files (in the union's order:
    sorted by path), as `embed_files` would give it. Decode seconds are shared out among the
    backbones that needed the file; `stats[t]` gets backbone t's."""
    union = sorted(set().union(*path_lists))
    if not union:
        return
    stats = list(stats) if stats is not None else [EmbedStats() for _ in backbones]
    where = [{p: j for j, p in enumerate(paths)} for paths in path_lists]
    needs = [tuple(t for t, w in enumerate(where) if p in w) for p in union]
    dataset = SharedDecode(union, needs, backbones, fast_decode)
    workers = default_workers() if num_workers is None else num_workers
    buffers: list[list[tuple]] = [[] for _ in backbones]
    bar = _progress(len(union), f"embedding ({len(backbones)} backbones)") if progress else None
    start = time.perf_counter()

    def flush(t: int, items: list[tuple]) -> EmbeddedBatch:
        batch = run_model(backbones[t], _collate(items, dataset.splits[t]), stats[t])
        stats[t].images += len(items)
        stats[t].wall_s = time.perf_counter() - start
        return batch

    try:
        for items in _batches(dataset, batch_size, workers, prefetch=2, timeout=timeout):
            for i, pixels, width, height, error, seconds in items:
                for t in needs[i]:
                    got = None if pixels is None else pixels[t]
                    reason = error if error is not None else got if isinstance(got, str) else None
                    px = None if reason is not None else got
                    j = where[t][union[i]]
                    buffers[t].append((j, px, width, height, reason, seconds / len(needs[i])))
            for t, buf in enumerate(buffers):
                while len(buf) >= batch_size:
                    yield t, flush(t, buf[:batch_size])
                    del buf[:batch_size]
            if bar is not None:
                bar.set_postfix_str(stats[0].postfix(), refresh=False)
                bar.update(len(items))
        for t, buf in enumerate(buffers):
            if buf:
                yield t, flush(t, buf)
    finally:
        if bar is not None:
            bar.close()


def embed_into_staging(
    engine: LocalEngine,
    jobs: Sequence[tuple[Path, Backbone, list[Pending]]],
    stats: Sequence[EmbedStats],
) -> list[list[tuple[str, str]]]:
    """What `LocalEngine` does for one backbone, for several from one decode: job t's pending
    files embedded by its backbone into staging parts in its folder (each backbone its own
    writer thread). Returns each job's (path, reason) failures."""
    s = engine.settings
    for (_, backbone, pending), st in zip(jobs, stats, strict=True):
        engine.prepare(backbone, len(pending), st)
    schemas = [schema(b.dim, b.layer_dims) for _, b, _ in jobs]
    paths = [[p.path for p in pending] for _, _, pending in jobs]
    failures: list[list[tuple[str, str]]] = [[] for _ in jobs]
    with ExitStack() as writers_open:
        writers = [
            writers_open.enter_context(StagingWriter(folder, sch, engine.checkpoint_rows, st))
            for (folder, _, _), sch, st in zip(jobs, schemas, stats, strict=True)
        ]
        for t, batch in embed_many(
            [b for _, b, _ in jobs],
            paths,
            s.batch_size,
            s.decode_threads,
            engine.progress,
            stats=stats,
            fast_decode=s.fast_decode,
        ):
            failures[t].extend((paths[t][i], reason) for i, reason in batch.failures)
            if len(batch.indices):
                writers[t].put(batch_table(batch, jobs[t][2], schemas[t]))
    return failures
