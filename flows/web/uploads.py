"""Uploaded images, decoded for the search service: capped in bytes and pixels and decoded with
the same checks as extraction (`extractors.embedding.images.open_rgb`); a bad one gets a 4xx
with a reason, a slow one 408, and at most DECODING decode at once, so memory stays bounded.
"""

from __future__ import annotations

import io
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError

from extractors.common import FILE_TIMEOUT_S as DECODE_TIMEOUT_S  # as extraction's
from extractors.embedding.images import FORMATS, ImageError, open_rgb
from flows.web.security import MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS

DECODING = 2  # uploads decoded at once


class Uploads:
    """The decoder of uploaded images, DECODING of them at a time."""

    def __init__(self) -> None:
        self._decoding = threading.BoundedSemaphore(DECODING)

    def decode(self, data: bytes, side: int | None) -> Image.Image:
        """An uploaded image, checked (bytes, format, pixels) and decoded as extraction
        decodes (reduced scale where that loses nothing: `side`); else a 4xx saying why."""
        if not data:
            raise HTTPException(400, "empty upload: send the image file's bytes as the body")
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"upload over {MAX_UPLOAD_BYTES // 2**20} MB")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                    w, h = img.size
        except (
            UnidentifiedImageError,
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ):
            raise HTTPException(
                415, "not an image this service can read (JPEG, PNG, GIF, WebP, TIFF, BMP...)"
            ) from None
        except Exception as exc:  # any decoder's failure is the upload's fault, not ours
            raise HTTPException(400, f"corrupt image data: {exc}") from None
        if w * h > MAX_UPLOAD_PIXELS:
            raise HTTPException(
                413, f"image of {w}x{h} pixels is over the {MAX_UPLOAD_PIXELS:,}-pixel limit"
            )
        # At most DECODING uploads decode at once (each bounded by MAX_UPLOAD_PIXELS), each
        # within extraction's time limit; a slow one is answered 408 and keeps its slot
        # until its decoder returns, so memory stays bounded.
        if not self._decoding.acquire(timeout=DECODE_TIMEOUT_S):
            raise HTTPException(503, "too many uploads are decoding; try again shortly")
        pool = ThreadPoolExecutor(max_workers=1)
        future = pool.submit(open_rgb, io.BytesIO(data), side)
        future.add_done_callback(lambda _: self._decoding.release())
        pool.shutdown(wait=False)
        try:
            return future.result(timeout=DECODE_TIMEOUT_S)[0]
        except FutureTimeout:
            raise HTTPException(408, f"decoding took over {DECODE_TIMEOUT_S:.0f} s") from None
        except ImageError as exc:
            raise HTTPException(400, f"cannot decode the image: {exc}") from None
