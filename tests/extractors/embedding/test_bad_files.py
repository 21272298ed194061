"""The bad-file corpus: every file is either embedded correctly or recorded with a reason."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from skimage import data

from extractors.embedding.embed import embed_files
from extractors.embedding.sources import read_source
from extractors.store.store import Store


def _photo(size: tuple[int, int] = (160, 120)) -> Image.Image:
    return Image.fromarray(data.chelsea()).resize(size, Image.BICUBIC)


def _corpus(root: Path) -> dict[str, Path]:
    """Write the corpus; returns name -> reference image path for files that must embed."""
    root.mkdir()
    photo = _photo()
    refs = root.parent / "refs"
    refs.mkdir()

    def ref(name: str, img: Image.Image) -> Path:
        path = refs / f"{name}.png"
        img.convert("RGB").save(path)
        return path

    good: dict[str, Path] = {}
    photo.save(root / "plain.jpg", quality=95)
    good["plain.jpg"] = ref("plain", photo)
    photo.convert("CMYK").save(root / "cmyk.jpg", quality=95)
    good["cmyk.jpg"] = ref("cmyk", photo)
    grey = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(root / "sixteen_bit.png")  # mode I;16
    good["sixteen_bit.png"] = ref("sixteen_bit", photo.convert("L"))
    pal = photo.convert("P", palette=Image.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0
    pal.save(root / "palette_alpha.png", transparency=0)
    good["palette_alpha.png"] = ref("palette_alpha", Image.open(root / "palette_alpha.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; display rotates 90 degrees clockwise
    photo.rotate(90, expand=True).save(root / "exif_rotated.jpg", exif=exif, quality=95)
    good["exif_rotated.jpg"] = ref("exif_rotated", photo)
    frames = [photo, photo.rotate(180)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    good["animated.gif"] = ref("animated", Image.open(root / "animated.gif").convert("RGB"))
    Image.new("RGB", (1, 1), (200, 30, 30)).save(root / "one_pixel.png")
    good["one_pixel.png"] = ref("one_pixel", Image.new("RGB", (1, 1), (200, 30, 30)))
    wide = photo.resize((4000, 12))
    wide.save(root / "very_wide.png")
    good["very_wide.png"] = ref("very_wide", wide)
    tall = photo.resize((9, 3000))
    tall.save(root / "very_tall.jpg", quality=95)
    good["very_tall.jpg"] = ref("very_tall", Image.open(root / "very_tall.jpg"))

    big = _photo((400, 300))
    big.save(root / "truncated.jpg", quality=95)
    (root / "truncated.jpg").write_bytes((root / "truncated.jpg").read_bytes()[:2000])
    (root / "zero_bytes.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is a text file, not a JPEG\n")
    Image.new("1", (10_000, 10_000)).save(root / "bomb.png")  # 100 Mpx > Pillow's limit
    return good


BAD = {
    "truncated.jpg": "truncated",
    "zero_bytes.jpg": "empty file",
    "text.jpg": "not an image",
    "bomb.png": "decompression-bomb",
}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_corpus_is_embedded_correctly_or_recorded(backbone, tmp_path) -> None:
    root = tmp_path / "corpus"
    good = _corpus(root)
    store = Store(tmp_path / "store")
    report = store.update(read_source(root, layout="unlabelled"), backbone, progress=False)

    rows = {Path(r["path"]).name: r for r in store.table().to_pylist()}
    reasons = {Path(r["path"]).name: r["reason"] for r in store.failures().to_pylist()}
    assert set(rows) | set(reasons) == {p.name for p in root.iterdir()}  # nothing lost
    assert set(rows) == set(good) and report.rows == len(good)
    for name, needle in BAD.items():
        assert needle in reasons[name], (name, reasons[name])

    refs = {name: path for name, path in good.items()}
    ref_emb = {}
    for batch in embed_files(backbone, [str(p) for p in refs.values()], progress=False):
        for j, i in enumerate(batch.indices):
            ref_emb[list(refs)[i]] = batch.embeddings[j]
    for name in good:
        similarity = _cosine(np.asarray(rows[name]["embedding"]), ref_emb[name])
        assert similarity > 0.97, (name, similarity)  # same picture, whatever the encoding
    assert (rows["exif_rotated.jpg"]["width"], rows["exif_rotated.jpg"]["height"]) == (160, 120)
    assert (rows["very_wide.png"]["width"], rows["very_wide.png"]["height"]) == (4000, 12)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on globally


def test_files_that_vanish_or_change_kind_after_listing(backbone, tmp_path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    for i in range(5):
        _photo().rotate(i * 30).save(root / f"img{i}.jpg")
    source = read_source(root, layout="unlabelled")  # listed now, changed below
    (root / "img0.jpg").unlink()
    (root / "img1.jpg").unlink()
    (root / "img1.jpg").mkdir()  # a folder where the file was
    (root / "img2.jpg").unlink()
    os.mkfifo(root / "img2.jpg")  # a pipe: opening it would block forever
    unreadable = os.geteuid() != 0  # root reads anything, so this case needs a plain user
    if unreadable:
        (root / "img3.jpg").chmod(0)
    report = Store(tmp_path / "store").update(source, backbone, progress=False)
    reasons = {Path(p).name: r for p, r in report.failures}
    assert "not found" in reasons["img0.jpg"]
    assert "not a regular file" in reasons["img1.jpg"]
    assert "not a regular file" in reasons["img2.jpg"]
    if unreadable:
        assert "permission denied" in reasons["img3.jpg"]
    assert report.rows == 5 - len(reasons)


def test_a_slow_file_cannot_stall_the_run(backbone, tmp_path) -> None:
    slow = tmp_path / "huge.png"
    noise = np.random.default_rng(0).integers(0, 255, (3000, 3000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(slow)  # takes far longer than the 1 ms budget below
    batches = list(embed_files(backbone, [str(slow)], progress=False, timeout=0.001))
    assert [r for b in batches for _, r in b.failures] == [
        "took longer than 0.001 s to read and decode (slow or huge file)"
    ]


def test_broken_symlink_is_recorded(backbone, tmp_path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    _photo().save(root / "ok.jpg")
    (root / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    report = Store(tmp_path / "store").update(
        read_source(root, layout="unlabelled"), backbone, progress=False
    )
    assert report.rows == 1
    assert any("not found" in r for p, r in report.failures if p.endswith("dangling.jpg"))


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_fuzz_corpus_is_embedded_or_recorded_file_by_file(backbone, tmp_path) -> None:
    from tests.flows.web.test_webapp_security import fuzz_corpus

    root = tmp_path / "fuzz"
    root.mkdir()
    ext = {0: "png", 1: "jpg", 2: "tif", 3: "gif", 4: "webp", 5: "bmp"}
    for i, blob in enumerate(fuzz_corpus(240, seed=1)):
        (root / f"f{i:03d}.{ext[i % 6]}").write_bytes(blob)
    report = Store(tmp_path / "store").update(
        read_source(root, layout="unlabelled"), backbone, progress=False
    )
    rows = set(Store(tmp_path / "store").table(["path"])["path"].to_pylist())
    failed = {p for p, _ in report.failures}
    assert rows | failed == {str(p.resolve()) for p in root.iterdir()}  # each file, once
    assert not rows & failed and report.rows + report.failed + report.duplicates == 240
    assert all(reason for _, reason in report.failures)
