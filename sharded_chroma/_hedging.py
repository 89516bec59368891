"""Hedged reads: a second copy of a read sent to another node when the first is slow, within a
budget of extra requests (a token bucket, ``HedgeBudget``)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio
import numpy as np

from ._errors import NodeUnavailableError
from ._node import HedgeBudget, Node
from ._topology import ReplicationConfig

__all__ = ["Hedger", "timed"]

T = TypeVar("T")


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

    def count_read(self) -> None:
        self.budget.count_read()

    def delay(self, node: Node) -> float | None:
        """When to send a second copy of a read that ``node`` has not answered yet."""
        cfg = self._config
        if cfg.hedge_percentile is not None and len(node.latencies) >= 20:
            return float(np.percentile(np.fromiter(node.latencies, float), cfg.hedge_percentile))
        if cfg.hedge_after is not None:
            return cfg.hedge_after
        if cfg.hedge_percentile is not None:
            return 0.05
        return None

    async def run(
        self, op: Callable[[Node], Awaitable[T]], first: Node, others: Sequence[Node]
    ) -> T:
        delay = self.delay(first) if others else None
        if delay is None:
            return await timed(op, first)
        done = anyio.Event()
        results: list[tuple[Node, T]] = []
        errors: list[BaseException] = []
        launched: list[Node] = []

        async def run(node: Node) -> None:
            try:
                result = await timed(op, node)
            except Exception as exc:  # kept; raised if no copy answers
                errors.append(exc)
                if isinstance(exc, NodeUnavailableError) and node is not first:
                    node.failed(self._clock())
                if len(errors) == len(launched):
                    done.set()
            else:
                results.append((node, result))
                done.set()

        async with anyio.create_task_group() as tg:
            launched.append(first)
            tg.start_soon(run, first)
            with anyio.move_on_after(delay):
                await done.wait()
            if not done.is_set() and self.budget.allow():
                hedge = others[0]
                self.budget.spend()
                first.hedges_sent += 1
                launched.append(hedge)
                tg.start_soon(run, hedge)
            await done.wait()
            tg.cancel_scope.cancel()
        if results:
            winner, result = results[0]
            if winner is not first:
                first.hedges_won += 1
            return result
        raise errors[0]
