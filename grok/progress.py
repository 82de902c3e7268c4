"""The one progress bar of the library (checkpoint loads, training): a ``tqdm`` bar.

It draws on stderr and stays silent when the stream is not a terminal (tqdm's
``disable=None``) or when ``quiet`` is set, so logs and tests see nothing.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

REDRAW_SECONDS = 0.1  # at most ten redraws a second, so drawing never costs load time


def progress_bar(
    total: int,
    *,
    desc: str,
    unit: str = "B",
    initial: int = 0,
    quiet: bool = False,
    file: TextIO | None = None,
) -> tqdm:
    """A bar to ``update(n)``; use it as a context manager (or ``close()`` it).

    Args:
      total: the count at the end (bytes for ``unit="B"``, shown in decimal kB/MB/GB).
      desc: the label in front of the bar.
      unit: ``"B"`` for bytes, or any other unit name counted as is (``"step"``).
      initial: the count already done (a resumed run).
      quiet: draw nothing even on a terminal.
      file: the stream to draw on; default stderr.
    """
    is_bytes = unit == "B"
    return tqdm(
        total=max(0, int(total)),
        initial=initial,
        desc=desc,
        unit=unit,
        unit_scale=is_bytes,
        unit_divisor=1000,
        file=sys.stderr if file is None else file,
        disable=True if quiet else None,
        mininterval=REDRAW_SECONDS,
        dynamic_ncols=True,
    )
