"""Upload checks for /score and the round grid."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from bot.imaging import UploadRejected, check_attachment, check_image, make_grid
from hps.settings import LimitSettings
from tests.e2e.test_community import png_header_only

LIMITS = LimitSettings(score_max_bytes=100_000, score_max_pixels=200 * 200)


def _encoded(fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize(
    ("fmt", "suffix"), [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("GIF", ".gif")]
)
def test_images_of_the_accepted_formats_pass(fmt: str, suffix: str) -> None:
    checked = check_image("x", _encoded(fmt), LIMITS)
    assert (checked.format, checked.width, checked.height, checked.suffix) == (fmt, 40, 30, suffix)


def test_declared_type_and_size_are_checked_before_download() -> None:
    check_attachment("a.png", "image/png", 100_000, LIMITS)
    with pytest.raises(UploadRejected, match=r"^`a.pdf` is not an image \(application/pdf\)"):
        check_attachment("a.pdf", "application/pdf", 10, LIMITS)
    with pytest.raises(UploadRejected, match=r"unknown type"):
        check_attachment("a", None, 10, LIMITS)
    with pytest.raises(
        UploadRejected, match=r"^`a.png` is 0.1 MiB; the limit is 0.1 MiB per image"
    ):
        check_attachment("a.png", "image/png", 100_001, LIMITS)


def test_other_formats_bombs_and_damage_are_refused() -> None:
    with pytest.raises(UploadRejected, match=r"^`x` is a BMP image"):
        check_image("x", _encoded("BMP"), LIMITS)
    with pytest.raises(UploadRejected, match="decompression bomb"):
        check_image("x", png_header_only(40_000, 40_000), LIMITS)
    # Above Pillow's warning threshold but below its error: refused as a bomb as well.
    with pytest.raises(UploadRejected, match="decompression bomb"):
        check_image("x", png_header_only(10_000, 10_000), LimitSettings(score_max_pixels=2**31))
    with pytest.raises(UploadRejected, match=r"^`x` is 201×200 pixels; the limit is 40,000"):
        check_image("x", png_header_only(201, 200), LIMITS)
    with pytest.raises(UploadRejected, match="damaged"):
        check_image("x", _encoded("PNG")[:-20], LIMITS)
    with pytest.raises(UploadRejected, match="damaged"):
        check_image("x", png_header_only(100, 100), LIMITS)  # IDAT too short to decode
    with pytest.raises(UploadRejected, match=r"^`x` is 0.1 MiB"):
        check_image("x", b"\0" * 100_001, LIMITS)


def test_the_grid_puts_images_in_rows_of_two() -> None:
    grid = Image.open(io.BytesIO(make_grid([_encoded("PNG")] * 3)))
    assert grid.size == (80, 60)
    assert grid.getpixel((10, 10)) == (255, 0, 0) and grid.getpixel((50, 40)) == (255, 255, 255)
