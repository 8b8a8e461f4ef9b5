"""Progress a person can follow wherever the output goes.

On a terminal, a tqdm bar. Anywhere else (a log file, a pipe, a batch scheduler's output) a bar's
carriage returns are unreadable or never flushed, so ``Progress`` prints a plain line every ``every``
items, or at least every ``seconds``, with the rate and the time left:

    ROME edits: 10/42 (24%), 0.41/s, 1m18s left
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = round(s)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class Progress:
    """Counts ``total`` items; a tqdm bar on a terminal, plain lines elsewhere (see the module docstring)."""

    def __init__(self, total: int | None, desc: str, every: int | None = None, seconds: float = 30.0,
                 stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.desc, self.seconds = total, desc, seconds
        self.stream = stream or sys.stderr
        self.every = every or max(1, (total or 10) // 10)
        self.n = 0
        self.enabled = enabled
        self._t0 = self._last = time.perf_counter()
        self._bar = None
        if enabled and is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, file=self.stream, leave=False)

    def line(self) -> str:
        elapsed = time.perf_counter() - self._t0
        rate = self.n / elapsed if elapsed > 0 else float("nan")
        if self.total:
            left = (self.total - self.n) / rate if rate > 0 else float("inf")
            return (f"{self.desc}: {self.n}/{self.total} ({100 * self.n / self.total:.0f}%), {rate:.3g}/s, "
                    f"{format_seconds(left)} left")
        return f"{self.desc}: {self.n}, {rate:.3g}/s, {format_seconds(elapsed)} elapsed"

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self.n % self.every == 0 or now - self._last >= self.seconds or self.n == self.total:
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
