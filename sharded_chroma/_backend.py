"""The sharded server API: the methods chromadb's AsyncCollection calls on its "server", done
across shards. This module holds the catalog (collections) and shared plumbing; record
operations are in ``_records``.

One physical collection of the same name exists on every shard. The cluster's id for a logical
collection is the id of its physical collection on the first shard (the catalog shard), which is
stable across processes and unique per creation, exactly like a single server's id.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

import anyio
from chromadb.api.collection_configuration import (
    CreateCollectionConfiguration,
    UpdateCollectionConfiguration,
    create_collection_configuration_to_json,
    update_collection_configuration_to_json,
)
from chromadb.api.types import CollectionMetadata, Schema
from chromadb.errors import NotFoundError
from chromadb.types import Collection as CollectionModel

from ._errors import ClientClosedError, ConfigurationError, ShardMismatchError
from ._fanout import fan_out, raise_for_failures
from ._routing import SlotTable
from ._topology import Topology
from ._transport import NodeTransport

__all__ = ["RESERVED_PREFIX", "SEQ_KEY", "BackendCore", "CollectionState"]

logger = logging.getLogger("sharded_chroma.client")

T = TypeVar("T")

RESERVED_PREFIX = "_sc_"
SEQ_KEY = "_sc_seq"
"""Hidden per-record sequence (a hybrid logical clock value): the cluster's insertion order."""
_ROUTING_META = "_sc_routing"
_SLOTS_META = "_sc_slots"


