"""The progress of a long command on stderr, in the manner of tqdm: one line redrawn in place on a terminal,
which every other line the command writes meanwhile goes around, so captions, messages and the progress never
run into each other (``12/40 images ... ETA 0:04photos/a.png ...``)."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

__all__ = ["Progress"]

BAR_WIDTH = 20


class Progress:
    """``12/40 [######..............] 30% 8.1 images/s ETA 0:03`` on ``stream``.

    On a terminal the line is redrawn after each ``update``, cut to the terminal's width (a wrapped line
    cannot be redrawn in place), and cleared before anything else is printed through ``write``; elsewhere (a
    log file) a plain line every ``every`` seconds. ``stream=None``: no progress, ``write`` only prints
    (the other ranks of a ``torchrun`` job). ``close`` clears the line and prints the final one."""

    def __init__(self, total: int, stream: TextIO | None = sys.stderr, every: float = 10.0, unit: str = "images") -> None:
        self.total, self.stream, self.every, self.unit = total, stream, every, unit
        self.done = 0
        self.start = self.last = time.monotonic()
        self.tty = stream is not None and stream.isatty()
        self.shown = False  # the line is on the terminal now

    def write(self, text: str, stream: TextIO) -> None:
        """Print ``text`` (whole lines) on ``stream`` (stdout or stderr), never inside the progress line."""
        self._clear()
        stream.write(text)
        stream.flush()
        self._draw()

    def update(self, n: int) -> None:
        self.done += n
        if self.tty:
            self._draw()
        elif self.stream is not None and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            print(self.line(bar=False), file=self.stream, flush=True)

    def line(self, bar: bool = True) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        fraction = self.done / max(self.total, 1)
        drawn = f" [{'#' * int(BAR_WIDTH * fraction):.<{BAR_WIDTH}}]" if bar else ""
        return (f"{self.done}/{self.total} {self.unit}{drawn} ({int(100 * fraction)}%) {rate:.1f} {self.unit}/s "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")

    def close(self) -> None:
        if self.stream is None:
            return
        self._clear()
        print(self.line(bar=False), file=self.stream, flush=True)

    def _draw(self) -> None:
        if not self.tty:
            return
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns  # type: ignore[union-attr]
        except (OSError, ValueError):
            width = 80
        self.stream.write("\r" + self.line()[: max(width - 1, 1)] + "\033[K")  # type: ignore[union-attr]
        self.stream.flush()  # type: ignore[union-attr]
        self.shown = True

    def _clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")  # type: ignore[union-attr]
            self.stream.flush()  # type: ignore[union-attr]
            self.shown = False
