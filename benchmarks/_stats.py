"""Small helpers the benchmarks share: percentiles, medians, alternating order, a closed loop."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def log(message: str) -> None:
    """A timestamped progress line on stderr (tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation): p99 of 200 samples is the 198th."""
    ordered = sorted(samples)
    rank = max(1, int(np.ceil(pct / 100.0 * len(ordered))))
    return ordered[rank - 1]


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """``num[i] / den[i]`` per round: both measured in the same round, so a round's load hits
    both sides of its ratio (nan where ``den[i]`` is 0)."""
    if len(num) != len(den):
        raise ValueError(f"{len(num)} values against {len(den)}")
    return [n / d if d else float("nan") for n, d in zip(num, den, strict=True)]


def spread(ratios: Sequence[float]) -> str:
    """``median [min-max]`` of per-round ratios, e.g. ``1.42x [1.35-1.50]``."""
    if not ratios:
        return "n/a"
    return f"{med(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"


def alternate(items: list[T], round_no: int) -> list[T]:
    """Configurations in order on even rounds, reversed on odd ones, so drift over a run
    (a warming cache, a neighbour's load) does not favour whichever runs first."""
    return items if round_no % 2 == 0 else items[::-1]


async def closed_loop(call: Callable[[int], Awaitable[object]], total: int, workers: int) -> float:
    """``total`` calls (numbered 0..total-1) by ``workers`` tasks, each starting its next call
    when one returns; calls per second of wall-clock time."""
    position = 0

    async def worker() -> None:
        nonlocal position
        while position < total:
            i = position
            position += 1
            await call(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return total / (time.perf_counter() - t0)
