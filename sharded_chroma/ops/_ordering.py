"""Per-id write ordering inside one process: lock stripes shared by every task and thread.

Every write of an id (add, upsert, update, delete, and each step of a move) holds the stripe of
that id for its whole duration, so two writes of one id never interleave, whichever task, thread
or event loop issues them; writes of ids on other stripes run concurrently. A call takes all its
stripes in ascending order, so two calls never wait on each other in a cycle.

The locks are FIFO and work across event loops: a waiter parks on a future of its own loop and
the releasing thread hands ownership over with ``call_soon_threadsafe``. (``anyio.Lock`` and
``asyncio.Lock`` belong to one loop; a ``threading.Lock`` would block the loop while it waits.)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Hashable, Iterable

__all__ = ["CrossLoopLock", "IdOrdering", "KeyedLocks"]


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class CrossLoopLock:
    """A FIFO mutex for coroutines on any event loop, in any thread."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def locked(self) -> bool:
        return self._held

    async def acquire(self) -> None:
        with self._guard:
            if not self._held:
                self._held = True
                return
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
        try:
            await future
        except BaseException:
            with self._guard:
                if future in self._waiters:
                    # Never handed the lock: just leave the queue.
                    self._waiters.remove(future)
                    raise
            # Ownership arrived together with the cancellation: pass it on.
            self.release()
            raise

    def release(self) -> None:
        with self._guard:
            while self._waiters:
                future = self._waiters.popleft()
                try:
                    future.get_loop().call_soon_threadsafe(_wake, future)
                except RuntimeError:
                    continue  # that waiter's loop is closed: it will never run again
                return  # ownership passes to the woken waiter; _held stays True
            self._held = False


class KeyedLocks:
    """One ``CrossLoopLock`` per key, made on first use (keys are few: parts of collections)."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, CrossLoopLock] = {}
        self._guard = threading.Lock()

    def lock(self, key: Hashable) -> CrossLoopLock:
        with self._guard:
            found = self._locks.get(key)
            if found is None:
                found = self._locks[key] = CrossLoopLock()
            return found

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock = self.lock(key)
        await lock.acquire()
        try:
            yield
        finally:
            lock.release()


class IdOrdering:
    """Serializes the writes of each record id of a collection across tasks and threads."""

    def __init__(self, stripes: int = 4096) -> None:
        if stripes < 1:
            raise ValueError(f"stripes must be at least 1, got {stripes}")
        self._stripes = [CrossLoopLock() for _ in range(stripes)]

    def stripes_of(self, collection: Hashable, ids: Iterable[str]) -> list[int]:
        """The stripe numbers a call on ``ids`` holds, ascending, each once."""
        n = len(self._stripes)
        return sorted({hash((collection, record_id)) % n for record_id in ids})

    @contextlib.asynccontextmanager
    async def hold(self, collection: Hashable, ids: Iterable[str]) -> AsyncIterator[None]:
        """Hold every stripe of ``ids`` (taken in ascending order) for the block's duration."""
        taken: list[CrossLoopLock] = []
        try:
            for number in self.stripes_of(collection, ids):
                lock = self._stripes[number]
                await lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()
