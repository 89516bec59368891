"""CatchUp: drains the hint log to copies that are back, in the background.

Replay used to run inline in callers' reads and writes, under a short deadline: under load a
recovered copy then never caught up (each cut-off counted as a failure and doubled the pause
while new hints kept arriving). One background thread per client, with its own event loop
(callers may use the client from several loops and threads), replays instead: each behind copy
is tried every ``interval`` while it makes progress and every ``probe`` seconds while it does
not answer, at most ``rate`` hints per second per copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence

import anyio

from ._node import Node
from ._nodestate import NodeStates
from ._replicas import ReplicaSet

__all__ = ["CatchUp"]

logger = logging.getLogger("sharded_chroma.replicas")


class CatchUp:
    """The background replayer of one client. ``start`` once, ``close`` to stop."""

    def __init__(
        self,
        shards: Sequence[ReplicaSet],
        states: NodeStates,
        *,
        interval: float,
        probe: float,
        rate: float | None,
    ) -> None:
        self._shards = tuple(shards)
        self._states = states
        self._interval = interval
        self._probe = probe
        self._rate = rate
        self._next_try: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scope: anyio.CancelScope | None = None
        self._stopping = False
        self._started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="sharded-chroma-catchup", daemon=True
        )
        self.replayed = 0
        """Hints applied by this replayer since it started (for status and benchmarks)."""

    def start(self) -> None:
        self._thread.start()
        self._started.wait(5.0)

    def _run(self) -> None:
        anyio.run(self._main)

    async def _main(self) -> None:
        try:
            with anyio.CancelScope() as scope:
                self._loop = asyncio.get_running_loop()
                self._scope = scope
                self._started.set()
                while not self._stopping:
                    try:
                        await self._sweep()
                    except Exception:  # one bad sweep must not end catch-up for good
                        logger.exception("background hint replay failed; retrying")
                    await anyio.sleep(self._interval)
        finally:
            self._started.set()
            with anyio.CancelScope(shield=True):
                await self._close_sessions()

    async def _sweep(self) -> None:
        self._states.refresh()
        now = time.monotonic()
        due = [
            (rs, node)
            for rs in self._shards
            for node in rs.nodes
            if self._states.get(node.url).pending and now >= self._next_try.get(node.url, 0)
        ]
        # Copies at once: one that accepts connections but hangs must not hold up the others.
        async with anyio.create_task_group() as tg:
            for rs, node in due:
                tg.start_soon(self._drain, rs, node)

    async def _drain(self, rs: ReplicaSet, node: Node) -> None:
        url = node.url
        try:
            done = await rs.replay(node, rate=self._rate)
        except Exception as exc:  # resolving the target failed: the node waits a probe
            logger.warning("replaying hints to %s failed: %s", url, exc)
            done = 0
        self.replayed += done
        self._states.refresh()
        if done == 0 and self._states.get(url).pending:
            self._next_try[url] = time.monotonic() + self._probe
        else:
            self._next_try.pop(url, None)

    async def _close_sessions(self) -> None:
        for rs in self._shards:
            for node in rs.nodes:
                await node.transport.close_loop_session()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread: an applied batch is acknowledged first (that part is shielded)."""
        self._stopping = True
        loop, scope = self._loop, self._scope
        if loop is not None and scope is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(scope.cancel)
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("background hint replay did not stop within %.0f s", timeout)
