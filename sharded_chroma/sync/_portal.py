"""One event loop on a thread of its own, for callers that have none.

The sync client runs every call of the async core on this loop. Calls come from any thread at
once; each runs as its own task, in a copy of the calling thread's context variables (so
``sharded_chroma.options(...)`` and the application's current OpenTelemetry span follow the
call, as they follow an ``await``).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from concurrent.futures import CancelledError, Future
from typing import Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from .._errors import ClientClosedError

__all__ = ["Portal"]

_T = TypeVar("_T")


def _not_carried() -> frozenset[contextvars.ContextVar[Any]]:
    """Variables that describe the caller's own event loop, never the portal's: carrying
    sniffio's "which async library is running" from a trio worker thread would make anyio
    on the portal's asyncio loop believe it runs under trio."""
    try:
        import sniffio
    except ImportError:  # pragma: no cover - anyio may stop depending on it
        return frozenset()
    cvar = getattr(sniffio, "current_async_library_cvar", None)
    return frozenset() if cvar is None else frozenset({cvar})


_NOT_CARRIED = _not_carried()


async def _in_context(context: contextvars.Context, fn: Callable[[], Awaitable[_T]]) -> _T:
    # The caller's values are set in the task's own context, so they never leak into another
    # call. anyio 4.16 happens to start portal tasks in the calling thread's context already
    # (through call_soon_threadsafe); setting them here keeps that a promise of ours.
    for var, value in context.items():
        if var not in _NOT_CARRIED:
            var.set(value)
    return await fn()


class Portal:
    """A running event loop on a daemon thread; ``call`` runs a coroutine function on it and
    blocks the calling thread until it ends. ``close`` refuses new calls, lets the calls in
    flight finish, then stops the loop."""

    def __init__(self, name: str = "sharded-chroma") -> None:
        self._stack = contextlib.ExitStack()
        self._portal: BlockingPortal = self._stack.enter_context(
            start_blocking_portal(name=f"{name}-portal")
        )
        self._thread_id: int = self._portal.call(threading.get_ident)
        self._cond = threading.Condition()
        self._in_flight = 0
        self._closing = False
        # Iterators' pump tasks: one left unfinished (its iterator abandoned, not yet
        # collected) would wait for its reader forever and hold ``close`` with it.
        self._pumps: set[Future[None]] = set()

    @property
    def closed(self) -> bool:
        return self._closing

    def _own_thread(self) -> None:
        if threading.get_ident() == self._thread_id:
            # Blocking here would wait on the loop this code runs on: a deadlock.
            raise RuntimeError(
                "a sync sharded_chroma client was called from its own event loop (an "
                "embedding function or callback running inside the client?)"
            )

    def _enter(self) -> None:
        self._own_thread()
        with self._cond:
            if self._closing:
                raise ClientClosedError("the client was closed; create a new one")
            self._in_flight += 1

    def _leave(self) -> None:
        with self._cond:
            self._in_flight -= 1
            if not self._in_flight:
                self._cond.notify_all()

    def _closed_error(self, exc: BaseException) -> BaseException:
        """The error to raise for ``exc``: ``ClientClosedError`` when a close ended the call."""
        if self._closing and isinstance(exc, (RuntimeError, CancelledError)):
            error = ClientClosedError("the client was closed while this call ran")
            error.__cause__ = exc
            return error
        return exc

    def call(self, fn: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
        """Run ``fn(*args, **kwargs)`` on the loop, in the caller's context; return its
        result or raise its exception (the same class the async client raises)."""
        self._enter()
        context = contextvars.copy_context()

        async def run() -> _T:
            return await fn(*args, **kwargs)

        try:
            return self._portal.call(_in_context, context, run)
        finally:
            self._leave()

    def iterate(self, make: Callable[[], AsyncIterator[_T]]) -> Generator[_T, None, None]:
        """A plain iterator over the async iterator ``make()`` returns. The async iterator
        runs whole in one task on the loop, at most one item ahead of the caller; leaving
        the loop early (``break``, an exception) cancels it, and ``close()`` ends it with
        ``ClientClosedError``."""
        self._own_thread()
        context = contextvars.copy_context()
        send, receive = anyio.create_memory_object_stream[_T](0)

        async def pump() -> None:
            async with send:
                async for item in make():
                    await send.send(item)

        with self._cond:
            # Started and registered as one step, so a close either refuses it or sees it.
            if self._closing:
                raise ClientClosedError("the client was closed; create a new one")
            future = self._portal.start_task_soon(_in_context, context, pump)
            self._pumps.add(future)
        future.add_done_callback(self._pumps.discard)
        try:
            while True:
                try:
                    item = self.call(receive.receive)
                except anyio.EndOfStream:
                    break
                except (RuntimeError, CancelledError) as exc:
                    raise self._closed_error(exc) from None
                yield item
            try:
                future.result()  # the pump's own error, if it ended with one
            except CancelledError as exc:
                raise self._closed_error(exc) from None
        finally:
            future.cancel()
            if threading.get_ident() != self._thread_id and not self._closing:
                with contextlib.suppress(RuntimeError, ClientClosedError):
                    self.call(receive.aclose)

    def close(self, last: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Refuse new calls, end running iterators, wait for the calls in flight, run
        ``last()`` on the loop (closing what lives on it), then stop the loop and join its
        thread. Idempotent."""
        if threading.get_ident() == self._thread_id:
            raise RuntimeError("close() a sync sharded_chroma client from outside its loop")
        with self._cond:
            if self._closing:
                return
            self._closing = True
            pumps = list(self._pumps)
        for pump in pumps:
            pump.cancel()
        with self._cond:
            self._cond.wait_for(lambda: not self._in_flight)
        try:
            if last is not None:
                self._portal.call(last)
        finally:
            self._stack.close()
