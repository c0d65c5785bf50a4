"""A one-line progress bar (done, rate, ETA) for long runs; silent when not on a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``3725 -> '1:02:05'``; ``'?'`` for an unknown duration."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """Shows ``label [#####.....] done/total unit  rate unit/s  ETA`` on one line.

    Args:
      total: the amount of work (tasks, phases, environment steps).
      unit: what one unit of work is called.
      label: a prefix (the run's name).
      start: work already done (a resumed run); not counted in the rate.
      stream: where to write; the bar is drawn only if it is a terminal.
    """

    def __init__(self, total: int, unit: str, label: str = "", start: int = 0,
                 stream: TextIO | None = None, width: int = 30) -> None:
        self.total, self.unit, self.label, self.width = total, unit, label, width
        self.start = self.done = start
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._t0 = time.perf_counter()

    def line(self) -> str:
        elapsed = time.perf_counter() - self._t0
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        remaining = (self.total - self.done) / rate if rate > 0 else float("nan")
        filled = int(self.width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        return (f"{self.label} [{bar}] {self.done}/{self.total} {self.unit}  "
                f"{rate:.3g} {self.unit}/s  ETA {format_duration(remaining)}")

    def update(self, done: int) -> None:
        self.done = done
        if self.enabled:
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
