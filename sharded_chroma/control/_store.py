"""What the cluster keeps in the control store, on the backend's few primitives.

Keys (under the backend's namespace):

- ``maps/<collection id>``: the collection's ``PartitionMap``, replaced only by compare-and-swap
  on its revision, so two migrators can never both advance one epoch.
- ``acks/<collection id>/<client id>``: the newest epoch the client serves, under the client's
  lease. A client writes ``-1`` before it first reads the map, so a migrator never misses a
  client that is opening the collection while the epoch changes. A client that dies stops
  counting when its lease expires.
- ``migrators/<collection id>``: the one migrator allowed to change the map, under its lease.
- ``migrations/<collection id>``: the migration's own record (plan, step, cursors), written
  only by the lease holder, by compare-and-swap.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from .._errors import ControlStoreError, ControlUnavailableError
from ._backend import ControlBackend
from ._maps import PartitionMap

__all__ = ["ControlStore", "Laggard"]

logger = logging.getLogger("sharded_chroma.control")

_SHOWN = 5


class Laggard:
    """A client that has not acknowledged an epoch yet (for messages and status)."""

    def __init__(self, client: str, epoch: int) -> None:
        self.client = client
        self.epoch = epoch

    def __repr__(self) -> str:
        return f"{self.client}@{self.epoch}"


def owner_text(role: str) -> bytes:
    """Who holds a lease, for the error a second holder gets."""
    return orjson.dumps(
        {"role": role, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    )


class ControlStore:
    """Partition maps, acknowledgements, the migrator lease and migration records."""

    def __init__(self, backend: ControlBackend) -> None:
        self.backend = backend

    @property
    def where(self) -> str:
        return f"{self.backend.name} at {self.backend.endpoint}"

    # -- maps -------------------------------------------------------------------------------

    async def load_map(self, collection: str) -> tuple[PartitionMap, int] | None:
        """The collection's map and its revision; None when it has none yet."""
        entry = await self.backend.get(f"maps/{collection}")
        if entry is None:
            return None
        source = f"the map of collection {collection} in {self.where}"
        return PartitionMap.from_json(entry.value, source=source), entry.revision

    async def ensure_map(
        self, collection: str, policy: Any, generation: int = 0
    ) -> tuple[PartitionMap, int]:
        """The collection's map; a collection without one opens at epoch 0 from ``policy``
        and ``generation`` (as stored on its root). Two clients racing here agree: one
        creates, both read it."""
        for _ in range(3):
            found = await self.load_map(collection)
            if found is not None:
                return found
            first = PartitionMap(epoch=0, policy=policy, generation=generation)
            revision = await self.backend.put(f"maps/{collection}", first.to_json(), expect=None)
            if revision is not None:
                return first, revision
        raise ControlStoreError(f"the map of collection {collection} kept changing in {self.where}")

    async def swap_map(self, collection: str, new: PartitionMap, revision: int) -> int:
        """Replace the map stored at ``revision`` with ``new``; raises when it changed since."""
        done = await self.backend.put(f"maps/{collection}", new.to_json(), expect=revision)
        if done is None:
            raise ControlStoreError(
                f"the map of collection {collection} changed in {self.where} while epoch "
                f"{new.epoch} was being written; nothing was changed"
            )
        return done

    # -- acknowledgements -------------------------------------------------------------------

    async def ack(self, collection: str, client: str, epoch: int, lease: int) -> bool:
        """Record that ``client`` serves ``epoch`` (-1: opening); False if its lease is gone."""
        key = f"acks/{collection}/{client}"
        return await self.backend.put(key, str(epoch).encode(), lease=lease) is not None

    async def unack(self, collection: str, client: str) -> None:
        await self.backend.delete(f"acks/{collection}/{client}")

    async def laggards(self, collection: str, epoch: int) -> list[Laggard]:
        prefix = f"acks/{collection}/"
        out = []
        for entry in await self.backend.list(prefix):
            try:
                served = int(entry.value)
            except ValueError:
                served = -1
            if served < epoch:
                out.append(Laggard(entry.key[len(prefix) :], served))
        return out

    async def wait_for_acks(
        self,
        collection: str,
        epoch: int,
        within: float,
        *,
        tick: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Return once every live client of the collection serves ``epoch`` or newer (a client
        whose lease expired no longer counts); raises naming the laggards after ``within``.
        ``tick`` runs before every look (a migrator renews its lease there)."""
        deadline = time.monotonic() + within
        prefix = f"acks/{collection}/"
        while True:
            if tick is not None:
                await tick()
            revision = await self.backend.revision()
            late = await self.laggards(collection, epoch)
            if not late:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                shown = ", ".join(map(repr, late[:_SHOWN]))
                more = f" and {len(late) - _SHOWN} more" if len(late) > _SHOWN else ""
                raise ControlStoreError(
                    f"{len(late)} client(s) of collection {collection} did not acknowledge "
                    f"epoch {epoch} within {within:.0f} s ({shown}{more}); they hold it until "
                    "they catch up or their lease expires"
                )
            await self.backend.wait(prefix, revision, min(left, 1.0))

    # -- the migrator lease and the migration record ----------------------------------------

    async def acquire_migrator(self, collection: str, ttl: float) -> int:
        """The migrator lease of the collection; raises when another process holds it."""
        lease = await self.backend.grant(ttl)
        key = f"migrators/{collection}"
        if await self.backend.put(key, owner_text("migrator"), expect=None, lease=lease):
            return lease
        await self.backend.revoke(lease)
        held = await self.backend.get(key)
        who = "another process"
        if held is not None:
            with_owner = orjson.loads(held.value)
            who = f"pid {with_owner.get('pid')} on {with_owner.get('host')}"
        raise ControlStoreError(
            f"a migration of collection {collection} is already run by {who} ({self.where}); "
            "only one migrator may change a collection's map"
        )

    async def release_migrator(self, lease: int) -> None:
        """End the migrator lease; when the store cannot be reached it expires by itself
        (and a failure here must not hide the one that ended the run)."""
        try:
            await self.backend.revoke(lease)
        except ControlUnavailableError as exc:
            logger.warning("could not release the migrator lease (it will expire): %s", exc)

    async def load_migration(self, collection: str) -> tuple[dict[str, Any], int] | None:
        entry = await self.backend.get(f"migrations/{collection}")
        if entry is None:
            return None
        try:
            record = orjson.loads(entry.value)
        except orjson.JSONDecodeError as exc:
            raise ControlStoreError(
                f"the migration record of collection {collection} in {self.where} is "
                f"unreadable: {exc}"
            ) from exc
        return record, entry.revision

    async def save_migration(
        self, collection: str, record: dict[str, Any], revision: int | None
    ) -> int:
        """Write the record over the one at ``revision`` (None: there must be none)."""
        done = await self.backend.put(
            f"migrations/{collection}", orjson.dumps(record), expect=revision
        )
        if done is None:
            raise ControlStoreError(
                f"the migration record of collection {collection} changed in {self.where} "
                "under this migrator; another migrator ran: stopping"
            )
        return done

    async def drop_migration(self, collection: str, revision: int) -> None:
        await self.backend.delete(f"migrations/{collection}", expect=revision)