def strip_reserved(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if metadata is None:
        return None
    clean = {k: v for k, v in metadata.items() if not k.startswith(RESERVED_PREFIX)}
    return clean or None


@dataclass
class CollectionState:
    """What one client knows about a logical collection: its physical ids and cluster facts."""

    id: UUID
    name: str
    tenant: str
    database: str
    physical: dict[str, UUID]
    routing_key: str | None
    slot_table: SlotTable
    dimension: int | None = None
    configuration_json: dict[str, Any] = field(default_factory=dict)

    def path(self, shard: str, suffix: str = "") -> str:
        return (
            f"/tenants/{self.tenant}/databases/{self.database}"
            f"/collections/{self.physical[shard]}{suffix}"
        )


class _HybridClock:
    """Microsecond wall clock that never repeats or goes back within a process."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> int:
        with self._lock:
            base = max(time.time_ns() // 1000, self._last + 1)
            self._last = base + max(n, 1) - 1
            return base


class BackendCore:
    """Shards, their transports and the collections catalog."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.shard_names: tuple[str, ...] = tuple(s.name for s in topology.shards)
        self.catalog_shard = self.shard_names[0]
        self.slot_table = topology.slot_table()
        # Reads and writes go to each shard's primary; replicas are validated and kept for the
        # replica-set layer.
        self.primaries: dict[str, NodeTransport] = {
            s.name: NodeTransport(s.primary, s.name) for s in topology.shards
        }
        self.clock = _HybridClock()
        self._states: dict[UUID, CollectionState] = {}
        self._preflight: dict[str, dict[str, Any]] = {}
        self._write_locks: dict[tuple[UUID, str], anyio.Lock] = {}
        self.closed = False

    def _write_lock(self, state: CollectionState, shard: str) -> anyio.Lock:
        key = (state.id, shard)
        lock = self._write_locks.get(key)
        if lock is None:
            lock = self._write_locks[key] = anyio.Lock()
        return lock

    # -- plumbing ---------------------------------------------------------------------------

    def _base(self, tenant: str, database: str) -> str:
        return f"/tenants/{tenant}/databases/{database}"

    async def call_all(
        self,
        operation: str,
        make: Callable[[str, NodeTransport], Awaitable[T]],
        shards: Sequence[str] | None = None,
    ) -> dict[str, T]:
        """Run ``make`` on every (or the named) shard's primary; raise if any failed."""
        if self.closed:
            raise ClientClosedError("the client was closed; create a new one")
        names = self.shard_names if shards is None else shards
        calls = {n: functools.partial(make, n, self.primaries[n]) for n in names}
        results, failures = await fan_out(calls)
        raise_for_failures(operation, failures)
        return results

    async def preflight(self, shard: str) -> dict[str, Any]:
        cached = self._preflight.get(shard)
        if cached is None:
            cached = await self.primaries[shard].request(
                "GET", "/pre-flight-checks", idempotent=True
            )
            self._preflight[shard] = cached
        return cached

    async def get_max_batch_size(self) -> int:
        """The cluster's figure: the smallest limit of any shard, since a batch may land on one."""
        sizes = await self.call_all("get_max_batch_size", lambda n, _t: self.preflight(n))
        return self._smallest_limit(sizes.values())

    async def _batch_limit(self) -> int:
        """The batch limit for validating writes. Shards that cannot answer now are left out
        (all shards of a cluster normally share one limit), so a write whose records route to
        live shards is not refused because another shard is down."""
        missing = [n for n in self.shard_names if n not in self._preflight]
        if missing:
            _, failures = await fan_out({n: functools.partial(self.preflight, n) for n in missing})
            if len(failures) == len(self.shard_names):
                raise_for_failures("get_max_batch_size", failures)
        return self._smallest_limit(self._preflight.values())

    @staticmethod
    def _smallest_limit(preflights: Iterable[Mapping[str, Any]]) -> int:
        positive = [int(p.get("max_batch_size", -1)) for p in preflights]
        positive = [x for x in positive if x > 0]
        return min(positive) if positive else -1

    # -- server-wide ------------------------------------------------------------------------

    async def heartbeat(self) -> int:
        beats = await self.call_all(
            "heartbeat", lambda _n, t: t.request("GET", "/heartbeat", idempotent=True)
        )
        return int(beats[self.catalog_shard]["nanosecond heartbeat"])

    async def get_version(self) -> str:
        versions = await self.call_all(
            "get_version", lambda _n, t: t.request("GET", "/version", idempotent=True)
        )
        if len(set(versions.values())) > 1:
            logger.warning("shards run different Chroma versions: %s", versions)
        return str(versions[self.catalog_shard])

    async def reset(self) -> bool:
        await self.call_all("reset", lambda _n, t: t.request("POST", "/reset", idempotent=False))
        self._states.clear()
        return True

    # -- catalog ----------------------------------------------------------------------------

    def _model(self, raw: Mapping[str, Any]) -> CollectionModel:
        return CollectionModel.from_json(dict(raw))

    def _public_model(self, state: CollectionState, model: CollectionModel) -> CollectionModel:
        """The catalog shard's model, with cluster facts and without reserved metadata."""
        public = model.model_copy(
            update={
                "metadata": strip_reserved(model.metadata),
                "dimension": state.dimension,
            }
        )
        return public

    def _state_from_models(self, models: Mapping[str, CollectionModel]) -> CollectionState:
        catalog = models[self.catalog_shard]
        meta = catalog.metadata or {}
        routing = meta.get(_ROUTING_META)
        slots = meta.get(_SLOTS_META)
        if routing is None or slots is None:
            # Created outside this library: adopt the client's own policy.
            routing_key, table = self.topology.routing_key, self.slot_table
        else:
            routing_key = str(routing) or None
            if int(slots) != self.slot_table.slots:
                raise ConfigurationError(
                    f"collection {catalog.name!r} was created with {slots} slots but this "
                    f"client's topology has {self.slot_table.slots}; use the same slot count"
                )
            table = self.slot_table
        for shard, model in models.items():
            other = model.metadata or {}
            if other.get(_ROUTING_META) != routing or other.get(_SLOTS_META) != slots:
                raise ShardMismatchError(
                    f"collection {catalog.name!r} has a different routing policy than on "
                    f"shard {self.catalog_shard!r}",
                    shard=shard,
                )
            if model.configuration_json != catalog.configuration_json:
                raise ShardMismatchError(
                    f"collection {catalog.name!r} has a different configuration than on "
                    f"shard {self.catalog_shard!r}; results cannot be merged",
                    shard=shard,
                )
        dims = {m.dimension for m in models.values() if m.dimension is not None}
        if len(dims) > 1:
            raise ShardMismatchError(
                f"collection {catalog.name!r} holds embeddings of dimensions {sorted(dims)}",
                shard=next(s for s, m in models.items() if m.dimension == max(dims)),
            )
        state = CollectionState(
            id=catalog.id,
            name=catalog.name,
            tenant=catalog.tenant,
            database=catalog.database,
            physical={s: m.id for s, m in models.items()},
            routing_key=routing_key,
            slot_table=table,
            dimension=dims.pop() if dims else None,
            configuration_json=dict(catalog.configuration_json),
        )
        self._states[state.id] = state
        return state

    def _policy_metadata(self, metadata: CollectionMetadata | None) -> dict[str, Any]:
        for key in metadata or {}:
            if key.startswith(RESERVED_PREFIX):
                raise ValueError(
                    f"metadata key {key!r} uses the prefix {RESERVED_PREFIX!r}, "
                    "which sharded_chroma reserves"
                )
        return {
            **(metadata or {}),
            _ROUTING_META: self.topology.routing_key or "",
            _SLOTS_META: self.slot_table.slots,
        }

    async def create_collection(
        self,
        name: str,
        schema: Schema | None = None,
        configuration: CreateCollectionConfiguration | None = None,
        metadata: CollectionMetadata | None = None,
        get_or_create: bool = False,
        tenant: str = "default_tenant",
        database: str = "default_database",
    ) -> CollectionModel:
        body = {
            "name": name,
            "metadata": self._policy_metadata(metadata),
            "configuration": (
                create_collection_configuration_to_json(configuration, metadata)
                if configuration
                else None
            ),
            "schema": schema.serialize_to_json() if schema else None,
        }
        path = self._base(tenant, database) + "/collections"
        # The catalog shard decides (it raises the single-server error for an existing name);
        # the other shards then get-or-create, which also repairs a shard missing it.
        first = await self.primaries[self.catalog_shard].request(
            "POST", path, body={**body, "get_or_create": get_or_create}, idempotent=False
        )
        rest = await self.call_all(
            "create_collection",
            lambda _n, t: t.request(
                "POST", path, body={**body, "get_or_create": True}, idempotent=False
            ),
            shards=self.shard_names[1:],
        )
        models = {self.catalog_shard: self._model(first)}
        models.update({n: self._model(r) for n, r in rest.items()})
        state = self._state_from_models(models)
        return self._public_model(state, models[self.catalog_shard])

    async def _models_by_name(
        self, name: str, tenant: str, database: str
    ) -> dict[str, CollectionModel]:
        path = self._base(tenant, database) + f"/collections/{name}"
        results, failures = await fan_out(
            {
                n: (lambda t=t: t.request("GET", path, idempotent=True))  # type: ignore[misc]
                for n, t in self.primaries.items()
            }
        )
        if self.catalog_shard in failures:
            raise failures[self.catalog_shard]
        missing = [n for n, e in failures.items() if isinstance(e, NotFoundError)]
        if missing:
            raise ShardMismatchError(
                f"collection {name!r} is missing on this shard; "
                "get_or_create_collection() recreates it there",
                shard=missing[0],
            )
        raise_for_failures("get_collection", failures)
        return {n: self._model(r) for n, r in results.items()}

    async def get_collection(
        self, name: str, tenant: str = "default_tenant", database: str = "default_database"
    ) -> CollectionModel:
        models = await self._models_by_name(name, tenant, database)
        state = self._state_from_models(models)
        return self._public_model(state, models[self.catalog_shard])

    async def get_collection_by_id(
        self,
        collection_id: UUID,
        tenant: str = "default_tenant",
        database: str = "default_database",
    ) -> CollectionModel:
        raw = await self.primaries[self.catalog_shard].request(
            "GET",
            self._base(tenant, database) + f"/collections/by-id/{collection_id}",
            idempotent=True,
        )
        return await self.get_collection(str(raw["name"]), tenant, database)

    async def get_or_create_collection(
        self,
        name: str,
        schema: Schema | None = None,
        configuration: CreateCollectionConfiguration | None = None,
        metadata: CollectionMetadata | None = None,
        tenant: str = "default_tenant",
        database: str = "default_database",
    ) -> CollectionModel:
        return await self.create_collection(
            name, schema, configuration, metadata, True, tenant, database
        )

    async def list_collections(
        self,
        limit: int | None = None,
        offset: int | None = None,
        tenant: str = "default_tenant",
        database: str = "default_database",
    ) -> list[CollectionModel]:
        params = {k: v for k, v in (("limit", limit), ("offset", offset)) if v is not None}
        raw = await self.primaries[self.catalog_shard].request(
            "GET", self._base(tenant, database) + "/collections", params=params, idempotent=True
        )
        out = []
        for item in raw:
            model = self._model(item)
            state = self._states.get(model.id)
            out.append(
                model.model_copy(
                    update={
                        "metadata": strip_reserved(model.metadata),
                        "dimension": state.dimension if state else model.dimension,
                    }
                )
            )
        return out

    async def count_collections(
        self, tenant: str = "default_tenant", database: str = "default_database"
    ) -> int:
        raw = await self.primaries[self.catalog_shard].request(
            "GET", self._base(tenant, database) + "/collections_count", idempotent=True
        )
        return int(raw)

    async def delete_collection(
        self, name: str, tenant: str = "default_tenant", database: str = "default_database"
    ) -> None:
        path = self._base(tenant, database) + f"/collections/{name}"
        # Other shards first: if one fails, the catalog still lists the collection and the
        # caller can retry, instead of data left behind under a name nobody sees.
        _, failures = await fan_out(
            {
                n: (lambda t=t: t.request("DELETE", path, idempotent=False))  # type: ignore[misc]
                for n, t in self.primaries.items()
                if n != self.catalog_shard
            }
        )
        raise_for_failures(
            "delete_collection",
            {n: e for n, e in failures.items() if not isinstance(e, NotFoundError)},
        )
        await self.primaries[self.catalog_shard].request("DELETE", path, idempotent=False)
        for key, state in list(self._states.items()):
            if (state.name, state.tenant, state.database) == (name, tenant, database):
                del self._states[key]

    async def _modify(
        self,
        id: UUID,
        new_name: str | None = None,
        new_metadata: CollectionMetadata | None = None,
        new_configuration: UpdateCollectionConfiguration | None = None,
        tenant: str = "default_tenant",
        database: str = "default_database",
    ) -> None:
        state = await self.state(id, tenant, database)
        body: dict[str, Any] = {
            "new_name": new_name,
            "new_metadata": None,
            "new_configuration": (
                update_collection_configuration_to_json(new_configuration)
                if new_configuration
                else None
            ),
        }
        if new_metadata is not None:
            body["new_metadata"] = {
                **self._policy_metadata(new_metadata),
                _ROUTING_META: state.routing_key or "",
            }

        async def put(shard: str, t: NodeTransport) -> Any:
            return await t.request("PUT", state.path(shard), body=body, idempotent=False)

        # The catalog shard first, so a name clash fails like one server, with nothing changed.
        await put(self.catalog_shard, self.primaries[self.catalog_shard])
        await self.call_all("modify", put, shards=self.shard_names[1:])
        if new_name is not None:
            state.name = new_name

    async def state(self, collection_id: UUID, tenant: str, database: str) -> CollectionState:
        """The cached state of a collection, loading it from the shards on first use."""
        if self.closed:
            raise ClientClosedError("the client was closed; create a new one")
        state = self._states.get(collection_id)
        if state is None:
            await self.get_collection_by_id(collection_id, tenant, database)
            state = self._states[collection_id]
        return state

    async def aclose(self) -> None:
        self.closed = True
        for t in self.primaries.values():
            await t.aclose()
