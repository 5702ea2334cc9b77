"""Compress one image with Pillow: orientation applied, metadata stripped, size bounded.

"Compress by 50%" is read as output quality IMAGE_QUALITY=50, the usual meaning in image
tools; PNG has no quality, so it is optimised losslessly (or converted when
IMAGE_OUTPUT_FORMAT asks). `Image.MAX_IMAGE_PIXELS` turns a decompression bomb into an
error before its pixels are allocated.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from s3proc_dagster.errors import ImageRequestError

MAX_PIXELS = 64_000_000  # about 8000 x 8000
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass(frozen=True)
class CompressedImage:
    data: bytes
    extension: str
    content_type: str
    width: int
    height: int
    input_bytes: int


def compress(
    data: bytes, quality: int = 50, output_format: str | None = None, max_pixels: int = MAX_PIXELS
) -> CompressedImage:
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            source_format = img.format or ""
            if source_format not in KEPT_FORMATS and not output_format:
                output_format = "JPEG"
            target = (output_format or source_format).upper()
            if target == "JPG":
                target = "JPEG"
            if target not in KEPT_FORMATS:
                raise ImageRequestError(f"unsupported output format {target}")
            img.load()
            oriented = ImageOps.exif_transpose(img)
            if target == "JPEG" and oriented.mode not in ("RGB", "L"):
                oriented = oriented.convert("RGB")
            out = io.BytesIO()
            if target == "PNG":
                oriented.save(out, "PNG", optimize=True)
            elif target == "WEBP":
                oriented.save(out, "WEBP", quality=quality, method=4)
            else:
                oriented.save(out, "JPEG", quality=quality, optimize=True, progressive=True)
            width, height = oriented.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRequestError(f"image too large (decompression bomb guard): {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageRequestError(f"not a decodable image: {exc}") from None
    ext = KEPT_FORMATS[target]
    return CompressedImage(out.getvalue(), ext, CONTENT_TYPES[ext], width, height, len(data))
