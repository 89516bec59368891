"""What a client offers for rebalancing: run or resume a migration, abort one, read a map.

Each call opens the control store on the caller's loop for its own duration (the client's
follower keeps its own connection on its thread)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from .._errors import ConfigurationError
from .._topology import Topology
from ..catalog._catalog import Catalog
from ..catalog._generations import Generations
from ..catalog._layouts import PartLayouts
from ..catalog._state import CollectionState
from ..cluster._cluster import Cluster
from ..control._maps import PartitionMap
from ..control._open import open_backend
from ..control._served import unserved
from ..control._store import ControlStore
from ..ops._migrating import mirrorable
from ..ops._partio import PartIO
from ._engine import MigrationReport, Migrator
from ._hintbarrier import HintBarrier
from ._passes import Progress
from ._rebuild import Rebuilder
from ._targets import TargetCollections

__all__ = ["Rebalancing"]


class Rebalancing:
    """Migrations of this client's collections (needs ``[control]`` in the topology)."""

    def __init__(
        self,
        topology: Topology,
        catalog: Catalog,
        io: PartIO,
        cluster: Cluster,
        layouts: PartLayouts,
        generations: Generations,
    ) -> None:
        self._layouts = layouts
        self._generations = generations
        self._topology = topology
        self._catalog = catalog
        self._io = io
        self._cluster = cluster

    def _store(self) -> ControlStore:
        if self._topology.control is None:
            raise ConfigurationError(
                "rebalancing needs a control store: add a [control] table to the topology "
                '(backend = "sqlite" on one host, "etcd" with endpoints for more)'
            )
        return ControlStore(open_backend(self._topology))

    async def _state(self, name: str) -> CollectionState:
        t = self._topology
        model = await self._catalog.get_collection(name, t.tenant, t.database)
        return await self._catalog.state(model.id, t.tenant, t.database)

    def _parts(self, options: dict[str, Any]) -> tuple[TargetCollections, HintBarrier]:
        """What both kinds of move are built with; ``options`` loses the control-store ones
        and gains their topology defaults."""
        control = self._topology.control
        assert control is not None
        options.setdefault("ack_timeout", control.ack_timeout)
        options.setdefault("lease_ttl", control.lease_ttl)
        targets = TargetCollections(self._cluster, self._catalog, self._generations)
        return targets, HintBarrier(self._cluster, timeout=control.ack_timeout)

    def _migrator(self, store: ControlStore, options: dict[str, Any]) -> Migrator:
        targets, barrier = self._parts(options)
        return Migrator(
            store, self._io, self._layouts, targets, self._cluster.shard_names, barrier, **options
        )

    def _rebuilder(self, store: ControlStore, options: dict[str, Any]) -> Rebuilder:
        targets, barrier = self._parts(options)
        options.pop("concurrency", None)  # a generation is filled shard by shard
        return Rebuilder(
            store,
            self._io,
            self._generations,
            targets,
            self._cluster.shard_names,
            barrier,
            **options,
        )

    @staticmethod
    async def _is_rebuild(store: ControlStore, state: CollectionState) -> bool:
        found = await store.load_migration(str(state.id))
        return found is not None and found[0].get("kind") == "rebuild"

    @contextlib.asynccontextmanager
    async def _session(self, name: str) -> AsyncIterator[tuple[ControlStore, CollectionState]]:
        """The control store (closed afterwards) and the collection's state, with no map
        served inside: the migrator's own requests are never mirrored or filtered, whatever
        the caller was serving."""
        store = self._store()
        try:
            state = await self._state(name)
            with unserved():
                yield store, state
        finally:
            await store.backend.aclose()

    async def run(
        self,
        name: str,
        goal: Any | None,
        *,
        batch: int = 500,
        rate: float | None = None,
        progress: Progress | None = None,
        **options: Any,
    ) -> MigrationReport:
        """Migrate to ``goal``, or (None) resume what is recorded, a rebuild included."""
        given = {"batch": batch, "rate": rate, "progress": progress, **options}
        async with self._session(name) as (store, state):
            if goal is None:
                if await self._is_rebuild(store, state):
                    return await self._rebuilder(store, given).run(state, None)
                return await self._migrator(store, given).run(state, None)
            goal = self._topology.bind(goal)
            generation = state.stored_generation
            current, _ = await store.ensure_map(str(state.id), state.policy, generation)
            if not (mirrorable(current.policy) and mirrorable(goal)):
                # Placed by metadata: every record moves into a new generation.
                return await self._rebuilder(store, given).run(state, {}, goal)
            return await self._migrator(store, given).run(state, goal)

    async def rebuild(
        self,
        name: str,
        changes: Mapping[str, Any] | None,
        *,
        batch: int = 500,
        rate: float | None = None,
        progress: Progress | None = None,
        **options: Any,
    ) -> MigrationReport:
        """Rebuild with ``changes`` to the index parameters (None: resume)."""
        given = {"batch": batch, "rate": rate, "progress": progress, **options}
        async with self._session(name) as (store, state):
            return await self._rebuilder(store, given).run(state, changes)

    async def abort(self, name: str, **options: Any) -> MigrationReport:
        """Roll back the migration or rebuild recorded, if it has not cut over."""
        async with self._session(name) as (store, state):
            if await self._is_rebuild(store, state):
                return await self._rebuilder(store, options).abort(state)
            return await self._migrator(store, options).abort(state)

    async def current_map(self, name: str) -> PartitionMap:
        """The collection's map in the control store (epoch 0 from its stored policy when it
        has none yet)."""
        store = self._store()
        try:
            state = await self._state(name)
            found, _ = await store.ensure_map(str(state.id), state.policy, state.stored_generation)
            return found
        finally:
            await store.backend.aclose()

    async def migration(self, name: str) -> dict[str, Any] | None:
        """The migration record of a collection (step, cursors, tag), or None."""
        store = self._store()
        try:
            state = await self._state(name)
            found = await store.load_migration(str(state.id))
            return None if found is None else found[0]
        finally:
            await store.backend.aclose()
