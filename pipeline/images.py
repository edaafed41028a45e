"""Decoding images given as PIL images, encoded bytes or file paths."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

ImageInput = Image.Image | bytes | str | os.PathLike


class ImageError(ValueError):
    """An input that is not a decodable image."""


def open_image(image: ImageInput, max_pixels: int | None = None) -> Image.Image:
    """A decoded RGB image from a PIL image, encoded bytes or a file path; `max_pixels`
    refuses decompression bombs before decoding."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        source = io.BytesIO(image) if isinstance(image, bytes) else Path(image)
        with Image.open(source) as opened:
            if max_pixels is not None and opened.width * opened.height > max_pixels:
                raise ImageError(
                    f"image is {opened.width}×{opened.height} pixels, over the limit of "
                    f"{max_pixels}"
                )
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        name = "the image bytes" if isinstance(image, bytes) else str(image)
        raise ImageError(f"{name} is not a decodable image ({exc})") from None
