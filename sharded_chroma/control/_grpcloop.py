"""One event loop per process for every etcd call.

grpc's asyncio layer serves all of a process's channels from one completion queue, and it
delivers a call's events to the loop the call was made on; with several loops in one process
(each client's control-store follower runs its own, next to the application's) an event can
reach a loop that is busy elsewhere or already closed ("Event loop is closed" in grpc's
callbacks), and the call it belongs to never completes. Seen as a client whose lease renewal
hung for good after etcd came back, so its writes never resumed. So every etcd channel of the
process is made and used on this one loop, in a daemon thread started on first use, and each
caller awaits the result on its own loop, bounded by its own timeout: a call that hangs here
costs its caller a timeout, never its loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio

__all__ = ["on_grpc_loop"]

_T = TypeVar("_T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_pid = 0


def _the_loop() -> asyncio.AbstractEventLoop:
    global _loop, _pid
    with _lock:
        # A forked child inherits the variable but not the thread: it starts its own.
        if _loop is None or _loop.is_closed() or _pid != os.getpid():
            ready = threading.Event()
            loop = asyncio.new_event_loop()

            def run() -> None:
                asyncio.set_event_loop(loop)
                ready.set()
                loop.run_forever()

            threading.Thread(target=run, name="sharded-chroma-etcd", daemon=True).start()
            ready.wait()
            _loop, _pid = loop, os.getpid()
        return _loop


async def on_grpc_loop(fn: Callable[[], Coroutine[Any, Any, _T]], *, limit: float | None) -> _T:
    """``await fn()`` run on the process's etcd loop; at most ``limit`` seconds of waiting
    here (None: unbounded, the caller's cancel scope bounds it). Cancelling the caller cancels
    the call there too, without waiting for it to wind down."""
    loop = _the_loop()
    if asyncio.get_running_loop() is loop:
        return await fn()
    future: concurrent.futures.Future[_T] = asyncio.run_coroutine_threadsafe(fn(), loop)
    try:
        with anyio.fail_after(limit):
            waited: Awaitable[_T] = asyncio.wrap_future(future)
            return await waited
    finally:
        future.cancel()
