"""The shared image loader (``blip2.images.read_image`` / ``load_image``): only PNG, JPEG, WebP, GIF, BMP and
TIFF are opened at all, sizes and aspect ratios are refused from the header before any pixel is decoded, and
``reduce_to`` decodes large images near the size they will be resized to."""

from __future__ import annotations

import io
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from blip2.images import (IMAGE_FORMATS, Blip2ImageProcessor, ImageLimits, ImageLoadError, ImageTooLarge,
                          UnsupportedImage, load_image, read_image)
from hostile import bilevel_png, encoded, eps, flat_png

ALLOWED = {"PNG": {}, "JPEG": {"quality": 95}, "WEBP": {"lossless": True}, "GIF": {}, "BMP": {}, "TIFF": {}}
REFUSED = ["ICO", "PCX", "TGA", "PPM", "SGI", "DDS", "QOI", "EPS"]


def picture(width: int = 40, height: int = 30) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([x + 0 * y, 0 * x + y, (x + y) / 2], axis=2)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("fmt", sorted(ALLOWED))
def test_every_allowed_format_decodes(fmt):
    assert fmt in IMAGE_FORMATS
    original = picture()
    image = read_image(io.BytesIO(encoded(original, fmt, **ALLOWED[fmt])), "x")
    assert (image.mode, image.size) == ("RGB", (40, 30))
    want = np.asarray(Image.open(io.BytesIO(encoded(original, fmt, **ALLOWED[fmt]))).convert("RGB"))
    assert np.array_equal(np.asarray(image), want)  # what PIL decodes, unchanged


@pytest.mark.parametrize("fmt", REFUSED)
def test_other_formats_are_refused_before_their_decoder_runs(fmt, monkeypatch, tmp_path: Path):
    data = eps() if fmt == "EPS" else encoded(picture(), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # PIL alone would open it
    if fmt == "EPS":  # not even the EPS header parser runs (decoding it would start Ghostscript)
        def never(self: object) -> None:
            raise AssertionError("the EPS plugin ran")

        monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    path = tmp_path / f"picture.{fmt.lower()}"
    path.write_bytes(data)
    with pytest.raises(UnsupportedImage) as info:
        load_image(path)
    assert str(info.value) == (f"cannot read image {str(path)!r}: not an image in an accepted format "
                               "(PNG, JPEG, WebP, GIF, BMP, TIFF)")
    assert info.value.reason.startswith("not an image")


@pytest.mark.parametrize("width,height,limits,reason", [
    (40_000_000, 1, ImageLimits(), "40000000x1: a side over max_side=32768"),
    (20_000, 1, ImageLimits(), "20000x1: aspect ratio over max_aspect=50"),
    (1, 3000, ImageLimits(max_aspect=1000, max_side=2000), "1x3000: a side over max_side=2000"),
    (300, 300, ImageLimits(max_pixels=40_000), "300x300 = 90000 pixels exceeds max_pixels=40000 "
                                               "(decompression bomb guard)"),
])
def test_limits_refuse_from_the_header_before_decoding(width, height, limits, reason):
    data = bilevel_png(width, height)
    assert len(data) < 10_000  # a small file ...
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge) as info:
        read_image(io.BytesIO(data), "thin.png", limits)
    assert time.perf_counter() - start < 0.05  # ... refused without decoding or resizing a pixel
    assert str(info.value) == f"cannot read image 'thin.png': {reason}"


def test_the_same_files_decode_once_the_limits_are_lifted():
    """The refused files above are valid images: the limits, not broken data, stop them."""
    free = ImageLimits(max_pixels=None, max_side=None, max_aspect=None)
    assert read_image(io.BytesIO(bilevel_png(400_000, 1)), "thin.png", free).size == (400_000, 1)
    assert read_image(io.BytesIO(bilevel_png(300, 300)), "square.png", free).size == (300, 300)


def test_every_command_s_loader_has_the_limits(tmp_path: Path):
    thin = tmp_path / "thin.png"
    thin.write_bytes(bilevel_png(40_000_000, 1))
    with pytest.raises(ImageTooLarge, match=r"thin.png': 40000000x1: a side over max_side=32768"):
        load_image(thin, max_pixels=None)  # lifting the pixel limit keeps the others


def test_load_image_keeps_the_reference_pixels():
    """Without ``reduce_to`` the pixels are exactly PIL's full decode, converted to RGB, as transformers reads a path."""
    original = picture(64, 48).convert("P", palette=Image.Palette.ADAPTIVE)
    data = encoded(original, "PNG")
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(np.asarray(read_image(io.BytesIO(data), "p.png")), want)


def test_reduce_to_decodes_a_large_jpeg_at_a_reduced_scale():
    large = picture(1600, 1200).resize((3200, 2400))
    data = encoded(large, "JPEG", quality=95)
    processor = Blip2ImageProcessor()  # 224 x 224
    full = read_image(io.BytesIO(data), "big.jpg")
    reduced = read_image(io.BytesIO(data), "big.jpg", reduce_to=(448, 448))
    assert full.size == (3200, 2400)
    assert reduced.size == (800, 600)  # 1/4 scale: the smallest JPEG scale that keeps both sides >= 448
    exact, fast = processor.preprocess(full), processor.preprocess(reduced)
    assert np.abs(exact - fast).mean() < 0.01  # normalised units: about a quarter of one grey level
    assert np.abs(exact - fast).max() < 0.1


def test_reduce_to_shrinks_other_formats_by_a_whole_factor_per_side():
    reduced = read_image(io.BytesIO(flat_png(4000, 500, (9, 99, 199))), "wide.png", reduce_to=(448, 448))
    assert reduced.size == (500, 500)  # 4000 // 448 = 8 across, 500 // 448 = 1 down
    assert reduced.getpixel((100, 100)) == (9, 99, 199)
    small = read_image(io.BytesIO(flat_png(500, 300)), "small.png", reduce_to=(448, 448))
    assert small.size == (500, 300)  # already near the size: untouched


def test_image_load_errors_survive_pickling():
    """DataLoader workers send them back to the main process."""
    error = ImageTooLarge.about("x.png", "1x9: aspect ratio over max_aspect=5")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is ImageTooLarge and str(again) == str(error) and again.reason == error.reason
    assert isinstance(again, ImageLoadError) and isinstance(again, ValueError)


def test_a_fifo_named_like_an_image_is_refused_without_opening_it(tmp_path):
    """Opening a FIFO blocks until a writer comes: the loader refuses it from its file type first."""
    import os

    from blip2.images import ImageLoadError, load_image

    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match=r"cannot read image '.*x.png': not a regular file"):
        load_image(str(fifo))
