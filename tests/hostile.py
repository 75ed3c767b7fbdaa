"""Files an attacker or an unlucky user sends: images that cost far more than their bytes, formats no command
should decode, broken data. Shared by the tests and ``benchmarks/stress.py``."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_png(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A valid 1-bit greyscale PNG of ``width`` x ``height`` black pixels: 40,000,000 x 1 is 5 MB of pixels in
    about 5 KB of file. ``idat``: other compressed data instead (a header-only bomb: the size, but no pixels)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    if idat is None:
        row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
        idat = zlib.compress(row * height, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def eps() -> bytes:
    """An EPS file (PIL identifies it, and would run Ghostscript to decode it)."""
    return encoded(Image.new("RGB", (16, 16), (200, 20, 20)), "EPS")


def truncated_png() -> bytes:
    pixels = Image.effect_noise((120, 120), 60).convert("RGB")
    data = encoded(pixels, "PNG")
    return data[: len(data) // 2]


def flat_png(width: int, height: int, color: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    """A legal but costly image: width x height RGB pixels in a file of a few hundred KB."""
    return encoded(Image.new("RGB", (width, height), color), "PNG")
