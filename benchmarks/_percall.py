"""Per-call latency helpers shared by the benchmarks that time one call at a time against a
baseline configuration (``bench_control``, ``bench_shared_state``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from _stats import med, paired_ratios, spread


async def timed(call: Any, n: int) -> float:
    """Median seconds of ``n`` sequential calls ``call(i)``."""
    samples = []
    for i in range(n):
        started = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def getter(col: Any, ids: Sequence[str]) -> Any:
    """``get(ids=[one id])`` of the ``i``-th id, cycling."""

    async def get(i: int) -> None:
        await col.get(ids=[ids[i % len(ids)]])

    return get


def upserter(col: Any, ids: Sequence[str], vectors: Any) -> Any:
    """A one-record upsert of the ``i``-th id, cycling, with one of 50 vectors."""

    async def upsert(i: int) -> None:
        await col.upsert(ids=[ids[i % len(ids)]], embeddings=vectors[i % 50 : i % 50 + 1])

    return upsert


def print_table(
    names: Sequence[str],
    gets: dict[str, list[float]],
    puts: dict[str, list[float]],
    base: str,
) -> None:
    """Per configuration: medians over rounds and per-round ratios against ``base``."""
    head = f"vs {base}"
    print(f"{'config':<8} {'get p50 ms':>11} {head:>22} {'upsert p50 ms':>14} {head:>22}")
    for name in names:
        get_ratio = spread(paired_ratios(gets[name], gets[base]))
        line = f"{name:<8} {med(gets[name]) * 1e3:>11.3f} {get_ratio:>22}"
        if name in puts:
            put_ratio = spread(paired_ratios(puts[name], puts[base]))
            line += f" {med(puts[name]) * 1e3:>14.3f} {put_ratio:>22}"
        print(line)
