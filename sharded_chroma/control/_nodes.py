"""Node state shared by every host: ``SharedNodeStore``, a ``NodeStateStore`` made of this
host's ``SqliteNodeStore`` (read synchronously as before) and the control store (what other
hosts' logs say; keys in ``_nodekeys``). Its own thread and event loop publish which nodes
this log holds missed writes for (``publish``: before the write is acknowledged) and its
needs-repair marks, keep a per-process marker alive under a lease (hints of a log with no
live process are orphaned), and follow every host's keys into a snapshot; record reads and
writes first ``fence``: take in one list begun after the call began (shared by calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import anyio

from .._errors import ClientClosedError, ControlStoreError, ControlUnavailableError
from .._nodestate import NodeState, SqliteNodeStore
from ._backend import ControlBackend
from ._nodekeys import PREFIX, Snapshot, bound, merge, node_key, parse
from ._nodemarks import PublishedMarks

__all__ = ["SharedNodeStore"]

logger = logging.getLogger("sharded_chroma.replicas")

_T = TypeVar("_T")


class SharedNodeStore:
    """This host's node state plus every other host's (see the module docstring)."""

    shared = True

    def __init__(
        self,
        local: SqliteNodeStore,
        nodes: Iterable[str],
        open_backend: Callable[[], ControlBackend],
        *,
        lease_ttl: float = 15.0,
        poll: float = 0.02,
        timeout: float = 5.0,
    ) -> None:
        self._local = local
        self._urls = {node_key(u): u for u in nodes}
        self._open_backend = open_backend
        self._ttl = lease_ttl
        self._poll = poll
        self._timeout = timeout
        self.log_id = local.log_id()
        self.process = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._snap = Snapshot()
        self._changes = 0
        # Reloads numbered as their list starts (reads are linearizable): the newest wins.
        self._tickets = 0
        self._stored = 0
        self._finished = 0
        self._listing: anyio.Event | None = None
        self._fence_warned = 0.0
        # Stale keys this process published: url -> (lowest version named, revision).
        self._mine: dict[str, tuple[int, int]] = {}
        self._marks = PublishedMarks(local, self.log_id)
        self._backend: ControlBackend | None = None
        self._lease: int | None = None
        self._serial: anyio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scope: anyio.CancelScope | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name="sharded-chroma-nodestate", daemon=True
        )
        self._thread.start()
        if not self._started.wait(30.0) or self._failure is not None:
            self._closed = True
            self._thread.join(10.0)
            raise self._failure or ControlUnavailableError(
                "no answer within 30 s", backend="unknown", endpoint="unknown"
            )

    # -- NodeStateStore ---------------------------------------------------------------------

    def version(self) -> int:
        return self._local.version() * (1 << 32) + self._changes  # an int read is atomic

    def states(self) -> dict[str, NodeState]:
        local = self._local.states()
        with self._lock:
            snap = self._snap
        return merge(local, snap, self._urls, self.log_id)

    def mark_needs_repair(self, node: str, reason: str) -> None:
        self._local.mark_needs_repair(node, reason)
        self._call(lambda: self._reconcile_with(self._live()))

    def publish(self, node: str) -> None:
        # On the loop after any reconcile under way (which may be deleting the key).
        self._call(lambda: self._publish(node))

    def clear_repair(self, node: str, seen: NodeState) -> None:
        # Read first: once the local mark is gone the publishing loop forgets it.
        revisions = self._marks.revisions(node, seen)
        self._local.clear_repair(node, seen)

        async def clear() -> None:
            backend = self._live()
            nk = node_key(node)
            for revision in sorted(revisions):
                await backend.delete(f"{PREFIX}node/{nk}/repair", expect=revision)
            for name, revision in seen.orphans:
                await backend.delete(f"{PREFIX}node/{nk}/stale/{name}", expect=revision)
            await self._reload(backend)

        self._call(clear)

    def tombstones(self, node: str, collection_id: str, ids: Iterable[str]) -> dict[str, int]:
        return self._local.tombstones(node, collection_id, ids)

    def replay_bound(self, node: str) -> int | None:
        return bound(self._snap, node_key(node), self.log_id)  # one read of the reference

    async def fence(self) -> None:
        """Take in every host's state as the store has it now (see ``_fence``). If the store
        cannot answer, the last state seen is used (a host that cannot publish cannot
        acknowledge writes either), logged at most once a minute."""
        loop = self._loop
        if self._closed:
            raise ClientClosedError("node state used after close()")
        try:
            if loop is None or loop.is_closed():
                raise ControlStoreError("the node-state publisher stopped (see the log)")
            with anyio.fail_after(self._timeout + 1.0):
                # The outcome as a value: a fence cut off on that loop must not reach this
                # caller as its own cancellation.
                failed = await asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(self._fence_outcome(), loop)
                )
            if failed is not None:
                raise ControlStoreError(f"the fence failed: {failed!r}") from failed
        except (ControlStoreError, TimeoutError, OSError) as exc:
            now = time.monotonic()
            if now - self._fence_warned > 60.0:
                self._fence_warned = now
                logger.warning("reads use the last node state seen: %s", exc)

    def close(self) -> None:
        """Stop (the marker goes with its lease; keys of pending hints stay), then close
        the local store."""
        self._closed = True
        loop, scope = self._loop, self._scope
        if loop is not None and scope is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(scope.cancel)
        if self._thread.is_alive():
            self._thread.join(10.0)
        self._local.close()

    # -- calls from other threads -----------------------------------------------------------

    def _live(self) -> ControlBackend:
        if self._backend is None:
            raise ClientClosedError("node state used after close()")
        return self._backend

    def _call(self, make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """``make()`` on the loop, serialized with publishing, within ``timeout``."""
        if self._closed:
            raise ClientClosedError("node state used after close()")
        loop, serial, backend = self._loop, self._serial, self._backend
        where = {
            "backend": "unknown" if backend is None else backend.name,
            "endpoint": "unknown" if backend is None else backend.endpoint,
        }
        if loop is None or serial is None or loop.is_closed():
            raise ControlUnavailableError("the node-state publisher stopped (see the log)", **where)

        async def run() -> _T:
            with anyio.fail_after(self._timeout):
                async with serial:
                    return await make()

        future = asyncio.run_coroutine_threadsafe(run(), loop)
        try:
            return future.result(self._timeout + 1.0)
        except ControlUnavailableError:
            raise
        except Exception as exc:  # whatever failed, the state is not shared: say so
            future.cancel()
            message = f"cannot share node state through the control store: {exc}"
            raise ControlUnavailableError(message, **where) from exc

    # -- the background loop ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            anyio.run(self._main)
        except BaseException as exc:  # reported to the constructor, or logged
            if not self._started.is_set():
                self._failure = exc
            else:
                logger.exception("the node-state publisher stopped")
        finally:
            self._started.set()

    async def _main(self) -> None:
        backend = self._open_backend()
        try:
            self._lease = await backend.grant(self._ttl)
            await self._register(backend, self._lease)
            await self._reload(backend)
            self._serial = anyio.Lock()
            async with self._serial:
                await self._reconcile_with(backend)
            with anyio.CancelScope() as scope:
                self._scope, self._backend = scope, backend
                self._loop = asyncio.get_running_loop()
                self._started.set()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._keep_alive, backend)
                    tg.start_soon(self._follow, backend)
                    tg.start_soon(self._publish_loop)
        finally:
            with anyio.CancelScope(shield=True):
                if self._lease is not None:
                    with contextlib.suppress(Exception), anyio.move_on_after(5.0):
                        await backend.revoke(self._lease)
                await backend.aclose()

    async def _register(self, backend: ControlBackend, lease: int) -> None:
        marker = json.dumps({"pid": os.getpid(), "since": time.time()}).encode()
        await backend.put(f"{PREFIX}logs/{self.log_id}/{self.process}", marker, lease=lease)

    async def _keep_alive(self, backend: ControlBackend) -> None:
        while True:
            await anyio.sleep(self._ttl / 6)
            try:
                assert self._lease is not None
                if not await backend.refresh(self._lease):
                    # Expired while the store was out of reach: other hosts took this log's
                    # hints for orphans meanwhile (and may have repaired them); register again.
                    self._lease = await backend.grant(self._ttl)
                    await self._register(backend, self._lease)
                    assert self._serial is not None
                    async with self._serial:
                        self._mine.clear()  # maybe dropped as orphans meanwhile: again
            except Exception as exc:  # the marker must be kept alive whatever failed once
                logger.warning("cannot renew the node-state lease: %s", exc)

    async def _follow(self, backend: ControlBackend) -> None:
        while True:
            try:
                await backend.wait(PREFIX, self._snap.revision, 1.0)
                await self._reload(backend)
            except ControlUnavailableError as exc:
                logger.warning("cannot follow the shared node state: %s", exc)
                await anyio.sleep(0.5)
            except Exception:  # one bad round must not end following for good
                logger.exception("following the shared node state failed; retrying")
                await anyio.sleep(0.5)

    async def _reload(self, backend: ControlBackend, *, watch: bool = True) -> None:
        revision = await backend.revision() if watch else 0
        self._tickets += 1
        ticket = self._tickets
        entries = await backend.list(PREFIX)
        if not watch:
            # The list saw every key it returned: a lower bound for its point in time.
            revision = max([self._snap.revision, *(e.revision for e in entries)])
        snap = parse(revision, entries)
        self._finished = max(self._finished, ticket)
        with self._lock:
            if ticket < self._stored:
                return
            self._stored = ticket
            if not snap.same(self._snap):
                self._changes += 1
            self._snap = snap

    async def _fence_outcome(self) -> BaseException | None:
        try:
            await self._fence()
        except BaseException as exc:  # cancelled here included: the caller decides
            return exc
        return None

    async def _fence(self) -> None:
        """Return once a read of the store begun after this call has been taken in."""
        need = self._tickets + 1
        while self._finished < need:
            listing = self._listing
            if listing is not None:
                await listing.wait()
                continue
            done = self._listing = anyio.Event()
            try:  # bounded by the backend's own timeout and by the caller's
                await self._reload(self._live(), watch=False)
            finally:
                self._listing = None
                done.set()

    async def _publish_loop(self) -> None:
        assert self._serial is not None
        done = None
        while True:
            await anyio.sleep(self._poll)
            try:
                seen = (self.version(), self._snap.revision)  # nothing new: nothing to say
                if seen == done:
                    continue
                async with self._serial:
                    await self._reconcile_with(self._live())
                done = seen
            except (ControlUnavailableError, ControlStoreError) as exc:
                logger.warning("cannot publish this host's node state: %s", exc)
                await anyio.sleep(0.5)
            except Exception:  # the hint log's file failing, say: publishing must go on
                logger.exception("publishing this host's node state failed; retrying")
                await anyio.sleep(0.5)

    async def _reconcile_with(self, backend: ControlBackend) -> None:
        """Make the store say what this host's log says (under ``_serial``, with publish)."""
        local = self._local.states()
        oldest = self._local.oldest()
        snap = self._snap
        for nk, url in self._urls.items():
            # The mark first, or expired hints' key could go before their mark is up.
            await self._marks.reconcile(backend, nk, url, local.get(url, NodeState()), snap)
            put = self._mine.get(url)
            procs = snap.stale.get(nk, {}).get(self.log_id, {})
            if put is not None and snap.revision >= put[1] and self.process not in procs:
                del self._mine[url]  # dropped by another (as orphaned, say): put it back
            if url in oldest:
                await self._put_stale(backend, url, oldest[url])
            elif url in self._mine:
                await backend.delete(f"{PREFIX}node/{nk}/stale/{self.log_id}/{self.process}")
                del self._mine[url]  # only once gone: a failed delete is tried again
            await self._drop_dead_siblings(backend, nk, snap)

    async def _publish(self, url: str) -> None:
        oldest = self._local.oldest().get(url)
        if oldest is not None:
            await self._put_stale(self._live(), url, oldest, lower_only=True)

    async def _put_stale(
        self, backend: ControlBackend, url: str, oldest: int, *, lower_only: bool = False
    ) -> None:
        """Say this log holds hints for ``url`` from ``oldest`` on (``lower_only``: before an
        acknowledgement only a lower one is urgent)."""
        known = self._mine.get(url, (None, 0))[0]
        if known == oldest or (lower_only and known is not None and known < oldest):
            return
        key = f"{PREFIX}node/{node_key(url)}/stale/{self.log_id}/{self.process}"
        revision = await backend.put(key, json.dumps({"oldest": oldest}).encode())
        self._mine[url] = (oldest, revision or 0)

    async def _drop_dead_siblings(self, backend: ControlBackend, nk: str, snap: Snapshot) -> None:
        """Drop keys of this log's gone processes: this one speaks for the file now."""
        base = f"{PREFIX}node/{nk}/stale/{self.log_id}/"
        siblings = {
            p: r
            for p, (r, _) in snap.stale.get(nk, {}).get(self.log_id, {}).items()
            if p != self.process
        }
        if not siblings:
            return
        live = {e.key.rsplit("/", 1)[1] for e in await backend.list(f"{PREFIX}logs/{self.log_id}/")}
        for proc, revision in siblings.items():
            if proc not in live:
                await backend.delete(base + proc, expect=revision)
