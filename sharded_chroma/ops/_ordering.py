"""Per-id write ordering inside one process: locks shared by every task and thread.

Every write of an id (add, upsert, update, delete, and each step of a move) holds the lock of
that id for its whole duration, so two writes of one id never interleave, whichever task,
thread or event loop issues them; writes of other ids run concurrently. A call takes its ids'
locks in sorted order, so two calls never wait on each other in a cycle.

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
    """Serializes the writes of each record id of a collection across tasks and threads.

    One lock per id that is being written (made on first use, dropped when its last user is
    done), so two calls on disjoint ids never wait on each other, however large they are; a
    call takes its ids' locks in sorted order."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[Hashable, str], _Entry] = {}

    def held(self) -> int:
        """How many ids have a lock now (for tests: it returns to 0 when writes are done)."""
        return len(self._locks)

    def _join(self, keys: list[tuple[Hashable, str]]) -> list[_Entry]:
        with self._guard:
            entries = []
            for key in keys:
                entry = self._locks.get(key)
                if entry is None:
                    entry = self._locks[key] = _Entry()
                entry.users += 1
                entries.append(entry)
            return entries

    def _leave(self, keys: list[tuple[Hashable, str]], entries: list[_Entry]) -> None:
        with self._guard:
            for key, entry in zip(keys, entries, strict=True):
                entry.users -= 1
                if entry.users == 0:
                    del self._locks[key]

    @contextlib.asynccontextmanager
    async def hold(self, collection: Hashable, ids: Iterable[str]) -> AsyncIterator[None]:
        """Hold the lock of every id in ``ids`` for the block's duration."""
        keys = [(collection, record_id) for record_id in sorted(set(ids))]
        entries = self._join(keys)
        taken = 0
        try:
            for entry in entries:
                await entry.lock.acquire()
                taken += 1
            yield
        finally:
            for entry in reversed(entries[:taken]):
                entry.lock.release()
            self._leave(keys, entries)


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = CrossLoopLock()
        self.users = 0
