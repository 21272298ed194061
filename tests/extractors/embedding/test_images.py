"""Image decoding: every supported format to upright RGB; bad files give readable errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from extractors.embedding.images import ImageError, load_rgb


def _photo(w: int = 40, h: int = 30) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)  # left half red, right half blue
    arr[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "bmp", "tiff", "gif"])
def test_formats_decode_to_rgb(tmp_path, ext) -> None:
    path = tmp_path / f"img.{ext}"
    _photo().save(path)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (40, 30)


def test_exif_orientation_is_applied(tmp_path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    _photo().save(path, exif=exif)
    img = load_rgb(path)
    assert img.size == (30, 40)
    top = np.asarray(img)[2, 15]
    assert top[0] > 200 and top[2] < 60  # the red half is now on top


def test_gif_first_frame(tmp_path) -> None:
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    assert tuple(np.asarray(load_rgb(path))[0, 0]) == pytest.approx((255, 0, 0), abs=8)


def test_modes_are_converted(tmp_path) -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.save(tmp_path / "alpha.png")
    assert tuple(np.asarray(load_rgb(tmp_path / "alpha.png"))[0, 0]) == (255, 255, 255)
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "16bit.png")
    assert np.asarray(load_rgb(tmp_path / "16bit.png")).min() == 255
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert load_rgb(tmp_path / "cmyk.jpg").mode == "RGB"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"hello, I am text", "not an image"),
    ],
)
def test_bad_files_raise_readable_errors(tmp_path, content, reason) -> None:
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        load_rgb(path)


def test_truncated_and_missing(tmp_path) -> None:
    path = tmp_path / "trunc.jpg"
    _photo(400, 300).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ImageError, match=r"truncated|corrupt"):
        load_rgb(path)
    with pytest.raises(ImageError, match="not found"):
        load_rgb(tmp_path / "gone.png")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch) -> None:
    path = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ImageError, match="too large"):
        load_rgb(path)
