"""Several backbones from one read (issue 30): a multi-backbone update opens each image of the
source once to decode it (and once to hash it) for all its stores, where separate updates open
it once per store for each; the stores hold what separate `Store.update` calls give (large
JPEGs included, whose fast decode differs per backbone), failures included."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from extractors.embedding.engines import LocalEngine
from extractors.embedding.multi import draft_groups
from extractors.embedding.sources import read_source
from extractors.settings import EmbedSettings
from extractors.store.store import Store
from extractors.store.update_many import update_many

SETTINGS = EmbedSettings(batch_size=4)  # several batches per backbone, a failure among them
# JPEG sizes: lite0 (side 256) decodes the first at 1/2 and lite1 (272) at full size; both
# decode the second at 1/2.
SIZES = {"apart": (800, 530), "shared": (1200, 900)}


class _Opens:
    """Counts `open` audit events on watched files (every thread), telling the opens that hash
    a file (file_sha256 on the stack) from the others (the decode)."""

    def __init__(self) -> None:
        self.watched: set[str] = set()
        self.hashed: Counter[str] = Counter()
        self.decoded: Counter[str] = Counter()
        self.lock = threading.Lock()
        sys.addaudithook(self._hook)  # stays for the session: idle when nothing is watched

    def _hook(self, event: str, args: tuple) -> None:
        if event != "open" or not self.watched or not isinstance(args[0], str | os.PathLike):
            return
        path = os.path.realpath(os.fspath(args[0]))
        if path not in self.watched:
            return
        frame, hashing = sys._getframe(1), False
        while frame is not None and not hashing:
            hashing = frame.f_code.co_name == "file_sha256"
            frame = frame.f_back
        with self.lock:
            (self.hashed if hashing else self.decoded)[path] += 1

    @contextmanager
    def watching(self, paths: list[str]) -> Iterator[_Opens]:
        self.hashed.clear()
        self.decoded.clear()
        self.watched = {os.path.realpath(p) for p in paths}
        try:
            yield self
        finally:
            self.watched = set()


OPENS = _Opens()


@pytest.fixture(scope="module")
def lite1():
    from extractors.embedding.backbones import create_backbone

    return create_backbone("efficientnet_lite1", device="cpu")


@pytest.fixture(scope="module")
def source_dir(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes: real digits (PNG), a real photo as JPEGs (too small for a reduced decode;
    large enough for lite0 and lite1 to decode it at different scales; larger, at one), and a
    file named like an image that does not decode."""
    root = tmp_path_factory.mktemp("multi") / "src"
    for label in ("0", "1"):
        (root / label).mkdir(parents=True)
        for f in sorted((digits_dir / label).iterdir())[:5]:
            shutil.copy(f, root / label / f.name)
    photo = Image.fromarray(data.chelsea())
    photo.save(root / "0" / "chelsea.jpg", quality=92)
    for size in SIZES.values():
        photo.resize(size, Image.BICUBIC).save(root / "1" / f"chelsea-{size[0]}.jpg", quality=92)
    (root / "1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    return root


def _embeddings(store: Store) -> dict[str, np.ndarray]:
    t = store.table(["path", "embedding"]).to_pydict()
    return {p: np.asarray(e, np.float32) for p, e in zip(t["path"], t["embedding"], strict=True)}


def _splits(store: Store) -> dict[str, str]:
    t = store.table(["path", "split"]).to_pydict()
    return dict(zip(t["path"], t["split"], strict=True))


def test_each_image_is_read_once_for_all_backbones(
    source_dir: Path, backbone, lite1, tmp_path: Path
) -> None:
    src = read_source(source_dir)
    images = [r.path for r in src.records]
    nets = (backbone, lite1)
    with OPENS.watching(images) as apart:
        separate = [
            Store(tmp_path / f"apart-{i}").update(
                src, net, progress=False, engine=LocalEngine(SETTINGS, progress=False)
            )
            for i, net in enumerate(nets)
        ]
    assert set(apart.decoded.values()) == {2} and len(apart.decoded) == len(images)
    assert set(apart.hashed.values()) == {2}
    stores = [Store(tmp_path / f"together-{i}") for i in range(2)]
    with OPENS.watching(images) as together:
        reports = update_many(
            list(zip(stores, nets, strict=True)),
            src,
            engine=LocalEngine(SETTINGS, progress=False),
        )
    assert set(together.decoded.values()) == {1} and len(together.decoded) == len(images)
    assert set(together.hashed.values()) == {1}
    for i, report in enumerate(reports):
        alone = Store(separate[i].store)
        assert (report.embedded, report.failed, report.rows) == (13, 1, 13)
        assert report.failures == separate[i].failures
        assert report.failures[0][0].endswith("broken.jpg")
        assert stores[i].failures().to_pydict() == alone.failures().to_pydict()
        assert _splits(stores[i]) == _splits(alone)
        got, want = _embeddings(stores[i]), _embeddings(alone)
        assert got.keys() == want.keys()
        for path, vector in want.items():
            np.testing.assert_allclose(got[path], vector, atol=1e-5, rtol=0)
        m, n = stores[i].manifest(), alone.manifest()
        assert (m["backbone"], m["fingerprint"], m["rows"]) == (n["backbone"], n["fingerprint"], 13)


def test_a_file_a_store_holds_is_embedded_only_for_the_store_that_lacks_it(
    source_dir: Path, backbone, lite1, tmp_path: Path
) -> None:
    src = read_source(source_dir)
    engine = LocalEngine(SETTINGS, progress=False)
    held = Store(tmp_path / "held")
    held.update(src, backbone, progress=False, engine=engine)
    before = _embeddings(held)
    fresh = Store(tmp_path / "fresh")
    images = [r.path for r in src.records]
    with OPENS.watching(images) as opens:
        kept, new = update_many([(held, backbone), (fresh, lite1)], src, engine=engine)
    assert (kept.embedded, kept.kept, new.embedded) == (0, 13, 13)
    assert set(opens.decoded.values()) == {1} and len(opens.decoded) == len(images)
    assert set(opens.hashed.values()) <= {1}  # the held store's hashes are reused
    after = _embeddings(held)
    assert all(np.array_equal(after[p], v) for p, v in before.items())


def test_backbones_share_a_decode_where_their_jpeg_scales_agree(
    source_dir: Path, backbone, lite1
) -> None:
    sides = {0: backbone.decode_side, 1: lite1.decode_side}
    assert sides == {0: 256, 1: 272}
    for name, size in SIZES.items():
        jpeg = (source_dir / "1" / f"chelsea-{size[0]}.jpg").read_bytes()
        want = {256: [0], 272: [1]} if name == "apart" else {272: [0, 1]}
        assert draft_groups(jpeg, sides) == want
    png = next((source_dir / "0").glob("*.png")).read_bytes()
    assert draft_groups(png, sides) == {272: [0, 1]}  # no reduced decode but a JPEG's
    assert draft_groups(b"not an image", sides) == {272: [0, 1]}
    assert draft_groups(None, sides) == {272: [0, 1]}
    assert draft_groups(jpeg, {0: None, 1: None}) == {None: [0, 1]}  # --no-fast-decode
