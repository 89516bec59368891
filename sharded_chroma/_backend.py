"""The sharded server API: the methods chromadb's AsyncCollection calls on its "server", done
across shards. This module holds the catalog (collections) and shared plumbing; record
operations are in ``_records``.

One physical collection of the same name exists on every node (every copy of every shard). The
cluster's id for a logical collection is the id of its physical collection on the first shard's
primary (the catalog node), which is stable across processes and unique per creation, exactly
like a single server's id; the other nodes carry it in reserved metadata (``_sc_id``) so the
catalog can be read from a replica when the catalog node is down. Each node has its own physical
id for the collection; requests are addressed per node.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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

from ._errors import (
    ClientClosedError,
    ConfigurationError,
    NodeUnavailableError,
    ShardMismatchError,
)
from ._fanout import fan_out, raise_for_failures
from ._hints import HintLog
from ._replicas import HintTarget, Node, ReplicaSet
from ._routing import SlotTable
from ._topology import Topology

__all__ = ["RESERVED_PREFIX", "SEQ_KEY", "BackendCore", "CollectionState"]

logger = logging.getLogger("sharded_chroma.client")

T = TypeVar("T")

RESERVED_PREFIX = "_sc_"
SEQ_KEY = "_sc_seq"
"""Hidden per-record sequence (a hybrid logical clock value): the cluster's insertion order."""
_ROUTING_META = "_sc_routing"
_SLOTS_META = "_sc_slots"
_ID_META = "_sc_id"


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
    """Physical collection id per node URL, filled as nodes are first addressed."""
    routing_key: str | None
    slot_table: SlotTable
    dimension: int | None = None
    configuration_json: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"/tenants/{self.tenant}/databases/{self.database}/collections"


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
        self.replication = topology.replication
        self._hints: HintLog | None = None
        if any(s.replicas for s in topology.shards):
            self._hints = _open_hint_log(topology)
        self.shards: dict[str, ReplicaSet] = {}
        for shard in topology.shards:
            rs = ReplicaSet(shard, topology.replication, lambda: self._hints)
            rs.replay_target = self._replay_path
            if self._hints is not None:
                rs.mark_pending(self._hints.nodes())
            self.shards[shard.name] = rs
        self.clock = _HybridClock()
        self._states: dict[UUID, CollectionState] = {}
        self._preflight: dict[str, dict[str, Any]] = {}
        # Locks belong to one event loop; threads that each run their own loop (sync wrappers)
        # get their own locks, and order only matters within one loop anyway.
        self._write_locks: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[tuple[UUID, str], anyio.Lock]
        ] = weakref.WeakKeyDictionary()
        self._locks_guard = threading.Lock()
        self.closed = False

    def _write_lock(self, state: CollectionState, shard: str) -> anyio.Lock:
        loop = asyncio.get_running_loop()
        with self._locks_guard:
            locks = self._write_locks.setdefault(loop, {})
            key = (state.id, shard)
            lock = locks.get(key)
            if lock is None:
                lock = locks[key] = anyio.Lock()
            return lock

    # -- plumbing ---------------------------------------------------------------------------

    def _base(self, tenant: str, database: str) -> str:
        return f"/tenants/{tenant}/databases/{database}"

    def all_nodes(self) -> list[Node]:
        return [n for rs in self.shards.values() for n in rs.nodes]

    def _check_open(self) -> None:
        if self.closed:
            raise ClientClosedError("the client was closed; create a new one")

    async def call_all(
        self,
        operation: str,
        make: Callable[[str, Node], Awaitable[T]],
        shards: Sequence[str] | None = None,
    ) -> dict[str, T]:
        """Read from one copy of every (or the named) shard; raise if any shard failed."""
        self._check_open()
        names = self.shard_names if shards is None else shards

        def call(name: str) -> Callable[[], Awaitable[T]]:
            return lambda: self.shards[name].read(functools.partial(make, name))

        results, failures = await fan_out({n: call(n) for n in names})
        raise_for_failures(operation, failures)
        return results

    async def on_every_node(
        self,
        operation: str,
        make: Callable[[Node], Awaitable[T]],
        nodes: Sequence[Node] | None = None,
        *,
        tolerate: tuple[type[BaseException], ...] = (),
    ) -> dict[str, T]:
        """Run a catalog change on every copy of every shard; all must answer, because a copy
        that missed a catalog change (a delete, a rename) would bring old data back later."""
        self._check_open()
        targets = self.all_nodes() if nodes is None else nodes
        results, failures = await fan_out({n.url: functools.partial(make, n) for n in targets})
        raise_for_failures(
            operation, {k: e for k, e in failures.items() if not isinstance(e, tolerate)}
        )
        return results

    async def preflight(self, shard: str) -> dict[str, Any]:
        cached = self._preflight.get(shard)
        if cached is None:
            answer = await self.shards[shard].read(
                lambda node: node.transport.request("GET", "/pre-flight-checks")
            )
            cached = self._preflight[shard] = dict(answer)
        return cached

    async def node_path(self, state: CollectionState, node: Node, suffix: str = "") -> str:
        """The request path of a collection on one node, looking its physical id up once."""
        pid = state.physical.get(node.url)
        if pid is None:
            pid = await self._find_on_node(node, state.tenant, state.database, state.id, state.name)
            state.physical[node.url] = pid
        return f"{state.base}/{pid}{suffix}"

    def _is_cluster_collection(self, raw: Mapping[str, Any], node: Node, cluster_id: UUID) -> bool:
        marked = (raw.get("metadata") or {}).get(_ID_META)
        if marked is not None:
            return str(marked) == str(cluster_id)
        return node is self.catalog_node and str(raw["id"]) == str(cluster_id)

    async def _find_on_node(
        self, node: Node, tenant: str, database: str, cluster_id: UUID, name: str
    ) -> UUID:
        """A node's physical id of the cluster collection ``cluster_id``.

        Found by name first, but only trusted when the cluster id matches: the collection may
        have been renamed, or deleted and re-created under the same name, since the caller
        learnt the name (hints can be days old). Raises NotFoundError when it is gone.
        """
        base = self._base(tenant, database) + "/collections"
        try:
            raw = await node.transport.request("GET", f"{base}/{name}")
            if self._is_cluster_collection(raw, node, cluster_id):
                return UUID(str(raw["id"]))
        except NotFoundError:
            pass
        offset = 0
        while True:
            page = await node.transport.request(
                "GET", base, params={"limit": 100, "offset": offset}
            )
            for raw in page:
                if self._is_cluster_collection(raw, node, cluster_id):
                    return UUID(str(raw["id"]))
            if len(page) < 100:
                raise NotFoundError(f"Collection [{cluster_id}] does not exist")
            offset += len(page)

    async def _replay_path(self, node: Node, target: HintTarget) -> str:
        cluster_id = UUID(target.collection_id)
        state = self._states.get(cluster_id)
        if state is not None and node.url in state.physical:
            return await self.node_path(state, node, f"/{target.op}")
        pid = await self._find_on_node(
            node, target.tenant, target.database, cluster_id, target.collection_name
        )
        base = self._base(target.tenant, target.database)
        return f"{base}/collections/{pid}/{target.op}"

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
            "heartbeat", lambda _n, node: node.transport.request("GET", "/heartbeat")
        )
        return int(beats[self.catalog_shard]["nanosecond heartbeat"])

    async def get_version(self) -> str:
        versions = await self.call_all(
            "get_version", lambda _n, node: node.transport.request("GET", "/version")
        )
        if len(set(versions.values())) > 1:
            logger.warning("shards run different Chroma versions: %s", versions)
        return str(versions[self.catalog_shard])

    async def reset(self) -> bool:
        await self.on_every_node("reset", lambda node: node.transport.request("POST", "/reset"))
        self._states.clear()
        if self._hints is not None:
            for node in self.all_nodes():
                await anyio.to_thread.run_sync(self._hints.drop_node, node.url)
                node.stale = False
        return True

    # -- catalog ----------------------------------------------------------------------------

    def _model(self, raw: Mapping[str, Any]) -> CollectionModel:
        return CollectionModel.from_json(dict(raw))

    @property
    def catalog_node(self) -> Node:
        return self.shards[self.catalog_shard].primary

    def _logical_id(self, model: CollectionModel, node: Node) -> UUID:
        """The cluster's id of a collection, read from any copy of the catalog shard."""
        marked = (model.metadata or {}).get(_ID_META)
        if marked is not None:
            return UUID(str(marked))
        if node is self.catalog_node:
            return model.id
        raise ShardMismatchError(
            f"collection {model.name!r} has no cluster id on this node and the catalog node "
            "did not answer; retry when it is up",
            shard=self.catalog_shard,
        )

    def _state_from_models(
        self, models: Mapping[str, CollectionModel], catalog_url: str
    ) -> CollectionState:
        """Build (and cache) a collection's state from its model on every node that answered.

        ``models`` is keyed by node URL; ``catalog_url`` names the catalog-shard node to trust
        for the cluster's id and policy."""
        catalog = models[catalog_url]
        owner = {n.url: (rs.name, n) for rs in self.shards.values() for n in rs.nodes}
        meta = catalog.metadata or {}
        routing = meta.get(_ROUTING_META)
        slots = meta.get(_SLOTS_META)
        if routing is None or slots is None:
            # Created outside this library: adopt the client's own policy.
            routing_key = self.topology.routing_key
        else:
            routing_key = str(routing) or None
            if int(slots) != self.slot_table.slots:
                raise ConfigurationError(
                    f"collection {catalog.name!r} was created with {slots} slots but this "
                    f"client's topology has {self.slot_table.slots}; use the same slot count"
                )
        for url, model in models.items():
            other = model.metadata or {}
            shard = owner[url][0]
            if other.get(_ROUTING_META) != routing or other.get(_SLOTS_META) != slots:
                raise ShardMismatchError(
                    f"collection {catalog.name!r} has a different routing policy on node {url} "
                    f"than on shard {self.catalog_shard!r}",
                    shard=shard,
                )
            if model.configuration_json != catalog.configuration_json:
                raise ShardMismatchError(
                    f"collection {catalog.name!r} has a different configuration on node {url} "
                    f"than on shard {self.catalog_shard!r}; results cannot be merged",
                    shard=shard,
                )
        dims = {m.dimension for m in models.values() if m.dimension is not None}
        if len(dims) > 1:
            raise ShardMismatchError(
                f"collection {catalog.name!r} holds embeddings of dimensions {sorted(dims)}",
                shard=next(owner[u][0] for u, m in models.items() if m.dimension == max(dims)),
            )
        state = CollectionState(
            id=self._logical_id(catalog, owner[catalog_url][1]),
            name=catalog.name,
            tenant=catalog.tenant,
            database=catalog.database,
            physical={url: m.id for url, m in models.items()},
            routing_key=routing_key,
            slot_table=self.slot_table,
            dimension=dims.pop() if dims else None,
            configuration_json=dict(catalog.configuration_json),
        )
        self._states[state.id] = state
        return state

    def _public_model(self, state: CollectionState, model: CollectionModel) -> CollectionModel:
        """A model as users see it: the cluster's id and dimension, no reserved metadata."""
        return model.model_copy(
            update={
                "id": state.id,
                "metadata": strip_reserved(model.metadata),
                "dimension": state.dimension,
            }
        )

    def _check_user_metadata(self, metadata: CollectionMetadata | None) -> None:
        for key in metadata or {}:
            if key.startswith(RESERVED_PREFIX):
                raise ValueError(
                    f"metadata key {key!r} uses the prefix {RESERVED_PREFIX!r}, "
                    "which sharded_chroma reserves"
                )

    def _policy_metadata(
        self, metadata: CollectionMetadata | None, routing_key: str | None
    ) -> dict[str, Any]:
        self._check_user_metadata(metadata)
        return {
            **(metadata or {}),
            _ROUTING_META: routing_key or "",
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
            "metadata": self._policy_metadata(metadata, self.topology.routing_key),
            "configuration": (
                create_collection_configuration_to_json(configuration, metadata)
                if configuration
                else None
            ),
            "schema": schema.serialize_to_json() if schema else None,
        }
        path = self._base(tenant, database) + "/collections"
        # The catalog node decides (it raises the single-server error for an existing name) and
        # gives the cluster's id; every other node then get-or-creates with that id in its
        # metadata, which also repairs a node missing the collection.
        self._check_open()
        first = await self.catalog_node.transport.request(
            "POST", path, body={**body, "get_or_create": get_or_create}
        )
        cluster_id = str(first["id"])
        rest_body: dict[str, Any] = {**body, "get_or_create": True}
        rest_body["metadata"] = {**self._policy_metadata(metadata, self.topology.routing_key)}
        rest_body["metadata"][_ID_META] = cluster_id
        if get_or_create:
            # An existing collection keeps its own policy: copy it rather than this client's.
            existing = dict(first.get("metadata") or {})
            rest_body["metadata"] = {
                **{k: v for k, v in existing.items() if k != _ID_META},
                _ID_META: cluster_id,
            }
        others = [n for n in self.all_nodes() if n is not self.catalog_node]
        rest = await self.on_every_node(
            "create_collection",
            lambda node: node.transport.request("POST", path, body=rest_body),
            others,
        )
        models = {self.catalog_node.url: self._model(first)}
        models.update({url: self._model(r) for url, r in rest.items()})
        state = self._state_from_models(models, self.catalog_node.url)
        return self._public_model(state, models[self.catalog_node.url])

    async def _models_by_name(
        self, name: str, tenant: str, database: str
    ) -> tuple[dict[str, CollectionModel], str]:
        """The collection's model from one copy of every shard (the catalog node preferred)."""
        path = self._base(tenant, database) + f"/collections/{name}"

        def fetch(shard: str) -> Callable[[], Awaitable[tuple[str, Any]]]:
            async def one(node: Node) -> tuple[str, Any]:
                return node.url, await node.transport.request("GET", path)

            return lambda: self.shards[shard].read(one)

        self._check_open()
        results, failures = await fan_out({n: fetch(n) for n in self.shard_names})
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
        models = {url: self._model(raw) for url, raw in results.values()}
        return models, results[self.catalog_shard][0]

    async def get_collection(
        self, name: str, tenant: str = "default_tenant", database: str = "default_database"
    ) -> CollectionModel:
        models, catalog_url = await self._models_by_name(name, tenant, database)
        state = self._state_from_models(models, catalog_url)
        return self._public_model(state, models[catalog_url])

    async def get_collection_by_id(
        self,
        collection_id: UUID,
        tenant: str = "default_tenant",
        database: str = "default_database",
    ) -> CollectionModel:
        self._check_open()
        known = self._states.get(collection_id)
        if known is not None:
            return await self.get_collection(known.name, tenant, database)
        try:
            raw = await self.catalog_node.transport.request(
                "GET", self._base(tenant, database) + f"/collections/by-id/{collection_id}"
            )
            name = str(raw["name"])
        except NodeUnavailableError:
            # The catalog node is down: find the id among a replica's collections.
            listed = await self.list_collections(None, None, tenant, database)
            match = [m for m in listed if m.id == collection_id]
            if not match:
                raise NotFoundError(f"Collection [{collection_id}] does not exist") from None
            name = match[0].name
        return await self.get_collection(name, tenant, database)

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

        async def one(node: Node) -> tuple[Node, Any]:
            raw = await node.transport.request(
                "GET", self._base(tenant, database) + "/collections", params=params
            )
            return node, raw

        self._check_open()
        node, raw = await self.shards[self.catalog_shard].read(one)
        out = []
        for item in raw:
            model = self._model(item)
            cluster_id = self._logical_id(model, node)
            state = self._states.get(cluster_id)
            out.append(
                model.model_copy(
                    update={
                        "id": cluster_id,
                        "metadata": strip_reserved(model.metadata),
                        "dimension": state.dimension if state else model.dimension,
                    }
                )
            )
        return out

    async def count_collections(
        self, tenant: str = "default_tenant", database: str = "default_database"
    ) -> int:
        self._check_open()
        raw = await self.shards[self.catalog_shard].read(
            lambda node: node.transport.request(
                "GET", self._base(tenant, database) + "/collections_count"
            )
        )
        return int(raw)

    async def delete_collection(
        self, name: str, tenant: str = "default_tenant", database: str = "default_database"
    ) -> None:
        path = self._base(tenant, database) + f"/collections/{name}"
        # Every other node first: if one fails, the catalog still lists the collection and the
        # caller can retry, instead of data left behind under a name nobody sees.
        others = [n for n in self.all_nodes() if n is not self.catalog_node]
        await self.on_every_node(
            "delete_collection",
            lambda node: node.transport.request("DELETE", path),
            others,
            tolerate=(NotFoundError,),
        )
        self._check_open()
        await self.catalog_node.transport.request("DELETE", path)
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
        policy = None
        if new_metadata is not None:
            policy = self._policy_metadata(new_metadata, state.routing_key)

        async def put(node: Node) -> Any:
            payload = body
            if policy is not None:
                meta = policy if node is self.catalog_node else {**policy, _ID_META: str(state.id)}
                payload = {**body, "new_metadata": meta}
            return await node.transport.request(
                "PUT", await self.node_path(state, node), body=payload
            )

        # The catalog node first, so a name clash fails like one server, with nothing changed.
        self._check_open()
        await put(self.catalog_node)
        others = [n for n in self.all_nodes() if n is not self.catalog_node]
        await self.on_every_node("modify", put, others)
        if new_name is not None:
            state.name = new_name

    async def state(self, collection_id: UUID, tenant: str, database: str) -> CollectionState:
        """The cached state of a collection, loading it from the shards on first use."""
        self._check_open()
        state = self._states.get(collection_id)
        if state is None:
            await self.get_collection_by_id(collection_id, tenant, database)
            state = self._states[collection_id]
        return state

    async def pending_hints(self) -> dict[str, int]:
        """Pending hint count per node URL (empty without replicas)."""
        if self._hints is None:
            return {}
        return await anyio.to_thread.run_sync(self._hints.nodes)

    async def replay_hints(self) -> int:
        """Replay every pending hint to every node that answers now; the number replayed."""
        total = 0
        for rs in self.shards.values():
            for node in rs.nodes:
                if node.stale:
                    total += await rs.replay(node)
        return total

    async def aclose(self) -> None:
        self.closed = True
        for rs in self.shards.values():
            await rs.aclose()
        if self._hints is not None:
            self._hints.close()


def _open_hint_log(topology: Topology) -> HintLog:
    """The hint log of this cluster: one SQLite file per set of nodes, so two clusters used from
    one host never replay each other's writes, and a restarted process finds its hints."""
    cfg = topology.replication
    folder = (
        Path(cfg.hints_dir)
        if cfg.hints_dir
        else Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
        / "sharded-chroma"
        / "hints"
    )
    nodes = sorted(n.url for s in topology.shards for n in s.nodes)
    key = hashlib.sha256("\n".join([topology.tenant, topology.database, *nodes]).encode())
    return HintLog(
        folder / f"{key.hexdigest()[:16]}.sqlite3",
        max_hints=cfg.hint_max_count,
        max_bytes=cfg.hint_max_bytes,
        max_age=cfg.hint_max_age,
    )
