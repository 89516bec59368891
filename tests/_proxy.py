"""A loopback TCP proxy for tests that need faults a real Chroma server can't produce.

``FaultProxy`` sits between a client and one real server on this machine and runs its own
event loop in a background thread, so sync and async tests drive it the same way::

    with FaultProxy("127.0.0.1", server_port) as proxy:
        client = await sharded_chroma.AsyncHttpClient(shards=[proxy.url])
        proxy.set_latency(0.05, jitter=pareto_delay(0.01, 1.5, 2.0), seed=7)
        proxy.cut()        # live connections reset, new ones refused
        proxy.blackhole()  # connections accepted and read, nothing ever answered
        proxy.restore()    # plain forwarding again

Fault controls may be called from any thread at any time. ``cut()``, ``restore()`` and
``stop()`` return only once the proxy has acted on them, so a test can rely on the new
behaviour right after the call. The proxy only ever listens on 127.0.0.1 and only ever connects
to the target it was given, which must be a loopback address.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import ipaddress
import math
import random
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["FaultProxy", "Jitter", "pareto_delay"]

Jitter = Callable[[random.Random], float]

_CHUNK = 64 * 1024
_CONNECT_TIMEOUT = 5.0
_CONTROL_TIMEOUT = 10.0

_FORWARD = "forward"
_CUT = "cut"
_BLACKHOLE = "blackhole"


def pareto_delay(scale: float, alpha: float, cap: float) -> Jitter:
    """A heavy-tailed jitter for ``set_latency``: ``scale * Pareto(alpha)``, at most ``cap``.

    Every draw is at least ``scale`` and ``P(delay > t) = (scale / t) ** alpha`` for
    ``scale <= t < cap``; a smaller ``alpha`` gives a heavier tail (``alpha <= 1`` has no
    finite mean, which is what makes hedged reads pay off).
    """
    if not (scale >= 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not (cap >= scale and math.isfinite(cap)):
        raise ValueError(f"cap must be a finite number >= scale, got {cap!r}")

    def draw(rng: random.Random) -> float:
        return min(cap, scale * rng.paretovariate(alpha))

    return draw


def _loopback_target(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"FaultProxy target must be a loopback IP address, got {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"FaultProxy target must be a loopback address, got {host!r}")
    return str(address)


class _Conn:
    """One proxied client connection and, once opened, its upstream connection."""

    __slots__ = ("awaiting_request", "client", "hung", "task", "upstream")

    def __init__(self, client: asyncio.StreamWriter, task: asyncio.Task[Any] | None) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.task = task
        # Bytes were dropped on this connection (blackhole), so it can never carry a clean
        # exchange again; restore() closes it.
        self.hung = False
        # The next client->server chunk starts a new request: nothing sent yet, or the server
        # has answered since the last one.
        self.awaiting_request = True

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                # abort() drops buffered data and sends RST; close() afterwards only marks the
                # StreamWriter closed so it never warns about being left open.
                writer.transport.abort()
                writer.close()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of one loopback server, with injectable faults.

    Modes: plain forwarding (the default and after ``restore()``), ``cut()`` and
    ``blackhole()``. ``set_latency`` is independent of the mode and stays in force across
    ``restore()``. Counters: ``connections_total`` (every accepted connection, refused ones
    included), ``open_connections``, ``bytes_up`` (client to server), ``bytes_down`` (server to
    client) and ``bytes_dropped`` (read during a blackhole and thrown away); forwarded bytes are
    counted once they are handed to the other side.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        if not (isinstance(target_port, int) and 0 < target_port < 65536):
            raise ValueError(f"target_port must be a TCP port number, got {target_port!r}")
        self.target_host = _loopback_target(target_host)
        self.target_port = target_port

        self._lock = threading.Lock()
        self._mode = _FORWARD
        self._fixed = 0.0
        self._jitter: Jitter | None = None
        self._rng = random.Random(0)
        self._connections_total = 0
        self._open_connections = 0
        self._bytes_up = 0
        self._bytes_down = 0
        self._bytes_dropped = 0

        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._conns: set[_Conn] = set()
        self._pending: set[asyncio.Task[None]] = set()
        self._started = False
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Bind a free port on 127.0.0.1 and start serving; returns ``self``."""
        with self._lock:
            if self._started:
                raise RuntimeError("FaultProxy.start() called twice")
            self._started = True
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="FaultProxy", daemon=True
        )
        self._thread.start()
        try:
            self._port = ready.result(timeout=_CONTROL_TIMEOUT)
        except BaseException:
            self._thread.join(_CONTROL_TIMEOUT)
            self._stopped = True
            raise
        self._thread.name = f"FaultProxy-{self._port}"
        return self

    def stop(self) -> None:
        """Close the listener and every connection and join the thread. Safe to call again."""
        with self._lock:
            if not self._started or self._stopped:
                self._stopped = True
                return
            self._stopped = True
        loop, stop_event, thread = self._loop, self._stop_event, self._thread
        if loop is not None and stop_event is not None:
            with contextlib.suppress(RuntimeError):  # loop already gone
                loop.call_soon_threadsafe(stop_event.set)
        if thread is not None and thread is not threading.current_thread():
            thread.join(_CONTROL_TIMEOUT)
            if thread.is_alive():
                raise RuntimeError("FaultProxy thread did not stop")

    close = stop

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"FaultProxy(port={self._port}, target={self.target_host}:{self.target_port}, "
            f"mode={self.mode})"
        )

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- fault controls -------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """``"forward"``, ``"cut"`` or ``"blackhole"``."""
        with self._lock:
            return self._mode

    def set_latency(
        self, fixed: float = 0.0, *, jitter: Jitter | None = None, seed: int = 0
    ) -> None:
        """Delay each request: ``fixed + jitter(rng)`` seconds before it goes upstream.

        The delay is applied to the first client->server chunk of every request (the first on
        a connection, or the first after the server has sent anything back), so a request body
        split over several reads is delayed once. ``jitter`` is called with a ``random.Random``
        seeded with ``seed`` (re-seeded on every call of this method); negative totals count
        as zero. ``set_latency(0)`` removes all latency.
        """
        if not (fixed >= 0 and math.isfinite(fixed)):
            raise ValueError(f"fixed latency must be a finite number >= 0, got {fixed!r}")
        with self._lock:
            self._fixed = float(fixed)
            self._jitter = jitter
            self._rng = random.Random(seed)

    def cut(self) -> None:
        """Reset every open connection now and refuse new ones (accept, then reset)."""
        with self._lock:
            self._mode = _CUT
        self._abort_where(lambda conn: True)

    def blackhole(self) -> None:
        """Read from every connection, open or new, and never forward nor answer anything.

        New connections are not forwarded upstream at all. A request caught by the blackhole
        is lost, so ``restore()`` closes every connection that had bytes dropped.
        """
        with self._lock:
            self._mode = _BLACKHOLE

    def restore(self) -> None:
        """Back to plain forwarding; connections ruined by a blackhole are closed."""
        with self._lock:
            self._mode = _FORWARD
        self._abort_where(lambda conn: conn.hung)

    # -- counters -------------------------------------------------------------------------

    @property
    def connections_total(self) -> int:
        with self._lock:
            return self._connections_total

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._open_connections

    @property
    def bytes_up(self) -> int:
        with self._lock:
            return self._bytes_up

    @property
    def bytes_down(self) -> int:
        with self._lock:
            return self._bytes_down

    @property
    def bytes_dropped(self) -> int:
        with self._lock:
            return self._bytes_dropped

    def reset_counters(self) -> None:
        """Zero the traffic counters (``open_connections`` keeps tracking live ones)."""
        with self._lock:
            self._connections_total = 0
            self._bytes_up = self._bytes_down = self._bytes_dropped = 0

    # -- event loop side ------------------------------------------------------------------

    def _abort_where(self, predicate: Callable[[_Conn], bool]) -> None:
        """Abort the matching connections, on the proxy's loop; returns once that is done."""
        done = threading.Event()

        def abort_matching() -> None:
            try:
                for conn in list(self._conns):
                    if predicate(conn):
                        conn.abort()
            finally:
                done.set()

        loop, thread = self._loop, self._thread
        if loop is None or thread is None or self._stopped:
            return
        if thread is threading.current_thread():
            abort_matching()
            return
        try:
            loop.call_soon_threadsafe(abort_matching)
        except RuntimeError:  # the loop is already closed: nothing left to abort
            return
        deadline = time.monotonic() + _CONTROL_TIMEOUT
        # Poll so that a concurrent stop(), which ends the loop before it gets to the callback,
        # does not leave this waiting.
        while not done.wait(0.05):
            if not thread.is_alive():
                return
            if time.monotonic() > deadline:
                raise RuntimeError("FaultProxy event loop did not respond")

    def _run(self, ready: concurrent.futures.Future[int]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _serve(self, ready: concurrent.futures.Future[int]) -> None:
        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        # A plain listening socket accepted from a reader callback rather than
        # asyncio.start_server or loop.sock_accept: with those, stopping while a connection is
        # half accepted leaks its socket. Here every accepted socket is owned by a task at once.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            listener.setblocking(False)
            loop.add_reader(listener, self._accept, loop, listener)
            try:
                ready.set_result(listener.getsockname()[1])
                await self._stop_event.wait()
            finally:
                loop.remove_reader(listener)
        finally:
            listener.close()
            tasks = [conn.task for conn in self._conns if conn.task is not None]
            tasks.extend(self._pending)
            for conn in list(self._conns):
                conn.abort()
            for task in list(self._pending):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Aborted transports close their sockets in callbacks scheduled on the loop.
            for _ in range(3):
                await asyncio.sleep(0)

    def _accept(self, loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
        for _ in range(64):  # then let other callbacks run; the listener stays readable
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # Out of file descriptors and the like: pause accepting rather than spin.
                loop.remove_reader(listener)
                loop.call_later(0.05, self._resume_accept, loop, listener)
                return
            sock.setblocking(False)
            task = loop.create_task(self._handle(sock))
            self._pending.add(task)
            task.add_done_callback(functools.partial(self._handled, sock))

    def _resume_accept(self, loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
        if listener.fileno() != -1 and not self._stop_event_set():
            loop.add_reader(listener, self._accept, loop, listener)

    def _stop_event_set(self) -> bool:
        return self._stop_event is None or self._stop_event.is_set()

    def _handled(self, sock: socket.socket, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        # A task cancelled before its first step never ran _handle, so nothing else would close
        # the socket. Otherwise its transport has been aborted and closing again is a no-op.
        sock.close()

    async def _handle(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        conn = _Conn(writer, asyncio.current_task())
        # Registering and reading the mode happen with no await in between, so a concurrent
        # cut()/restore() either sees this connection or this connection sees the new mode.
        self._conns.add(conn)
        with self._lock:
            self._connections_total += 1
            self._open_connections += 1
            mode = self._mode
        try:
            if mode == _CUT:
                return
            if mode == _BLACKHOLE:
                conn.hung = True
                await self._swallow(reader)
                return
            try:
                up_reader, conn.upstream = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port),
                    _CONNECT_TIMEOUT,
                )
            except (OSError, asyncio.TimeoutError):
                return  # upstream down: the client sees its connection reset
            await self._pump_both(conn, reader, up_reader)
        except (asyncio.CancelledError, OSError):
            pass
        finally:
            self._conns.discard(conn)
            conn.abort()
            with self._lock:
                self._open_connections -= 1

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(_CHUNK):
            with self._lock:
                self._bytes_dropped += len(data)

    async def _pump_both(
        self, conn: _Conn, client_reader: asyncio.StreamReader, up_reader: asyncio.StreamReader
    ) -> None:
        assert conn.upstream is not None
        up = asyncio.ensure_future(self._pump(conn, client_reader, conn.upstream, upstream=True))
        down = asyncio.ensure_future(self._pump(conn, up_reader, conn.client, upstream=False))
        try:
            # Either side closing ends the exchange; HTTP never relies on half-closed sockets.
            await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)

    async def _pump(
        self,
        conn: _Conn,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        while data := await reader.read(_CHUNK):
            if upstream and conn.awaiting_request:
                conn.awaiting_request = False
                delay = self._draw_delay()
                if delay > 0:
                    await asyncio.sleep(delay)
            with self._lock:
                blackholed = self._mode == _BLACKHOLE
                if blackholed:
                    self._bytes_dropped += len(data)
            if blackholed:
                conn.hung = True
                continue
            if not upstream:
                conn.awaiting_request = True
            writer.write(data)
            await writer.drain()
            with self._lock:
                if upstream:
                    self._bytes_up += len(data)
                else:
                    self._bytes_down += len(data)

    def _draw_delay(self) -> float:
        with self._lock:
            delay = self._fixed
            if self._jitter is not None:
                delay += self._jitter(self._rng)
        return max(0.0, delay)
