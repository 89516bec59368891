"""Hedged reads: a second copy of a read sent to another node when the first is slow, within a
budget of extra requests (a token bucket, ``HedgeBudget``).

A percentile trigger reads the node's recent latencies (``Node.latencies``). A first request
that loses to its hedge is cancelled before it answers; its elapsed time, a lower bound of its
latency that is past the trigger, goes into that history all the same. Leaving it out would
drop the slowest reads from the history, so the percentile would fall and hedge more reads
than ``100 - hedge_percentile`` per cent."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio
import numpy as np

from ._errors import NodeAccessError, NodeUnavailableError
from ._node import HedgeBudget, Node
from ._topology import ReplicationConfig
from .observe._tracing import current_note, noting

__all__ = ["Hedger", "timed"]

T = TypeVar("T")

# A node's percentile trigger is recomputed after this many reads started on it, not on every
# read (np.percentile over 256 samples costs about 0.1 ms).
THRESHOLD_REFRESH = 16
# Below this many recorded latencies a percentile trigger is not trusted.
MIN_SAMPLES = 20


async def timed(op: Callable[[Node], Awaitable[T]], node: Node) -> T:
    """Run ``op`` on ``node``, recording its latency when it answers."""
    started = time.perf_counter()
    result = await op(node)
    node.succeeded(time.perf_counter() - started)
    return result


class Hedger:
    """One shard's hedging: when to hedge, the budget, and the race of the two requests."""

    def __init__(self, config: ReplicationConfig, clock: Callable[[], float]) -> None:
        self._config = config
        self._clock = clock
        self.budget = HedgeBudget(config.hedge_budget)
        # Per node: reads started since the threshold was computed, and the threshold.
        self._thresholds: dict[Node, tuple[int, float]] = {}

    def count_read(self) -> None:
        self.budget.count_read()

    def delay(self, node: Node) -> float | None:
        """When to send a second copy of a read that ``node`` has not answered yet."""
        cfg = self._config
        if cfg.hedge_percentile is not None and len(node.latencies) >= MIN_SAMPLES:
            return self._threshold(node, cfg.hedge_percentile)
        if cfg.hedge_after is not None:
            return cfg.hedge_after
        if cfg.hedge_percentile is not None:
            return 0.05
        return None

    def _threshold(self, node: Node, percentile: float) -> float:
        """``percentile`` of ``node``'s recent latencies, recomputed every few reads."""
        cached = self._thresholds.get(node)
        if cached is not None and cached[0] < THRESHOLD_REFRESH:
            self._thresholds[node] = (cached[0] + 1, cached[1])
            return cached[1]
        value = float(np.percentile(np.fromiter(node.latencies, float), percentile))
        self._thresholds[node] = (1, value)
        return value

    async def run(
        self, op: Callable[[Node], Awaitable[T]], first: Node, others: Sequence[Node]
    ) -> T:
        delay = self.delay(first) if others and self._config.hedge_budget > 0 else None
        if delay is None:
            return await timed(op, first)
        done = anyio.Event()
        results: list[tuple[Node, T]] = []
        errors: list[BaseException] = []
        launched: list[Node] = []
        finished: set[Node] = set()
        refused: list[NodeAccessError] = []

        async def run(node: Node, hedged: bool = False) -> None:
            try:
                if hedged:
                    # Counted once it runs: a hedge cancelled before it started (the first
                    # copy answered in between) sent nothing.
                    first.hedges_sent += 1
                    with noting(current_note().attempt, hedged=True):
                        result = await timed(op, node)
                else:
                    result = await timed(op, node)
            except Exception as exc:  # kept; raised if no copy answers
                finished.add(node)
                errors.append(exc)
                if isinstance(exc, NodeUnavailableError) and node is not first:
                    node.failed(self._clock())
                if isinstance(exc, NodeAccessError):
                    refused.append(exc)  # a refusal is not hidden by the other copy's answer
                if refused or len(errors) == len(launched):
                    done.set()
            else:
                finished.add(node)
                results.append((node, result))
                done.set()

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            launched.append(first)
            tg.start_soon(run, first)
            with anyio.move_on_after(delay):
                await done.wait()
            if not done.is_set() and self.budget.allow():
                hedge = others[0]
                self.budget.spend()
                launched.append(hedge)
                tg.start_soon(run, hedge, True)
            await done.wait()
            tg.cancel_scope.cancel()
        if refused:
            raise refused[0]
        if results:
            winner, result = results[0]
            if winner is not first:
                first.hedges_won += 1
                if first not in finished:
                    # Cancelled unanswered: at least this slow (see the module docstring).
                    first.latencies.append(time.perf_counter() - started)
            return result
        raise errors[0]
