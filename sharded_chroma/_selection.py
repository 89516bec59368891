"""Read selection strategies: which copy of a shard serves a read, as small pluggable objects.

A selector orders the candidate nodes (healthy, caught-up copies) by preference; the replica
set tries them in that order. Strategies are registered by name so a topology file can pick
one: ``round_robin``, ``least_outstanding``, ``latency`` and ``primary_only``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from ._errors import ConfigurationError
from ._transport import NodeStats

__all__ = ["SELECTORS", "Candidate", "Selector", "make_selector"]


class Candidate(Protocol):
    """What a selector may look at: the node's role and its live counters."""

    @property
    def url(self) -> str: ...

    @property
    def is_primary(self) -> bool: ...

    @property
    def stats(self) -> NodeStats: ...


class Selector(Protocol):
    def order(self, nodes: Sequence[Candidate]) -> list[Candidate]:
        """The nodes in the order they should be tried (every node appears once)."""
        ...


class RoundRobin:
    """Rotate the starting node on every read."""

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def order(self, nodes: Sequence[Candidate]) -> list[Candidate]:
        if not nodes:
            return []
        with self._lock:
            start = next(self._counter) % len(nodes)
        return [*nodes[start:], *nodes[:start]]


class LeastOutstanding:
    """Fewest requests in flight first; ties keep the topology's order (primary first)."""

    def order(self, nodes: Sequence[Candidate]) -> list[Candidate]:
        return sorted(nodes, key=lambda n: n.stats.in_flight)


class LatencyAware:
    """C3-style ranking: a moving average of response time scaled by the cube of the requests
    in flight, so a node that is fast but already busy stops attracting every read.

    A node with no measurements yet is tried first, but only while it has nothing in flight:
    one probe at a time, so a new or recovered node is not flooded before it has shown its
    speed.
    """

    def order(self, nodes: Sequence[Candidate]) -> list[Candidate]:
        def score(n: Candidate) -> tuple[int, float]:
            s = n.stats
            if s.latency_ewma_ms is None:
                return (0, 0.0) if s.in_flight == 0 else (2, float(s.in_flight))
            return (1, s.latency_ewma_ms * (1 + s.in_flight) ** 3)

        return sorted(nodes, key=score)


class PrimaryOnly:
    """The primary alone; replicas serve reads only when asked for by another strategy."""

    def order(self, nodes: Sequence[Candidate]) -> list[Candidate]:
        return [n for n in nodes if n.is_primary]


SELECTORS: dict[str, Callable[[], Selector]] = {
    "latency": LatencyAware,
    "least_outstanding": LeastOutstanding,
    "primary_only": PrimaryOnly,
    "round_robin": RoundRobin,
}


def make_selector(name: str) -> Selector:
    try:
        return SELECTORS[name]()
    except KeyError:
        known = ", ".join(sorted(SELECTORS))
        raise ConfigurationError(f"unknown read selection {name!r}; known: {known}") from None
