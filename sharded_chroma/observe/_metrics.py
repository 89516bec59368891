"""Counters a client keeps without any metrics library: per node request latencies (a
cumulative histogram and a window of recent samples for percentiles) and errors by type, and
per operation the fan-out of reads. ``ClientMetrics`` is their snapshot."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "FANOUT_BUCKETS",
    "LATENCY_BUCKETS",
    "CallMetrics",
    "ClientMetrics",
    "FanOutCounter",
    "LatencyHistogram",
    "LatencySnapshot",
    "NodeMetrics",
]

# Seconds; upper bounds of the histogram's buckets (+Inf is implied), as Prometheus writes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FANOUT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_RECENT = 1024


@dataclass(frozen=True)
class LatencySnapshot:
    """A latency histogram at one moment: ``buckets`` are (upper bound, cumulative count);
    ``p50``/``p99`` come from the last 1,024 samples (None before the first)."""

    count: int
    sum: float
    buckets: tuple[tuple[float, int], ...]
    p50: float | None
    p99: float | None


class LatencyHistogram:
    """Latencies of one node's requests. Safe from several threads (a client serves callers
    on several loops)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self._sum = 0.0
        self._recent: deque[float] = deque(maxlen=_RECENT)

    def observe(self, seconds: float) -> None:
        slot = len(LATENCY_BUCKETS)
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                slot = i
                break
        with self._lock:
            self._counts[slot] += 1
            self._sum += seconds
            self._recent.append(seconds)

    def snapshot(self) -> LatencySnapshot:
        with self._lock:
            counts = list(self._counts)
            total = self._sum
            recent = np.fromiter(self._recent, float)
        cumulative, running = [], 0
        for bound, n in zip(LATENCY_BUCKETS, counts, strict=False):
            running += n
            cumulative.append((bound, running))
        p50 = p99 = None
        if recent.size:
            p50 = float(np.percentile(recent, 50))
            p99 = float(np.percentile(recent, 99))
        return LatencySnapshot(sum(counts), total, tuple(cumulative), p50, p99)


@dataclass(frozen=True)
class CallMetrics:
    """Reads of one operation (``get``, ``query``, ``count``): how many, how wide."""

    calls: int
    shards_asked: int
    """Summed over calls: shards each call asked."""
    shards_skipped: int
    """Summed over calls: shards the policy and filter ruled out."""
    fan_out: tuple[tuple[int, int], ...]
    """(upper bound, cumulative calls) of the shards asked per call."""


class FanOutCounter:
    """How many shards each read asked and skipped, per operation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[str, list[int]] = {}

    def record(self, operation: str, asked: int, skipped: int) -> None:
        slot = len(FANOUT_BUCKETS)
        for i, bound in enumerate(FANOUT_BUCKETS):
            if asked <= bound:
                slot = i
                break
        with self._lock:
            row = self._ops.setdefault(operation, [0, 0, 0] + [0] * (len(FANOUT_BUCKETS) + 1))
            row[0] += 1
            row[1] += asked
            row[2] += skipped
            row[3 + slot] += 1

    def snapshot(self) -> dict[str, CallMetrics]:
        with self._lock:
            rows = {op: list(row) for op, row in self._ops.items()}
        out = {}
        for op, row in rows.items():
            cumulative, running = [], 0
            for bound, n in zip(FANOUT_BUCKETS, row[3:], strict=False):
                running += n
                cumulative.append((bound, running))
            out[op] = CallMetrics(row[0], row[1], row[2], tuple(cumulative))
        return out


@dataclass(frozen=True)
class NodeMetrics:
    """One node as this client saw it since it was created."""

    shard: str
    url: str
    role: str
    requests: int
    errors: Mapping[str, int]
    """Failed requests by kind: the Chroma error class a node answered, ``AuthenticationError``
    or ``TLSError``, or the connection failure (``ClientConnectorError``, ``TimeoutError``,
    ``HTTP 503``...)."""
    in_flight: int
    latency: LatencySnapshot
    hedges_sent: int
    hedges_won: int
    hints_pending: int
    hints_replayed: int

    @property
    def error_rate(self) -> float:
        return sum(self.errors.values()) / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class ClientMetrics:
    """A snapshot of a client's counters (``client.metrics()``)."""

    nodes: tuple[NodeMetrics, ...]
    calls: Mapping[str, CallMetrics] = field(default_factory=dict)
