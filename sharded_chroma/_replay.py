"""Replaying a node's missed writes from the hint log, in order, exclusive per node across
tasks, threads and processes (a lease row in the log)."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import anyio
from chromadb.errors import NotFoundError

from ._errors import NodeUnavailableError
from ._hints import Hint, HintLog
from ._node import HintTarget, Node

__all__ = ["HintReplayer", "ReplayTarget"]

logger = logging.getLogger("sharded_chroma.replicas")

ReplayTarget = Callable[[Node, HintTarget], Awaitable[str]]
"""Resolves the request path of a hinted write on a node (the physical ids' owner does)."""

# Long enough for one batch of hints on a slow node; renewed after every batch.
_LEASE_TTL = 60.0


class HintReplayer:
    """Replays the hints of one shard's nodes."""

    def __init__(
        self,
        shard: str,
        hints: HintLog,
        replay_target: ReplayTarget,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = shard
        self._hints = hints
        self._replay_target = replay_target
        self._clock = clock
        self._owner = f"{os.getpid()}-{uuid.uuid4().hex}"

    async def replay(self, node: Node) -> int:
        """Apply a node's hints in order; the node serves reads again once none are left.

        Returns how many hints were applied; 0 without waiting when another task or thread
        is already replaying this node.
        """
        log = self._hints
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
