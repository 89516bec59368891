"""Pure rules of the catalog: a collection's state from its per-node models, its stored policy,
and the model users see."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from chromadb.api.types import CollectionMetadata
from chromadb.types import Collection as CollectionModel

from .._errors import ConfigurationError, ShardMismatchError
from .._policies import HashPolicy, PolicyLike, build_policy, policy_from_json, policy_to_json
from .._topology import Topology
from ._reserved import escape_metadata, visible_collection_metadata
from ._state import (
    CONTROL_META,
    GENERATION_META,
    ID_META,
    ROUTING_META,
    SLOTS_META,
    CollectionState,
)

__all__ = ["CatalogRules"]


class CatalogRules:
    """The topology's view of stored collections: ids, policies, consistency across nodes."""

    def __init__(self, topology: Topology, owners: Mapping[str, str], catalog_url: str) -> None:
        self._topology = topology
        self._shard_names = tuple(s.name for s in topology.shards)
        self._owners = dict(owners)
        """Shard name of every node URL."""
        self._catalog_url = catalog_url

    @staticmethod
    def model(raw: Mapping[str, Any]) -> CollectionModel:
        return CollectionModel.from_json(dict(raw))

    def logical_id(self, model: CollectionModel, node_url: str) -> UUID:
        """The cluster's id of a collection, read from any copy of the catalog shard."""
        marked = (model.metadata or {}).get(ID_META)
        if marked is not None:
            return UUID(str(marked))
        if node_url == self._catalog_url:
            return model.id
        raise ShardMismatchError(
            f"collection {model.name!r} has no cluster id on this node and the catalog node "
            "did not answer; retry when it is up",
            shard=self._shard_names[0],
        )

    def stored_policy(self, name: str, routing: Any, slots: Any) -> Any:
        """The policy stored with a collection, bound to this client's shards, or this
        client's default for a collection created outside this library."""
        topology = self._topology
        if routing is None or slots is None:
            return topology.default_policy(name)
        try:
            policy = policy_from_json(str(routing))
        except ConfigurationError as exc:
            raise ConfigurationError(f"collection {name!r}: {exc}") from None
        if isinstance(policy, HashPolicy) and not policy.shards:
            # Stored before policies named their shards: the slot count is all there is.
            if int(slots) != topology.slots:
                raise ConfigurationError(
                    f"collection {name!r} was created with {slots} slots but this "
                    f"client's topology has {topology.slots}; use the same slot count"
                )
            policy = policy.model_copy(update={"slots": int(slots)})
        elif isinstance(policy, HashPolicy) and not set(policy.shards) <= set(self._shard_names):
            # A policy may use some of the topology's shards (a shard added for a migration
            # holds nothing yet), never one it lacks.
            raise ConfigurationError(
                f"collection {name!r} hashes records over shards {list(policy.shards)}, but this "
                f"client's topology has {list(self._shard_names)}; records would be looked for "
                "in the wrong place"
            )
        try:
            return topology.bind(policy)
        except ConfigurationError as exc:
            raise ConfigurationError(f"collection {name!r}: {exc}") from None

    def state_from_models(
        self,
        models: Mapping[str, CollectionModel],
        catalog_url: str,
        declared: Any = None,
    ) -> CollectionState:
        """A collection's state from its model on every node that answered.

        ``models`` is keyed by node URL; ``catalog_url`` names the catalog-shard node to trust
        for the cluster's id and policy. ``declared`` is the policy the caller asked for, if
        any; a collection stored with another one is an error."""
        catalog = models[catalog_url]
        catalog_shard = self._shard_names[0]
        meta = catalog.metadata or {}
        routing = meta.get(ROUTING_META)
        slots = meta.get(SLOTS_META)
        if meta.get(CONTROL_META) and self._topology.control is None:
            raise ConfigurationError(
                f"collection {catalog.name!r} is placed by the control store's partition map "
                "(it has been rebalanced): open it with a topology that has the [control] table "
                "its other clients use"
            )
        policy = self.stored_policy(catalog.name, routing, slots)
        # With a control store the partition map decides; a declaration only shapes creation
        # (a rebalanced collection no longer has the policy it was declared with).
        if declared is not None and declared != policy and self._topology.control is None:
            raise ConfigurationError(
                f"collection {catalog.name!r} exists with policy {policy_to_json(policy)}, "
                f"not the one asked for ({policy_to_json(declared)}); one collection has one "
                "layout, so open it without a policy or with the stored one"
            )
        for url, model in models.items():
            other = model.metadata or {}
            shard = self._owners[url]
            if other.get(ROUTING_META) != routing or other.get(SLOTS_META) != slots:
                raise ShardMismatchError(
                    f"collection {catalog.name!r} has a different routing policy on node {url} "
                    f"than on shard {catalog_shard!r}",
                    shard=shard,
                )
            if model.configuration_json != catalog.configuration_json:
                raise ShardMismatchError(
                    f"collection {catalog.name!r} has a different configuration on node {url} "
                    f"than on shard {catalog_shard!r}; results cannot be merged",
                    shard=shard,
                )
        dims = {m.dimension for m in models.values() if m.dimension is not None}
        if len(dims) > 1:
            raise ShardMismatchError(
                f"collection {catalog.name!r} holds embeddings of dimensions {sorted(dims)}",
                shard=next(self._owners[u] for u, m in models.items() if m.dimension == max(dims)),
            )
        return CollectionState(
            id=self.logical_id(catalog, catalog_url),
            name=catalog.name,
            tenant=catalog.tenant,
            database=catalog.database,
            physical={url: m.id for url, m in models.items()},
            policy=policy,
            dimension=dims.pop() if dims else None,
            configuration=dict(catalog.configuration_json or {}),
            stored_generation=_generation(meta.get(GENERATION_META)),
        )

    @staticmethod
    def public_model(
        model: CollectionModel, cluster_id: UUID, dimension: int | None
    ) -> CollectionModel:
        """A model as users see it: the cluster's id and dimension, no reserved metadata."""
        return model.model_copy(
            update={
                "id": cluster_id,
                "metadata": visible_collection_metadata(model.metadata),
                "dimension": dimension,
            }
        )

    def policy_metadata(self, metadata: CollectionMetadata | None, policy: Any) -> dict[str, Any]:
        return {
            **(escape_metadata(metadata) or {}),
            ROUTING_META: policy_to_json(policy),
            SLOTS_META: getattr(policy, "slots", self._topology.slots),
        }

    def declared_policy(self, name: str, policy: PolicyLike | None) -> Any:
        """The policy a caller asks for: the argument, else the topology's entry for the name;
        None when neither says anything."""
        if policy is None:
            policy = self._topology.policies.get(name)
        if policy is None:
            return None
        return self._topology.bind(build_policy(policy))

    def chosen_policy(self, name: str, declared: Any) -> Any:
        return declared if declared is not None else self._topology.default_policy(name)


def _generation(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
