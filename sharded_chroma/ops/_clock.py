"""The hybrid clock behind record sequences and versions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["HybridClock"]


class HybridClock:
    """Microsecond values that never repeat, never go back, and never run behind a value
    this process has seen (``observe``): a wall clock that steps back, or a peer whose clock
    runs ahead, cannot make a later write of this process look older than an earlier one."""

    def __init__(self, wall_ns: Callable[[], int] = time.time_ns) -> None:
        self._wall_ns = wall_ns
        self._last = 0
        self._lock = threading.Lock()

    def reserve(self, n: int = 1) -> int:
        """The first of ``n`` consecutive fresh values (at least one is always reserved)."""
        with self._lock:
            base = max(self._wall_ns() // 1000, self._last + 1)
            self._last = base + max(n, 1) - 1
            return base

    def observe(self, value: int) -> None:
        """A value read from a stored record: later reservations are above it."""
        with self._lock:
            if value > self._last:
                self._last = value
