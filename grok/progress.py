"""A byte-counting progress bar for checkpoint loads: bytes done, rate and time remaining.

It draws on one terminal line (``\\r``) and stays silent when the stream is not a terminal or
when ``quiet`` is set, so logs and tests see nothing.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

GB = 1e9
BAR_WIDTH = 30  # characters of the bar itself
REDRAW_SECONDS = 0.1  # at most ten redraws a second, so drawing never costs load time


class ProgressBar:
    """``update(n)`` after each ``n`` bytes; ``close()`` ends the line. Thread-safe."""

    def __init__(
        self,
        total_bytes: int,
        *,
        label: str = "loading",
        stream: TextIO | None = None,
        quiet: bool = False,
    ):
        self.total = max(0, int(total_bytes))
        self.done = 0
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = not quiet and bool(isatty and isatty())
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self.done += int(n)
            now = time.monotonic()
            if self.enabled and (
                now - self._last_draw >= REDRAW_SECONDS or self.done >= self.total
            ):
                self._last_draw = now
                self.stream.write("\r" + self.line(now))
                self.stream.flush()

    def line(self, now: float | None = None) -> str:
        """The text of the bar: ``label [=====     ] 1.20/2.00 GB  0.80 GB/s  1s left``."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed  # bytes per second
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        filled = int(frac * BAR_WIDTH)
        remaining = (self.total - self.done) / rate if rate > 0 else float("inf")
        left = "?" if remaining == float("inf") else f"{max(0.0, remaining):.0f}s"
        return (
            f"{self.label} [{'=' * filled}{' ' * (BAR_WIDTH - filled)}] "
            f"{self.done / GB:.2f}/{self.total / GB:.2f} GB  {rate / GB:.2f} GB/s  {left} left"
        )

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
