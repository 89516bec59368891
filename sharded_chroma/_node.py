"""One copy of a shard (``Node``: transport, health, catch-up state), what a hinted write names
(``HintTarget``), the hedging budget and the write-concern arithmetic."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from chromadb.errors import ChromaError

from ._nodestate import NodeStates
from ._topology import ReplicationConfig
from ._transport import NodeStats, NodeTransport

__all__ = ["HedgeBudget", "HintTarget", "Node", "node_fault", "required_copies"]


def node_fault(exc: ChromaError) -> bool:
    """Whether a Chroma error answer is the node's fault rather than the request's: a server
    error (500 ``InternalError``, such as a new collection's transient "Nothing found on
    disk"), which another copy may not have. Client errors (4xx) are the request's."""
    return exc.code() >= 500


@dataclass(frozen=True)
class HintTarget:
    """Which collection a write belongs to, so a missed write can be replayed later."""

    tenant: str
    database: str
    collection_id: str
    collection_name: str
    op: str
    version: int | None = None
    """A delete's version: replay removes only copies no newer than it."""
    deleted_ids: tuple[str, ...] = ()
    """The ids a delete surely removes, kept as tombstones of the copy that missed it."""
    deleted_version: int | None = None
    """The newest version of those ids the delete removes."""


class Node:
    """One copy of a shard: its transport, health and catch-up state."""

    def __init__(
        self,
        transport: NodeTransport,
        *,
        primary: bool,
        config: ReplicationConfig,
        states: NodeStates,
    ):
        self.transport = transport
        self._primary = primary
        self._config = config
        self._states = states
        self.failures = 0
        self.retry_at = 0.0
        self.hedges_sent = 0
        self.hedges_won = 0
        # A try-lock shared by every thread and task: one replay per node at a time, and a
        # caller that finds it taken moves on instead of waiting (the node stays stale).
        self.replay_lock = threading.Lock()
        self.latencies: deque[float] = deque(maxlen=256)

    @property
    def url(self) -> str:
        return self.transport.url

    @property
    def stale(self) -> bool:
        """Behind: writes it missed wait in the hint log, or were lost (needs repair). As
        this host's node state says now (see ``NodeStates``)."""
        self._states.refresh()
        return self._states.behind(self.url)

    @property
    def needs_repair(self) -> bool:
        """It lost writes nobody will replay: only a repair brings them back."""
        self._states.refresh()
        return self._states.get(self.url).needs_repair

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


class HedgeBudget:
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


def required_copies(concern: str, copies: int) -> int:
    if concern == "all":
        return copies
    if concern == "quorum":
        return copies // 2 + 1
    if concern == "one":
        return 1
    raise ValueError(f"write concern must be 'all', 'quorum' or 'one', got {concern!r}")
