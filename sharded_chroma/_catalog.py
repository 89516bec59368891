"""The collections catalog: create, get, list, rename and delete a logical collection on every
copy of every shard. See ``_backend`` for how a logical collection maps to physical ones."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from uuid import UUID

from chromadb.api.collection_configuration import (
    CreateCollectionConfiguration,
    UpdateCollectionConfiguration,
    create_collection_configuration_to_json,
    update_collection_configuration_to_json,
)
from chromadb.api.types import CollectionMetadata, Schema
from chromadb.errors import NotFoundError
from chromadb.types import Collection as CollectionModel

from ._backend import (
    _ID_META,
    _ROUTING_META,
    _SLOTS_META,
    BackendCore,
    CollectionState,
    reject_reserved,
    strip_reserved,
)
from ._errors import ConfigurationError, NodeUnavailableError, ShardMismatchError
from ._fanout import fan_out, raise_for_failures
from ._policies import HashPolicy, PolicyLike, build_policy, policy_from_json, policy_to_json
from ._replicas import Node

__all__ = ["CatalogOps"]


class CatalogOps(BackendCore):
    """Catalog methods with the signatures chromadb's client and collection call."""

    # -- catalog ----------------------------------------------------------------------------

    def _model(self, raw: Mapping[str, Any]) -> CollectionModel:
        return CollectionModel.from_json(dict(raw))

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

    def _stored_policy(self, name: str, routing: Any, slots: Any) -> Any:
        """The policy stored with a collection, bound to this client's shards, or this
        client's default for a collection created outside this library."""
        if routing is None or slots is None:
            return self.topology.default_policy(name)
        try:
            policy = policy_from_json(str(routing))
        except ConfigurationError as exc:
            raise ConfigurationError(f"collection {name!r}: {exc}") from None
        if isinstance(policy, HashPolicy) and not policy.shards:
            # Stored before policies named their shards: the slot count is all there is.
            if int(slots) != self.topology.slots:
                raise ConfigurationError(
                    f"collection {name!r} was created with {slots} slots but this "
                    f"client's topology has {self.topology.slots}; use the same slot count"
                )
            policy = policy.model_copy(update={"slots": int(slots)})
        elif isinstance(policy, HashPolicy) and policy.shards != self.shard_names:
            raise ConfigurationError(
                f"collection {name!r} hashes records over shards {list(policy.shards)}, but this "
                f"client's topology has {list(self.shard_names)}; records would be looked for "
                "in the wrong place"
            )
        try:
            return self.topology.bind(policy)
        except ConfigurationError as exc:
            raise ConfigurationError(f"collection {name!r}: {exc}") from None

    def _state_from_models(
        self,
        models: Mapping[str, CollectionModel],
        catalog_url: str,
        declared: Any = None,
    ) -> CollectionState:
        """Build (and cache) a collection's state from its model on every node that answered.

        ``models`` is keyed by node URL; ``catalog_url`` names the catalog-shard node to trust
        for the cluster's id and policy. ``declared`` is the policy the caller asked for, if
        any; a collection stored with another one is an error."""
        catalog = models[catalog_url]
        owner = {n.url: (rs.name, n) for rs in self.shards.values() for n in rs.nodes}
        meta = catalog.metadata or {}
        routing = meta.get(_ROUTING_META)
        slots = meta.get(_SLOTS_META)
        policy = self._stored_policy(catalog.name, routing, slots)
        if declared is not None and declared != policy:
            raise ConfigurationError(
                f"collection {catalog.name!r} exists with policy {policy_to_json(policy)}, "
                f"not the one asked for ({policy_to_json(declared)}); one collection has one "
                "layout, so open it without a policy or with the stored one"
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
            policy=policy,
            dimension=dims.pop() if dims else None,
            configuration=dict(catalog.configuration_json or {}),
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

    def _policy_metadata(self, metadata: CollectionMetadata | None, policy: Any) -> dict[str, Any]:
        reject_reserved(metadata or {}, "metadata")
        return {
            **(metadata or {}),
            _ROUTING_META: policy_to_json(policy),
            _SLOTS_META: getattr(policy, "slots", self.topology.slots),
        }

    def _declared_policy(self, name: str, policy: PolicyLike | None) -> Any:
        """The policy a caller asks for: the argument, else the topology's entry for the name;
        None when neither says anything."""
        if policy is None:
            policy = self.topology.policies.get(name)
        if policy is None:
            return None
        return self.topology.bind(build_policy(policy))

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
        declared = self._declared_policy(name, policy)
        chosen = declared if declared is not None else self.topology.default_policy(name)
        body = {
            "name": name,
            "metadata": self._policy_metadata(metadata, chosen),
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
        rest_body["metadata"] = {**self._policy_metadata(metadata, chosen)}
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
        state = self._state_from_models(models, self.catalog_node.url, declared)
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
        state = self._state_from_models(models, catalog_url, self._declared_policy(name, None))
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
            policy = self._policy_metadata(new_metadata, state.policy)

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
