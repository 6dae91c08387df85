"""A one-line progress bar on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    """``update(done)`` redraws at most ten times a second; ``close()`` clears the line."""

    def __init__(
        self, total: int, label: str, unit: str = "MB", scale: float = 1e6, stream: TextIO | None = None
    ):
        self.total = max(total, 1)
        self.label = label
        self.unit = unit
        self.scale = scale
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, done: int, extra: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < self.total:
            return
        self._last = now
        frac = min(done / self.total, 1.0)
        width = 30
        fill = int(frac * width)
        rate = done / self.scale / max(now - self.start, 1e-6)
        bar = "#" * fill + "-" * (width - fill)
        self.stream.write(
            f"\r{self.label} [{bar}] {frac * 100:5.1f}% {done / self.scale:.1f}/"
            f"{self.total / self.scale:.1f} {self.unit} {rate:.1f} {self.unit}/s {extra}\x1b[K"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


@contextmanager
def progress_callback(label: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback whose bar appears on its first call (when the
    total is known) and is cleared when the block ends, error or not."""
    bar: Progress | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(total, label)
        bar.update(done)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()
