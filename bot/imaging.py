"""Image handling in the bot (Pillow only): the optional grid of a round's images, and
checking images people upload to /score before anything stores or decodes them fully.

Uploads pass three gates: the attachment's declared type and size (before downloading), the header's
pixel count (before decoding: a small file can declare a huge image, a decompression bomb),
then a full `verify()` and `load()` of the bytes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from hps.settings import LimitSettings

# Formats a worker can read; the suffix is the store key's.
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif"}


class UploadRejected(Exception):
    """An upload that is not scored; the message is for the user."""


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    format: str
    width: int
    height: int

    @property
    def suffix(self) -> str:
        return FORMATS[self.format]


def check_attachment(
    filename: str, content_type: str | None, size: int, limits: LimitSettings
) -> None:
    """The declared type and size, before downloading anything."""
    if not (content_type or "").startswith("image/"):
        raise UploadRejected(
            f"`{filename}` is not an image ({content_type or 'unknown type'}): "
            "upload PNG, JPEG, WebP or GIF files."
        )
    if size > limits.score_max_bytes:
        raise UploadRejected(
            f"`{filename}` is {_mib(size)}; the limit is {_mib(limits.score_max_bytes)} per image."
        )


def check_image(filename: str, data: bytes, limits: LimitSettings) -> CheckedImage:
    """Open, bound and fully decode the bytes; `UploadRejected` says what is wrong."""
    if len(data) > limits.score_max_bytes:
        raise UploadRejected(
            f"`{filename}` is {_mib(len(data))}; the limit is {_mib(limits.score_max_bytes)}."
        )
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
                _check_pixels(filename, width, height, limits)
                if fmt not in FORMATS:
                    raise UploadRejected(
                        f"`{filename}` is a {fmt} image: upload PNG, JPEG, WebP or GIF files."
                    )
                image.verify()
            # verify() leaves the image unusable; decoding it for real needs a fresh open.
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadRejected(
            f"`{filename}` declares far more pixels than it could sensibly hold "
            "(a decompression bomb); it was not scored."
        ) from None
    except UnidentifiedImageError:
        raise UploadRejected(f"`{filename}` is not an image Pillow can read.") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise UploadRejected(f"`{filename}` is damaged and cannot be read ({exc}).") from None
    return CheckedImage(data, fmt, width, height)


def _check_pixels(filename: str, width: int, height: int, limits: LimitSettings) -> None:
    if width * height > limits.score_max_pixels:
        raise UploadRejected(
            f"`{filename}` is {width}×{height} pixels; the limit is "
            f"{limits.score_max_pixels:,} pixels per image."
        )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def make_grid(images: list[bytes], columns: int = 2) -> bytes:
    """One PNG with the images side by side (rows of `columns`), each scaled to the first's
    size; the optional overview posted with a round."""
    opened = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    width, height = opened[0].size
    rows = -(-len(opened) // columns)
    grid = Image.new("RGB", (width * min(columns, len(opened)), height * rows), "white")
    for i, image in enumerate(opened):
        grid.paste(image.resize((width, height)), ((i % columns) * width, (i // columns) * height))
    out = io.BytesIO()
    grid.save(out, format="PNG")
    return out.getvalue()
