"""ReplicaSet: the copies of one shard. Reads pick a healthy, caught-up copy (with failover and
optional hedging); writes go to every copy and are acknowledged by the write concern; a copy that
misses a write gets it in the durable hint log and serves no reads until it has replayed it.

This is the one layer that retries: it knows which other copies could answer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import numpy as np
from chromadb.errors import ChromaError, NotFoundError

from ._errors import HintLogFullError, NodeUnavailableError, WriteConcernError
from ._hints import Hint, HintLog
from ._selection import Selector, make_selector
from ._topology import ReplicationConfig, ShardConfig
from ._transport import NodeStats, NodeTransport

__all__ = ["HintTarget", "Node", "ReplicaSet"]

logger = logging.getLogger("sharded_chroma.replicas")

T = TypeVar("T")

# Long enough for one batch of hints on a slow node; renewed after every batch.
_LEASE_TTL = 60.0


@dataclass(frozen=True)
class HintTarget:
    """Which collection a write belongs to, so a missed write can be replayed later."""

    tenant: str
    database: str
    collection_id: str
    collection_name: str
    op: str


class Node:
    """One copy of a shard: its transport, health and catch-up state."""

    def __init__(self, transport: NodeTransport, *, primary: bool, config: ReplicationConfig):
        self.transport = transport
        self._primary = primary
        self._config = config
        self.failures = 0
        self.retry_at = 0.0
        self.stale = False
        self.hedges_sent = 0
        self.hedges_won = 0
        # A try-lock shared by every thread and task: one replay per node at a time, and a
        # caller that finds it taken moves on instead of waiting (the node stays stale).
        self.replay_lock = threading.Lock()
        self.hint_epoch = 0
        """Bumped whenever a write to this node goes to the hint log."""
        self.needs_repair = False
        """A missed write could not be kept (full hint log): only a repair brings it back."""
        self.latencies: deque[float] = deque(maxlen=256)

    @property
    def url(self) -> str:
        return self.transport.url

    @property
    def is_primary(self) -> bool:
        return self._primary

    @property
    def stats(self) -> NodeStats:
        return self.transport.stats

    @property
    def role(self) -> str:
        return "primary" if self._primary else "replica"

    def healthy(self, now: float) -> bool:
        return self.failures == 0 or now >= self.retry_at

    def succeeded(self, seconds: float | None = None) -> None:
        self.failures = 0
        if seconds is not None:
            self.latencies.append(seconds)

    def failed(self, now: float) -> None:
        self.failures += 1
        pause = self._config.node_retry_after * 2 ** (self.failures - 1)
        self.retry_at = now + min(pause, self._config.node_retry_cap)

    def __repr__(self) -> str:
        return f"Node({self.role}, {self.url!r})"


class _HedgeBudget:
    """A token bucket: each read earns ``ratio`` of a hedge, each hedge spends one, and the
    bucket holds at most a small burst, so quiet periods bank no credit for a slow spell."""

    def __init__(self, ratio: float, burst_reads: int = 20) -> None:
        self.ratio = ratio
        self.cap = max(1.0, ratio * burst_reads)
        self.tokens = 0.0
        self.reads = 0

    def count_read(self) -> None:
        self.reads += 1
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def allow(self) -> bool:
        return self.tokens >= 1.0

    def spend(self) -> None:
        self.tokens -= 1.0


ReplayTarget = Callable[["Node", "HintTarget"], Awaitable[str]]
"""Resolves the request path of a hinted write on a node (the physical ids' owner does)."""


class ReplicaSet:
    """The nodes of one shard, primary first."""

    def __init__(
        self,
        shard: ShardConfig,
        config: ReplicationConfig,
        hints: HintLog | None,
        *,
        replay_target: ReplayTarget | None = None,
        selector: Selector | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = shard.name
        self.config = config
        self.nodes = [
            Node(NodeTransport(n, shard.name), primary=(i == 0), config=config)
            for i, n in enumerate(shard.nodes)
        ]
        self.selector = selector or make_selector(config.read_selection)
        self._hints = hints
        self._clock = clock
        self._budget = _HedgeBudget(config.hedge_budget)
        self._owner = f"{os.getpid()}-{uuid.uuid4().hex}"
        self._replay_target = replay_target

    @property
    def primary(self) -> Node:
        return self.nodes[0]

    def node(self, url: str) -> Node:
        return next(n for n in self.nodes if n.url == url)

    # -- reads ------------------------------------------------------------------------------

    def _candidates(self) -> list[Node]:
        now = self._clock()
        fresh = [n for n in self.nodes if not n.stale]
        healthy = [n for n in fresh if n.healthy(now)]
        ordered: list[Any] = self.selector.order(healthy)
        # Seed nodes are never forgotten: when every fresh copy is in backoff, try them anyway
        # rather than failing without asking.
        if not ordered:
            ordered = self.selector.order(fresh) or fresh
        return list(ordered)

    async def read(self, op: Callable[[Node], Awaitable[T]], *, prefer: Node | None = None) -> T:
        """Run ``op`` on one caught-up copy, failing over to the next on node failures.

        Chroma errors (a bad filter, a missing collection) are answers, not failures: they are
        raised at once. Copies that are stale (they missed writes) are never read.
        """
        await self.catch_up()
        candidates = self._candidates()
        if prefer is not None and prefer in candidates:
            candidates = [prefer, *(n for n in candidates if n is not prefer)]
        if not candidates:
            raise NodeUnavailableError(
                shard=self.name,
                node=self.primary.url,
                attempts=["every copy is stale (missed writes are still being replayed)"],
            )
        attempts: list[str] = []
        last: NodeUnavailableError | None = None
        self._budget.count_read()
        for attempt in range(1 + self.config.retries):
            node = candidates[attempt % len(candidates)]
            if attempt >= len(candidates):
                self.primary.stats.retries += 1
                await anyio.sleep(self.config.backoff * 2 ** (attempt - len(candidates)))
            others = [n for n in candidates if n is not node]
            try:
                return await self._hedged(op, node, others)
            except NodeUnavailableError as exc:
                node.failed(self._clock())
                attempts.extend(exc.attempts)
                last = exc
        assert last is not None
        raise NodeUnavailableError(
            shard=self.name, node=last.node, attempts=attempts
        ) from last.__cause__

    def _hedge_delay(self, node: Node) -> float | None:
        cfg = self.config
        if cfg.hedge_percentile is not None and len(node.latencies) >= 20:
            return float(np.percentile(np.fromiter(node.latencies, float), cfg.hedge_percentile))
        if cfg.hedge_after is not None:
            return cfg.hedge_after
        if cfg.hedge_percentile is not None:
            return 0.05
        return None

    async def _timed(self, op: Callable[[Node], Awaitable[T]], node: Node) -> T:
        started = time.perf_counter()
        result = await op(node)
        node.succeeded(time.perf_counter() - started)
        return result

    async def _hedged(
        self, op: Callable[[Node], Awaitable[T]], first: Node, others: Sequence[Node]
    ) -> T:
        delay = self._hedge_delay(first) if others else None
        if delay is None:
            return await self._timed(op, first)
        done = anyio.Event()
        results: list[tuple[Node, T]] = []
        errors: list[BaseException] = []
        launched: list[Node] = []

        async def run(node: Node) -> None:
            try:
                result = await self._timed(op, node)
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
            if not done.is_set() and self._budget.allow():
                hedge = others[0]
                self._budget.spend()
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

    # -- writes -----------------------------------------------------------------------------

    async def write(
        self,
        path_for: Callable[[Node], Awaitable[str]],
        content: bytes,
        target: HintTarget,
        concern: str,
    ) -> Any:
        """Send one write to every copy; return the primary's answer (or the first copy's).

        A copy that is stale or fails gets the write in the hint log instead. Raises
        ``WriteConcernError`` when fewer copies stored it than ``concern`` requires (the
        misses are hinted all the same), or the Chroma error a copy answered with.
        """
        await self.catch_up()
        answers: dict[str, Any] = {}
        misses: dict[str, BaseException] = {}
        refusals: dict[str, BaseException] = {}

        needed = _required(concern, len(self.nodes))
        settled = anyio.Event()
        finished = anyio.Event()

        def check() -> None:
            done = len(answers) + len(misses) + len(refusals) == len(self.nodes)
            if done:
                finished.set()
            if done or len(answers) >= needed:
                settled.set()

        async def one(node: Node) -> None:
            if node.stale:
                with anyio.CancelScope(shield=True):
                    misses[node.url] = await self._hint(node, target, content, reason="stale")
                check()
                return
            try:
                path = await path_for(node)
                answers[node.url] = await self._timed(
                    lambda n: n.transport.request("POST", path, content=content), node
                )
            except NodeUnavailableError as exc:
                node.failed(self._clock())
                misses[node.url] = exc
                # Shielded: a write cut off while being hinted would be lost for this copy.
                with anyio.CancelScope(shield=True):
                    await self._hint(node, target, content, reason="unreachable")
            except ChromaError as exc:
                refusals[node.url] = exc
            except anyio.get_cancelled_exc_class():
                # Cut off after the concern was met: the copy may or may not have stored
                # it, so it is hinted (replaying a write is idempotent) and stops serving
                # reads until the replay.
                with anyio.CancelScope(shield=True):
                    misses[node.url] = await self._hint(node, target, content, reason="slow")
                raise
            check()

        if len(self.nodes) == 1:
            await one(self.primary)
        else:
            async with anyio.create_task_group() as tg:
                for node in self.nodes:
                    tg.start_soon(one, node)
                await settled.wait()
                # The concern is met (or nothing is left to wait for): copies still writing
                # get a grace period, then are left to the hint log, so a hung copy does not
                # hold up a write acknowledged by others.
                with anyio.move_on_after(self.config.write_grace):
                    await finished.wait()
                tg.cancel_scope.cancel()
        if refusals:
            raise next(iter(refusals.values()))
        if len(answers) < needed:
            if len(self.nodes) == 1:
                raise next(iter(misses.values()))
            raise WriteConcernError(
                target.op,
                misses,
                shard=self.name,
                concern=concern,
                acknowledged=sorted(answers),
            )
        if self.primary.url in answers:
            return answers[self.primary.url]
        return next(iter(answers.values()))

    async def _hint(
        self, node: Node, target: HintTarget, content: bytes, *, reason: str
    ) -> BaseException:
        log = self._hints
        if log is None or len(self.nodes) == 1:
            # A lone node has no other copy to catch up from; the caller sees the failure.
            return NodeUnavailableError(shard=self.name, node=node.url, attempts=[reason])
        try:
            await anyio.to_thread.run_sync(
                lambda: log.append(
                    node.url,
                    target.tenant,
                    target.database,
                    target.collection_id,
                    target.collection_name,
                    target.op,
                    content,
                )
            )
        except HintLogFullError as exc:
            logger.error(
                "shard %s node %s: %s; the node serves no reads until `sharded-chroma repair`",
                self.name,
                node.url,
                exc,
            )
            node.stale = True
            node.needs_repair = True
            node.hint_epoch += 1
            return exc
        node.stale = True
        node.hint_epoch += 1
        return NodeUnavailableError(
            shard=self.name, node=node.url, attempts=[f"{reason}; write kept in the hint log"]
        )

    # -- catch-up ---------------------------------------------------------------------------

    def mark_pending(self, counts: dict[str, int]) -> None:
        """Mark copies with hints left by an earlier process as stale until replayed."""
        for node in self.nodes:
            if counts.get(node.url):
                node.stale = True

    def mark_repaired(self, node: Node) -> None:
        """A repair made the node equal to its primary: it may serve reads once its hints
        (if any arrived meanwhile) are replayed."""
        node.needs_repair = False
        log = self._hints
        if log is None or log.count(node.url) == 0:
            node.stale = False

    async def catch_up(self, *, force: bool = False) -> None:
        """Replay hints to stale copies whose retry time has come (or all, with ``force``).

        Runs inline in reads and writes, so it is bounded: a copy that does not finish within
        ``replay_inline_deadline`` is put in backoff and the call goes on without it."""
        now = self._clock()
        for node in self.nodes:
            if node.stale and not node.needs_repair and (force or node.healthy(now)):
                if force:
                    await self.replay(node)
                    continue
                with anyio.move_on_after(self.config.replay_inline_deadline) as scope:
                    await self.replay(node)
                if scope.cancelled_caught:
                    node.failed(self._clock())

    async def replay(self, node: Node) -> int:
        """Apply a node's hints in order; the node serves reads again once none are left.

        Returns how many hints were applied; 0 without waiting when another task or thread
        is already replaying this node.
        """
        log = self._hints
        if log is None or self._replay_target is None:
            return 0
        if not node.replay_lock.acquire(blocking=False):
            return 0
        replayed = 0
        leased = False
        try:
            # Exclusive across processes sharing the log too: two interleaved replays could
            # leave an older write last.
            leased = await anyio.to_thread.run_sync(log.lease, node.url, self._owner, _LEASE_TTL)
            if not leased:
                return 0
            expired = await anyio.to_thread.run_sync(log.expire)
            if expired.get(node.url):
                logger.error(
                    "shard %s node %s: %d hint(s) expired before they could be replayed; "
                    "run `sharded-chroma repair`",
                    self.name,
                    node.url,
                    expired[node.url],
                )
            while True:
                epoch = node.hint_epoch
                batch = await anyio.to_thread.run_sync(log.pending, node.url, 200)
                if not batch:
                    # A write hinted while this replay ran keeps the node stale, and so does
                    # a write that never reached the log.
                    if node.hint_epoch == epoch and not node.needs_repair:
                        node.stale = False
                    break
                applied = await self._apply(node, batch, log)
                replayed += applied
                if applied < len(batch):
                    break
                await anyio.to_thread.run_sync(log.lease, node.url, self._owner, _LEASE_TTL)
        finally:
            if leased:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(log.release, node.url, self._owner)
            node.replay_lock.release()
        if replayed:
            logger.info("shard %s node %s: replayed %d hint(s)", self.name, node.url, replayed)
            node.succeeded()
        return replayed

    async def _apply(self, node: Node, batch: Sequence[Hint], log: HintLog) -> int:
        assert self._replay_target is not None
        done_upto = None
        applied = 0
        try:
            for hint in batch:
                target = HintTarget(
                    hint.tenant, hint.database, hint.collection_id, hint.collection_name, hint.op
                )
                try:
                    path = await self._replay_target(node, target)
                    await node.transport.request("POST", path, content=hint.body)
                except NotFoundError:
                    # The collection was deleted since: the write has nothing to apply to.
                    logger.info("hint %d for a deleted collection skipped", hint.id)
                done_upto = hint.id
                applied += 1
        except NodeUnavailableError:
            node.failed(self._clock())
        finally:
            if done_upto is not None:
                # Shielded: an applied hint that is not acknowledged would be applied again.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(log.ack, node.url, done_upto)
        return applied

    async def aclose(self) -> None:
        for node in self.nodes:
            await node.transport.aclose()


def _required(concern: str, copies: int) -> int:
    if concern == "all":
        return copies
    if concern == "quorum":
        return copies // 2 + 1
    if concern == "one":
        return 1
    raise ValueError(f"write concern must be 'all', 'quorum' or 'one', got {concern!r}")
