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

    One FIFO lock per id that is being written, made when first taken and dropped when its
    last holder is done, so two calls on disjoint ids never wait on each other, however large
    they are. A call takes its ids' locks in sorted order. Every lock's state lives in one
    table behind one guard, so an uncontended id costs a dictionary insert and a delete."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held: dict[tuple[int, str], deque[asyncio.Future[None]]] = {}
        """Ids held now, each with the queue of waiters for it."""

    def held(self) -> int:
        """How many ids are held now (for tests: 0 once writes are done)."""
        return len(self._held)

    @contextlib.asynccontextmanager
    async def hold(self, collection: Hashable, ids: Iterable[str]) -> AsyncIterator[None]:
        """Hold the lock of every id in ``ids`` for the block's duration."""
        space = hash(collection)  # once per call: a UUID hashes in Python, slowly
        keys = [(space, record_id) for record_id in sorted(set(ids))]
        taken = 0
        try:
            while taken < len(keys):
                taken, waiter = self._take_free(keys, taken)
                if waiter is not None:
                    await self._wait(keys[taken], waiter)
                    taken += 1
            yield
        finally:
            self._release(keys[:taken])

    def _take_free(
        self, keys: list[tuple[int, str]], start: int
    ) -> tuple[int, asyncio.Future[None] | None]:
        """Take keys from ``start`` on while they are free; at the first held one, queue a
        waiter for it. Returns the index reached and that waiter (None: all taken)."""
        held = self._held
        with self._guard:
            for n in range(start, len(keys)):
                key = keys[n]
                queue = held.get(key)
                if queue is None:
                    held[key] = deque()
                    continue
                future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                queue.append(future)
                return n, future
        return len(keys), None

    async def _wait(self, key: tuple[int, str], future: asyncio.Future[None]) -> None:
        try:
            await future
        except BaseException:
            with self._guard:
                queue = self._held.get(key)
                if queue is not None and future in queue:
                    queue.remove(future)  # never handed the lock
                    raise
            self._release([key])  # handed over together with the cancellation: pass it on
            raise

    def _release(self, keys: list[tuple[int, str]]) -> None:
        held = self._held
        with self._guard:
            for key in reversed(keys):
                queue = held[key]
                while queue:
                    future = queue.popleft()
                    try:
                        future.get_loop().call_soon_threadsafe(_wake, future)
                    except RuntimeError:
                        continue  # that waiter's loop is closed: it will never run again
                    break
                else:
                    del held[key]
