"""A ``prometheus_client`` collector that reads a client's metrics at each scrape.

Nothing is counted twice: the client keeps its own counters (``ClientMetrics``) and the
collector turns a snapshot into metric families, so registering it costs nothing between
scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from ._metrics import ClientMetrics

__all__ = ["ClientCollector"]

_NODE = ["shard", "node", "role"]


def _buckets(pairs: tuple[tuple[Any, int], ...], count: int) -> list[tuple[str, float]]:
    return [(_bound(b), float(n)) for b, n in pairs] + [("+Inf", float(count))]


def _bound(value: float) -> str:
    return repr(float(value))


class ClientCollector(Collector):
    """Metric families of one client, read from ``snapshot()`` (``client.metrics``)."""

    def __init__(self, snapshot: Callable[[], ClientMetrics], prefix: str = "sharded_chroma"):
        self._snapshot = snapshot
        self._prefix = prefix

    def describe(self) -> Iterator[Any]:
        # The registry learns the names at registration (and refuses a second collector
        # with the same prefix); the families of a snapshot are what collect() gives.
        return self.collect()

    def collect(self) -> Iterator[Any]:
        m = self._snapshot()
        p = self._prefix
        requests = CounterMetricFamily(
            f"{p}_node_requests", "Requests sent to a node.", labels=_NODE
        )
        errors = CounterMetricFamily(
            f"{p}_node_errors", "Requests to a node that failed, by kind.", labels=[*_NODE, "kind"]
        )
        latency = HistogramMetricFamily(
            f"{p}_node_request_duration_seconds",
            "Latency of the requests a node answered.",
            labels=_NODE,
        )
        in_flight = GaugeMetricFamily(f"{p}_node_in_flight", "Requests under way.", labels=_NODE)
        hedges = CounterMetricFamily(
            f"{p}_node_hedges_sent", "Reads to this node also sent to another copy.", labels=_NODE
        )
        won = CounterMetricFamily(
            f"{p}_node_hedges_won", "Hedged reads another copy answered first.", labels=_NODE
        )
        pending = GaugeMetricFamily(
            f"{p}_node_hints_pending", "Missed writes waiting for this node.", labels=_NODE
        )
        replayed = CounterMetricFamily(
            f"{p}_node_hints_replayed", "Missed writes replayed to this node.", labels=_NODE
        )
        for n in m.nodes:
            key = [n.shard, n.url, n.role]
            requests.add_metric(key, n.requests)
            for kind, count in sorted(n.errors.items()):
                errors.add_metric([*key, kind], count)
            latency.add_metric(
                key, _buckets(n.latency.buckets, n.latency.count), sum_value=n.latency.sum
            )
            in_flight.add_metric(key, n.in_flight)
            hedges.add_metric(key, n.hedges_sent)
            won.add_metric(key, n.hedges_won)
            pending.add_metric(key, n.hints_pending)
            replayed.add_metric(key, n.hints_replayed)
        yield from (requests, errors, latency, in_flight, hedges, won, pending, replayed)

        width = HistogramMetricFamily(
            f"{p}_read_fan_out_shards",
            "Shards a read asked.",
            labels=["operation"],
        )
        skipped = CounterMetricFamily(
            f"{p}_read_skipped_shards",
            "Shards reads did not ask because the policy and filter rule out matches there.",
            labels=["operation"],
        )
        for op, calls in sorted(m.calls.items()):
            width.add_metric(
                [op], _buckets(calls.fan_out, calls.calls), sum_value=calls.shards_asked
            )
            skipped.add_metric([op], calls.shards_skipped)
        yield from (width, skipped)
