"""Image decoding: any supported file to an upright RGB PIL image, or a clear `ImageError`."""

from __future__ import annotations

import io
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from extractors.common import HeadstartError
from extractors.embedding import objects
from extractors.store.layout import os_path

ORIENTATION = 0x0112  # EXIF tag

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
# The decoders used, whatever a file's name says (JPEG's also opens cameras' multi-picture MPO).
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")


class ImageError(HeadstartError, ValueError):
    """A file that cannot be turned into an RGB image; the message says why, for a person."""


def is_image_path(path: str | Path) -> bool:
    """True when the file name has one of the supported image extensions."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's or object's bytes (`path` as stored: extractors/store/layout.py
    `os_path`, or a URL, extractors/embedding/objects.py)."""
    from extractors.embedding.objects import sha256_of

    return sha256_of(str(path))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha composited on white, 16-bit scaled down."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping at 255.
        import numpy as np

        # Integer arithmetic, in place: 4 bytes a pixel at most (float64 took 27 MB a Mpx).
        arr = np.array(img, dtype=np.int32)
        if img.mode.startswith("I;16") or arr.max() > 255:
            np.clip(arr, 0, 65535, out=arr)
            arr >>= 8
        else:
            np.clip(arr, 0, 255, out=arr)
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "F":
        import numpy as np

        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = np.nan_to_num((arr - lo) * (255.0 / (hi - lo or 1.0)))
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode `path` into an upright RGB image (EXIF orientation applied, GIF first frame).

    `min_side` lets JPEGs decode at a reduced scale (1/2, 1/4, 1/8: libjpeg's DCT scaling) as
    long as both sides stay at least `min_side` pixels, which is several times faster for
    photos far larger than the model's input. Raises `ImageError` with a readable reason for
    anything that is not a decodable image: missing, empty, not a regular file, unknown
    format, truncated data, decompression bombs.
    """
    return open_rgb(path, min_side)[0]


def open_rgb(
    path: str | Path | BinaryIO, min_side: int | None = None
) -> tuple[Image.Image, int, int]:
    """`load_rgb` plus the full-resolution (width, height) after EXIF orientation. `path` may
    also be an open binary file (an upload, a file opened without following links), a path
    as stored (extractors/store/layout.py `os_path`), or a URL fsspec opens (its bytes read
    in one request, extractors/embedding/objects.py)."""
    if isinstance(path, str) and objects.is_url(path):
        try:
            data = objects.read_bytes(path)
        except OSError as exc:
            raise ImageError(objects.failure_reason(exc)) from None
        if not data:
            raise ImageError("empty object (0 bytes)")
        path = io.BytesIO(data)
    if isinstance(path, str | Path):
        path = Path(os_path(str(path)))
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ImageError("file not found (moved or deleted after listing?)") from None
        except PermissionError:
            raise ImageError("permission denied: the file is not readable") from None
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file (a folder, pipe or device named like an image)")
        if st.st_size == 0:
            raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=FORMATS) as img:
                width, height = img.size
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)  # animated GIF/WebP/TIFF: first frame
                if min_side and img.format == "JPEG":
                    img.draft(img.mode if img.mode in ("RGB", "L") else None, (min_side,) * 2)
                img.load()
                if img.getexif().get(ORIENTATION) in (5, 6, 7, 8):
                    width, height = height, width
                img = ImageOps.exif_transpose(img) or img
                return _to_rgb(img), width, height
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large (decompression-bomb guard): {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(
            "not an image Pillow can read (wrong extension or corrupt header)"
        ) from None
    except PermissionError:
        raise ImageError("permission denied: the file is not readable") from None
    except FileNotFoundError:
        raise ImageError("file not found (moved or deleted after listing?)") from None
    except IsADirectoryError:
        raise ImageError("not a regular file (a folder named like an image)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated or corrupt data as OSError("image file is truncated ...").
        raise ImageError(f"corrupt or truncated image data: {exc}") from None
    except Exception as exc:  # a decoder's own failure (TypeError: Missing dimensions, ...)
        raise ImageError(f"corrupt image data ({type(exc).__name__}: {exc})") from None
