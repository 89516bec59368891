"""How one client follows the partition maps of the control store.

``Epochs`` runs on its own thread and event loop (callers use a client from several loops and
threads; the control store's connection belongs to one loop). It holds the client's lease,
watches the maps of the collections the client opened, and acknowledges a new epoch only once
no call begun under an older one is still running, so a migrator that saw every client
acknowledge knows no write can still reach a place the old map named. See ``_served`` for how a
call's map is carried down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio

from .._errors import ClientClosedError, ControlStoreError, ControlUnavailableError
from ._backend import ControlBackend
from ._maps import PartitionMap
from ._served import Served
from ._store import ControlStore

__all__ = ["Epochs"]

logger = logging.getLogger("sharded_chroma.control")

_T = TypeVar("_T")


class _Followed:
    """One collection this client serves: its current map and calls in flight per epoch."""

    def __init__(self, current: PartitionMap, revision: int) -> None:
        self.current = current
        self.revision = revision
        self.in_flight: dict[int, int] = {}
        self.acked = current.epoch
        # One acknowledgement at a time per collection, so a stored ack never goes back.
        self.adopting = anyio.Lock()


class Epochs:
    """The client's follower of the control store (see the module docstring)."""

    def __init__(
        self,
        open_backend: Callable[[], ControlBackend],
        *,
        lease_ttl: float = 15.0,
        ack_poll: float = 0.01,
    ) -> None:
        self._open_backend = open_backend
        self.client_id = uuid.uuid4().hex
        self._ttl = lease_ttl
        self._ack_poll = ack_poll
        self._lock = threading.Lock()
        self._followed: dict[str, _Followed] = {}
        self._lease: int | None = None
        # Writes stop before the lease can have expired in the store: a migrator waits for
        # acknowledgements only from clients whose lease is alive.
        self._valid_until = 0.0
        self._store: ControlStore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scope: anyio.CancelScope | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._closed = False
        self._dead = False
        # Set when a new lease was granted: writes wait until every followed collection is
        # acknowledged again under it (a renewal alone must not make the client writable).
        self._reregister = False
        self._thread = threading.Thread(target=self._run, name="sharded-chroma-epochs", daemon=True)
        self._thread.start()
        self._started.wait(30.0)
        if self._failure is not None:
            raise self._failure

    # -- the background loop ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            anyio.run(self._main)
        except BaseException as exc:  # reported to the constructor, or logged
            if not self._started.is_set():
                self._failure = exc
            else:
                logger.exception("the control-store follower stopped")
        finally:
            self._started.set()

    async def _main(self) -> None:
        backend = self._open_backend()
        store = ControlStore(backend)
        try:
            self._lease = await backend.grant(self._ttl)
            self._valid_until = time.monotonic() + self._ttl * 2 / 3
            self._store = store
            with anyio.CancelScope() as scope:
                self._scope = scope
                self._loop = asyncio.get_running_loop()
                self._started.set()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._keep_lease, backend)
                    tg.start_soon(self._watch, store)
        finally:
            # Writes stop first: once the lease is revoked no migrator waits for this client.
            self._valid_until = 0.0
            self._dead = True
            with anyio.CancelScope(shield=True):
                if self._lease is not None:
                    with contextlib.suppress(Exception), anyio.move_on_after(5.0):
                        await backend.revoke(self._lease)
                await backend.aclose()

    async def _keep_lease(self, backend: ControlBackend) -> None:
        while True:
            await anyio.sleep(self._ttl / 6)
            started = time.monotonic()
            try:
                assert self._lease is not None
                alive = await backend.refresh(self._lease)
                if not alive:
                    # Expired while the store was out of reach: a migrator may have gone on
                    # without this client. Serve again only under a new lease, at the newest
                    # epochs, once every collection is acknowledged under it.
                    logger.warning("the client lease expired; registering again")
                    self._valid_until = 0.0
                    self._lease = await backend.grant(self._ttl)
                    self._reregister = True
                if self._reregister:
                    with self._lock:
                        for slot in self._followed.values():
                            slot.acked = -2
                    await self._reload_all(force_ack=True)
                    self._reregister = False
            except (ControlUnavailableError, ControlStoreError) as exc:
                logger.warning("cannot renew the client lease: %s", exc)
                continue
            self._valid_until = started + self._ttl * 2 / 3

    async def _watch(self, store: ControlStore) -> None:
        revision = await store.backend.revision()
        while True:
            try:
                revision = await store.backend.wait("maps/", revision, 1.0)
                await self._reload_all(force_ack=False)
            except ControlUnavailableError as exc:
                logger.warning("cannot watch the partition maps: %s", exc)
                await anyio.sleep(0.5)
            except ControlStoreError as exc:
                # A map this client cannot read (a newer version wrote it): keep the lease,
                # acknowledge nothing, so no migration goes on without this client.
                logger.error("cannot follow the partition maps: %s", exc)
                await anyio.sleep(1.0)

    async def _reload_all(self, *, force_ack: bool) -> None:
        store = self._store
        assert store is not None
        with self._lock:
            names = list(self._followed)
        for name in names:
            found = await store.load_map(name)
            if found is None:
                continue
            await self._adopt(name, *found, force_ack=force_ack)

    async def _adopt(self, name: str, new: PartitionMap, revision: int, *, force_ack: bool) -> None:
        with self._lock:
            slot = self._followed.get(name)
        if slot is None:
            return
        async with slot.adopting:
            with self._lock:
                if new.epoch > slot.current.epoch:
                    logger.info(
                        "collection %s: epoch %d -> %d (%s)",
                        name,
                        slot.current.epoch,
                        new.epoch,
                        new.phase,
                    )
                    slot.current, slot.revision = new, revision
                elif not force_ack and slot.acked >= slot.current.epoch:
                    return
                epoch = slot.current.epoch
            # Acknowledge only when no call begun under an older epoch is still running.
            while True:
                with self._lock:
                    if not any(n for e, n in slot.in_flight.items() if e < epoch):
                        break
                await anyio.sleep(self._ack_poll)
            store, lease = self._store, self._lease
            assert store is not None and lease is not None
            if await store.ack(name, self.client_id, epoch, lease):
                with self._lock:
                    slot.acked = max(slot.acked, epoch)

    # -- what callers use (any thread, any loop) --------------------------------------------

    async def _on_loop(self, make: Callable[[], Awaitable[_T]]) -> _T:
        loop = self._loop
        if self._closed or loop is None or loop.is_closed():
            raise ClientClosedError("client used after aclose()")

        async def run() -> _T:
            return await make()

        future = asyncio.run_coroutine_threadsafe(run(), loop)
        return await asyncio.wrap_future(future)

    async def follow(
        self, collection: str, stored_policy: Any, stored_generation: int = 0
    ) -> PartitionMap:
        """Start serving a collection: registered first (so a migrator waits for this
        client), then its map read (epoch 0 from ``stored_policy`` if it has none)."""
        with self._lock:
            slot = self._followed.get(collection)
        if slot is not None:
            return slot.current

        async def run() -> PartitionMap:
            store, lease = self._store, self._lease
            assert store is not None and lease is not None
            if not await store.ack(collection, self.client_id, -1, lease):
                raise ControlStoreError(f"the client lease in {store.where} expired")
            try:
                found, revision = await store.ensure_map(
                    collection, stored_policy, stored_generation
                )
            except BaseException:
                # A pending -1 of a collection this client does not follow would hold every
                # migration of it until this client closes.
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await store.unack(collection, self.client_id)
                raise
            with self._lock:
                slot = self._followed.setdefault(collection, _Followed(found, revision))
            slot.acked = -1
            await self._adopt(collection, found, revision, force_ack=True)
            return slot.current

        return await self._on_loop(run)

    @contextlib.asynccontextmanager
    async def hold(self, state: Any, *, writes: bool) -> AsyncIterator[Served | None]:
        """Hold ``state``'s collection's current map for one call (counted in flight until
        the block ends); ``Served.active()`` makes it the served map of code run inside."""
        if self._dead and not self._closed:
            raise ControlUnavailableError(
                "the control-store follower of this client stopped (see the log); create a "
                "new client",
                backend="unknown" if self._store is None else self._store.backend.name,
                endpoint="unknown" if self._store is None else self._store.backend.endpoint,
            )
        name = str(state.id)
        with self._lock:
            slot = self._followed.get(name)
        if slot is None:
            await self.follow(name, state.policy, state.stored_generation)
            with self._lock:
                slot = self._followed[name]
        if writes:
            self._check_lease()
        with self._lock:
            current = slot.current
            slot.in_flight[current.epoch] = slot.in_flight.get(current.epoch, 0) + 1
        try:
            yield Served(name, current, self._check_lease)
        finally:
            with self._lock:
                left = slot.in_flight[current.epoch] - 1
                if left:
                    slot.in_flight[current.epoch] = left
                else:
                    del slot.in_flight[current.epoch]

    @contextlib.asynccontextmanager
    async def serving(self, state: Any, *, writes: bool) -> AsyncIterator[None]:
        """Serve one call (no ``yield`` inside it) of ``state``'s collection."""
        async with self.hold(state, writes=writes) as served:
            assert served is not None
            with served.active():
                yield

    def _check_lease(self) -> None:
        if time.monotonic() < self._valid_until:
            return
        store = self._store
        raise ControlUnavailableError(
            "this client could not renew its lease, so a migration may have moved on without "
            "it; writes wait until it can (reads go on under the last map)",
            backend="unknown" if store is None else store.backend.name,
            endpoint="unknown" if store is None else store.backend.endpoint,
        )

    def close(self) -> None:
        """Stop following: the lease is revoked, so migrators stop waiting for this client."""
        self._closed = True
        loop, scope = self._loop, self._scope
        if loop is not None and scope is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(scope.cancel)
        if self._thread.is_alive():
            self._thread.join(10.0)
