"""Before a migration deletes copies by filter, the writes hinted for them must have landed.

A write mirrored during a move to a copy that was down is kept in the hint log, and the copy is
behind until it is replayed: later writes to it queue behind that hint, so a cleanup (or abort)
delete, which every copy must store (it leaves no tombstone), cannot be met and its step failed
after its retries unless a background replayer happened to drain the hints first. So the step
first replays, and waits for, every hint of the copies involved older than its phase change.

This host's hints only: a hint kept on another host is replayed by that host's clients, and one
replayed after the delete brings the deleted copy back on that one copy (see design notes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import anyio

from .._errors import ControlStoreError
from .._nodeconfig import redact_url
from ..cluster._cluster import Cluster

__all__ = ["HintBarrier"]

logger = logging.getLogger("sharded_chroma.rebalance")


class HintBarrier:
    """Replays, and waits out, this host's hints for the copies of some shards.

    Called once the phase that stops the writes which could recreate the copies is
    acknowledged by every client: every write begun under an older phase has then returned,
    and a write's hints are committed before it returns, so the hints to wait for all have an
    id up to the newest one at that moment. Hints written later are left alone."""

    def __init__(self, cluster: Cluster, *, timeout: float, poll: float = 0.5) -> None:
        self._cluster = cluster
        self._timeout = timeout
        self._poll = poll

    async def settle(
        self, what: str, shards: Iterable[str], fence: Callable[[], Awaitable[None]]
    ) -> None:
        """Replay the hints of ``shards``' copies up to now; raise ``ControlStoreError`` if
        some are still pending after the timeout (a copy is down: run the migration again)."""
        log = self._cluster.hints
        sets = [self._cluster.shards[s] for s in dict.fromkeys(shards) if s in self._cluster.shards]
        nodes = [n.url for rs in sets for n in rs.nodes]
        if log is None or not nodes:
            return
        upto = await anyio.to_thread.run_sync(log.last_id)
        deadline = time.monotonic() + self._timeout
        while True:
            await fence()
            for rs in sets:
                await rs.catch_up()
            left = await anyio.to_thread.run_sync(log.pending_upto, nodes, upto)
            if not left:
                return
            if time.monotonic() >= deadline:
                shown = ", ".join(f"{redact_url(u)} ({n})" for u, n in sorted(left.items()))
                raise ControlStoreError(
                    f"{what} waits for hinted writes to be replayed to {shown}; bring the "
                    "copies back and run the migration again (nothing was deleted)"
                )
            logger.info("%s waits for %d hinted write(s)", what, sum(left.values()))
            await anyio.sleep(self._poll)
