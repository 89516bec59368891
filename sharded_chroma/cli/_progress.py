"""Progress lines for long CLI work: done, rate and ETA, redrawn in place on a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "StepProgress"]


class Progress:
    """Report progress of ``total`` units; at most one line per ``every`` seconds off a tty."""

    def __init__(
        self, label: str, total: int, *, stream: TextIO | None = None, every: float = 2.0
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.every = every
        self._tty = self.stream.isatty()
        self._started = time.perf_counter()
        self._last = 0.0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def line(self) -> str:
        rate = self.done / self.elapsed if self.elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta_text = f"{eta:,.0f} s" if eta != float("inf") else "?"
        return (
            f"{self.label}: {self.done:,}/{self.total:,} ({pct:.0f}%)  "
            f"{rate:,.0f}/s  ETA {eta_text}"
        )

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self._tty:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif now - self._last >= self.every or self.done >= self.total:
            self._last = now
            self.stream.write(self.line() + "\n")

    def finish(self) -> None:
        if self._tty:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()


class StepProgress:
    """A migrator's ``progress`` callback for the CLI: a line when a step begins (a call
    with no records), a progress bar per step that handles records."""

    def __init__(self, out: Callable[[str], None], total: int) -> None:
        self._out = out
        self._total = total
        self._bars: dict[str, Progress] = {}

    def __call__(self, step: str, n: int) -> None:
        if n == 0:
            self._out(f"step {step}")
            return
        bar = self._bars.get(step) or self._bars.setdefault(step, Progress(step, self._total))
        bar.advance(n)

    def finish(self) -> None:
        for bar in self._bars.values():
            bar.finish()
