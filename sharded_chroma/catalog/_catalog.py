"""The collections catalog: create, get, list, rename and delete a logical collection on every
copy of every shard (see ``_state`` for how a logical collection maps to physical ones)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from chromadb.api.collection_configuration import (
    CreateCollectionConfiguration,
    UpdateCollectionConfiguration,
    create_collection_configuration_to_json,
    update_collection_configuration_to_json,
)
from chromadb.api.types import CollectionMetadata, Schema
from chromadb.errors import ChromaError, NotFoundError
from chromadb.types import Collection as CollectionModel

from .._errors import NodeUnavailableError, ShardedChromaError, ShardMismatchError
from .._fanout import fan_out, raise_for_failures
from .._node import Node
from .._policies import PolicyLike
from ..cluster._cluster import Cluster
from ._generations import generation_state
from ._layouts import PartLayouts
from ._models import CatalogRules
from ._physical import PhysicalIds
from ._state import (
    CONTROL_META,
    GENERATION_META,
    ID_META,
    ROUTING_META,
    SLOTS_META,
    CollectionState,
    StateCache,
)

__all__ = ["Catalog"]

logger = logging.getLogger("sharded_chroma.catalog")


class Catalog:
    """Collection DDL on every copy, and the states of the collections this client opened."""

    def __init__(
        self,
        cluster: Cluster,
        physical: PhysicalIds,
        layouts: PartLayouts,
        states: StateCache,
    ) -> None:
        self._cluster = cluster
        self._physical = physical
        self._layouts = layouts
        self._states = states
        owners = {n.url: rs.name for rs in cluster.shards.values() for n in rs.nodes}
        self._rules = CatalogRules(cluster.topology, owners, cluster.catalog_node.url)

    def _path(self, tenant: str, database: str, suffix: str = "") -> str:
        return f"/tenants/{tenant}/databases/{database}/collections{suffix}"

    def _public(self, state: CollectionState, model: CollectionModel) -> CollectionModel:
        return self._rules.public_model(model, state.id, state.dimension)

    def _load(
        self, models: dict[str, CollectionModel], catalog_url: str, declared: Any
    ) -> CollectionState:
        state = self._rules.state_from_models(models, catalog_url, declared)
        self._states.put(state)
        return state

    async def create_collection(
        self,
        name: str,
        schema: Schema | None = None,
        configuration: CreateCollectionConfiguration | None = None,
        metadata: CollectionMetadata | None = None,
        get_or_create: bool = False,
        tenant: str = "default_tenant",
        database: str = "default_database",
        *,
        policy: PolicyLike | None = None,
    ) -> CollectionModel:
        rules, cluster = self._rules, self._cluster
        declared = rules.declared_policy(name, policy)
        chosen = rules.chosen_policy(name, declared)
        body = {
            "name": name,
            "metadata": rules.policy_metadata(metadata, chosen),
            "configuration": (
                create_collection_configuration_to_json(configuration, metadata)
                if configuration
                else None
            ),
            "schema": schema.serialize_to_json() if schema else None,
        }
        path = self._path(tenant, database)
        # The catalog node decides (it raises the single-server error for an existing name) and
        # gives the cluster's id; every other node then get-or-creates with that id in its
        # metadata, which also repairs a node missing the collection.
        cluster.check_open()
        catalog_node = cluster.catalog_node
        first = await catalog_node.transport.request(
            "POST", path, body={**body, "get_or_create": get_or_create}
        )
        cluster_id = str(first["id"])
        rest_body: dict[str, Any] = {**body, "get_or_create": True}
        rest_body["metadata"] = {**rules.policy_metadata(metadata, chosen), ID_META: cluster_id}
        if get_or_create:
            # An existing collection keeps its own policy: copy it rather than this client's.
            existing = dict(first.get("metadata") or {})
            rest_body["metadata"] = {
                **{k: v for k, v in existing.items() if k != ID_META},
                ID_META: cluster_id,
            }
        others = [n for n in cluster.all_nodes() if n is not catalog_node]
        rest = await cluster.on_every_node(
            "create_collection",
            lambda node: node.transport.request("POST", path, body=rest_body),
            others,
        )
        models = {catalog_node.url: rules.model(first)}
        models.update({url: rules.model(r) for url, r in rest.items()})
        state = self._load(models, catalog_node.url, declared)
        return await self._served_model(state, self._public(state, models[catalog_node.url]))

    async def _models_by_name(
        self, name: str, tenant: str, database: str
    ) -> tuple[dict[str, CollectionModel], str]:
        """The collection's model from one copy of every shard (the catalog node preferred)."""
        path = self._path(tenant, database, f"/{name}")
        cluster = self._cluster

        def fetch(shard: str) -> Callable[[], Awaitable[tuple[str, Any]]]:
            async def one(node: Node) -> tuple[str, Any]:
                return node.url, await node.transport.request("GET", path)

            return lambda: cluster.shards[shard].read(one)

        cluster.check_open()
        results, failures = await fan_out({n: fetch(n) for n in cluster.shard_names})
        if cluster.catalog_shard in failures:
            raise failures[cluster.catalog_shard]
        missing = [n for n, e in failures.items() if isinstance(e, NotFoundError)]
        if missing:
            # A shard the stored policy does not use yet (one just added to the topology,
            # which a migration gives the collection first) may lack it.
            meta = results[cluster.catalog_shard][1].get("metadata") or {}
            stored = self._rules.stored_policy(name, meta.get(ROUTING_META), meta.get(SLOTS_META))
            unused = [n for n in missing if n not in stored.shards_named()]
            for shard in unused:
                del failures[shard]
            missing = [n for n in missing if n not in unused]
        if missing:
            raise ShardMismatchError(
                f"collection {name!r} is missing on this shard; "
                "get_or_create_collection() recreates it there",
                shard=missing[0],
            )
        raise_for_failures("get_collection", failures)
        models = {url: self._rules.model(raw) for url, raw in results.values()}
        return models, results[cluster.catalog_shard][0]

    async def get_collection(
        self, name: str, tenant: str = "default_tenant", database: str = "default_database"
    ) -> CollectionModel:
        models, catalog_url = await self._models_by_name(name, tenant, database)
        state = self._load(models, catalog_url, self._rules.declared_policy(name, None))
        return await self._served_model(state, self._public(state, models[catalog_url]))

    async def _served_model(
        self, state: CollectionState, model: CollectionModel
    ) -> CollectionModel:
        """After a rebuild, the configuration users see is the generation's that holds the
        records (its index parameters), not the root's; the root's if it cannot be read."""
        if not state.stored_generation:
            return model
        sub = generation_state(state, state.stored_generation)
        try:
            raw = await self._cluster.catalog_node.transport.request(
                "GET", f"{sub.base}/{sub.name}"
            )
        except (ChromaError, ShardedChromaError) as exc:
            logger.warning("generation of %s not read (%s); showing its root's", state.name, exc)
            return model
        return model.model_copy(update={"configuration_json": raw.get("configuration_json")})

    async def get_collection_by_id(
        self,
        collection_id: UUID,
        tenant: str = "default_tenant",
        database: str = "default_database",
    ) -> CollectionModel:
        self._cluster.check_open()
        known = self._states.get(collection_id)
        if known is not None:
            return await self.get_collection(known.name, tenant, database)
        try:
            raw = await self._cluster.catalog_node.transport.request(
                "GET", self._path(tenant, database, f"/by-id/{collection_id}")
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

    async def list_collections(
        self,
        limit: int | None = None,
        offset: int | None = None,
        tenant: str = "default_tenant",
        database: str = "default_database",
    ) -> list[CollectionModel]:
        params = {k: v for k, v in (("limit", limit), ("offset", offset)) if v is not None}

        async def one(node: Node) -> tuple[Node, Any]:
            raw = await node.transport.request("GET", self._path(tenant, database), params=params)
            return node, raw

        cluster = self._cluster
        cluster.check_open()
        node, raw = await cluster.shards[cluster.catalog_shard].read(one)
        out = []
        for item in raw:
            model = self._rules.model(item)
            cluster_id = self._rules.logical_id(model, node.url)
            state = self._states.get(cluster_id)
            dimension = state.dimension if state else model.dimension
            out.append(self._rules.public_model(model, cluster_id, dimension))
        return out

    async def count_collections(
        self, tenant: str = "default_tenant", database: str = "default_database"
    ) -> int:
        cluster = self._cluster
        cluster.check_open()
        raw = await cluster.shards[cluster.catalog_shard].read(
            lambda node: node.transport.request(
                "GET", f"/tenants/{tenant}/databases/{database}/collections_count"
            )
        )
        return int(raw)

    async def delete_collection(
        self, name: str, tenant: str = "default_tenant", database: str = "default_database"
    ) -> None:
        """Delete a collection, its time buckets first, then every other node, the catalog
        node last: if a step fails, the catalog still lists the collection and the call can be
        repeated, instead of data left behind under a name nobody sees."""
        cluster = self._cluster
        cluster.check_open()
        path = self._path(tenant, database, f"/{name}")

        async def one(node: Node) -> UUID:
            raw = await node.transport.request("GET", path)
            return self._rules.logical_id(self._rules.model(raw), node.url)

        try:
            cluster_id: UUID | None = await cluster.shards[cluster.catalog_shard].read(one)
        except NotFoundError:
            cluster_id = None  # the catalog delete below raises the single-server error
        if cluster_id is not None:
            await self._layouts.drop_all(tenant, database, cluster_id)
        catalog_node = cluster.catalog_node
        others = [n for n in cluster.all_nodes() if n is not catalog_node]
        await cluster.on_every_node(
            "delete_collection",
            lambda node: node.transport.request("DELETE", path),
            others,
            tolerate=(NotFoundError,),
        )
        cluster.check_open()
        await catalog_node.transport.request("DELETE", path)
        self._states.forget_named(name, tenant, database)

    async def modify(
        self,
        state: CollectionState,
        new_name: str | None = None,
        new_metadata: CollectionMetadata | None = None,
        new_configuration: UpdateCollectionConfiguration | None = None,
    ) -> None:
        """Rename or change a collection on every node; a configuration change reaches its
        time buckets too, and buckets made later copy the new configuration."""
        cluster = self._cluster
        body: dict[str, Any] = {
            "new_name": new_name,
            "new_metadata": None,
            "new_configuration": (
                update_collection_configuration_to_json(new_configuration)
                if new_configuration
                else None
            ),
        }
        meta = None
        catalog_node = cluster.catalog_node
        if new_metadata is not None:
            # The stored policy as it is now, not as this client loaded it: a migration may
            # have stored a newer one since (see ``store_policy``).
            raw = await catalog_node.transport.request(
                "GET", self._path(state.tenant, state.database, f"/{state.name}")
            )
            stored = dict(raw.get("metadata") or {})
            meta = self._rules.policy_metadata(new_metadata, state.policy)
            for key in (ROUTING_META, SLOTS_META, CONTROL_META, GENERATION_META):
                if key in stored:
                    meta[key] = stored[key]

        async def put(node: Node) -> Any:
            payload = body
            if meta is not None:
                marked = meta if node is catalog_node else {**meta, ID_META: str(state.id)}
                payload = {**body, "new_metadata": marked}
            return await node.transport.request(
                "PUT", await self._physical.node_path(state, node), body=payload
            )

        # The catalog node first, so a name clash fails like one server, with nothing changed.
        cluster.check_open()
        await put(catalog_node)
        others = [n for n in cluster.all_nodes() if n is not catalog_node]
        await cluster.on_every_node("modify", put, others)
        if new_name is not None:
            state.name = new_name
        if new_configuration is None:
            return
        await self._layouts.reconfigure(state, {**body, "new_name": None, "new_metadata": None})
        raw = await catalog_node.transport.request(
            "GET", self._path(state.tenant, state.database, f"/{state.name}")
        )
        state.configuration = dict(raw.get("configuration_json") or {})

    async def store_policy(
        self, state: CollectionState, policy: Any, generation: int | None = None
    ) -> None:
        """Make ``policy`` the collection's stored policy on every node, marked as placed by the
        control store (a migration does at its start, with the policy it starts from, and at
        its end, so the stored policy never lags a stable map); a rebuild stores the
        ``generation`` it swapped in."""
        cluster = self._cluster
        catalog_node = cluster.catalog_node
        raw = await catalog_node.transport.request(
            "GET", self._path(state.tenant, state.database, f"/{state.name}")
        )
        meta = {
            **(raw.get("metadata") or {}),
            **self._rules.policy_metadata(None, policy),
            CONTROL_META: 1,
        }
        if generation is not None:
            meta[GENERATION_META] = generation
        meta.pop(ID_META, None)

        async def put(node: Node) -> Any:
            marked = meta if node is catalog_node else {**meta, ID_META: str(state.id)}
            return await node.transport.request(
                "PUT", await self._physical.node_path(state, node), body={"new_metadata": marked}
            )

        await put(catalog_node)
        others = [n for n in cluster.all_nodes() if n is not catalog_node]
        # A shard the collection never reached (one the topology has, no policy used) lacks it.
        await cluster.on_every_node("store_policy", put, others, tolerate=(NotFoundError,))
        state.policy = policy
        if generation is not None:
            state.stored_generation = generation

    async def state(self, collection_id: UUID, tenant: str, database: str) -> CollectionState:
        """The cached state of a collection, loading it from the shards on first use."""
        self._cluster.check_open()
        state = self._states.get(collection_id)
        if state is None:
            await self.get_collection_by_id(collection_id, tenant, database)
            state = self._states.get(collection_id)
            assert state is not None
        return state
