"""Generations: fresh physical collections that take over a collection's records.

A rebuild (``rebalance._rebuild``) copies a collection into new physical collections on the
same shards, made with a new configuration (HNSW parameters cannot change in place), and
swaps them in. Generation 0 is the root collection itself; generation ``n`` > 0 of a
collection is one physical collection per shard in the companion database (``<database>
.sc-parts``, beside the time buckets) named ``<cluster id>-gen<n>``, whose reserved metadata
names its collection and number. Which generation serves is the partition map's business
(``PartitionMap.generation``); the root's metadata records it too, so a collection whose map
was lost still opens at the generation holding its records.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from chromadb.errors import NotFoundError

from .._errors import ConfigurationError
from .._node import Node
from .._transport import iter_collections
from ..cluster._cluster import Cluster
from ._physical import PhysicalIds, make_part
from ._state import (
    BUCKET_META,
    GENERATION_META,
    ID_META,
    PARENT_META,
    CollectionState,
    parts_database,
)

__all__ = ["Generations", "generation_name", "generation_state", "generations_on"]

logger = logging.getLogger("sharded_chroma.parts")


def generation_name(cluster_id: uuid.UUID | str, generation: int) -> str:
    return f"{cluster_id}-gen{generation}"


def generation_state(root: CollectionState, generation: int) -> CollectionState:
    """The state addressing ``root``'s collection at ``generation`` (``root`` itself at 0)."""
    if generation == 0:
        return root
    if root.generation != 0 or root.bucket is not None:
        raise ValueError("generations are of a collection's root state")
    sub = root.generations.get(generation)
    if sub is None:
        sub = root.generations[generation] = CollectionState(
            id=uuid.uuid5(root.id, f"gen{generation}"),
            name=generation_name(root.id, generation),
            tenant=root.tenant,
            database=parts_database(root.database),
            physical={},
            policy=root.policy,
            dimension=root.dimension,
            configuration=root.configuration,
            parent=root.id,
            generation=generation,
        )
    return sub


def _generation_of(raw: Mapping[str, Any], cluster_id: uuid.UUID) -> int | None:
    meta = raw.get("metadata") or {}
    if meta.get(PARENT_META) != str(cluster_id) or meta.get(BUCKET_META):
        return None
    number = meta.get(GENERATION_META)
    return number if isinstance(number, int) and number > 0 else None


async def generations_on(
    node: Node, tenant: str, database: str, cluster_id: uuid.UUID
) -> list[tuple[int, str]]:
    """``(generation, physical name)`` of each generation > 0 of a collection on one node."""
    base = f"/tenants/{tenant}/databases/{parts_database(database)}/collections"
    found = []
    with contextlib.suppress(NotFoundError):  # nothing was ever made in the parts database
        async for raw in iter_collections(node.transport, base):
            number = _generation_of(raw, cluster_id)
            if number is not None:
                found.append((number, str(raw["name"])))
    return sorted(found)


class Generations:
    """Makes and drops a collection's generations on the copies of its shards."""

    def __init__(self, cluster: Cluster, physical: PhysicalIds) -> None:
        self._cluster = cluster
        self._physical = physical

    async def ensure(
        self,
        root: CollectionState,
        generation: int,
        shards: Sequence[str],
        configuration: Mapping[str, Any] | None,
    ) -> None:
        """Generation ``generation`` on every copy of ``shards``, made with ``configuration``
        where missing; one that exists with another configuration is refused (a rebuild's
        leftover: abort it first)."""
        sub = generation_state(root, generation)
        metadata = {ID_META: str(sub.id), PARENT_META: str(root.id), GENERATION_META: generation}
        wanted = None if configuration is None else _hnsw(configuration)

        async def create(node: Node) -> Any:
            raw = await make_part(node, sub, metadata, configuration)
            found = _hnsw(raw.get("configuration_json") or {})
            if wanted is not None and any(found.get(k) != v for k, v in wanted.items()):
                raise ConfigurationError(
                    f"generation {generation} of collection {root.name!r} exists on node "
                    f"{node.url} with another configuration ({found}); abort the rebuild that "
                    "made it first"
                )
            self._physical.record(sub, node, uuid.UUID(str(raw["id"])))
            return raw

        nodes = [n for s in shards for n in self._cluster.shards[s].nodes]
        await self._cluster.on_every_node("rebuild", create, nodes)

    async def drop(self, root: CollectionState, generation: int, shards: Sequence[str]) -> None:
        """Delete generation ``generation`` (> 0) from every copy of ``shards`` (all must
        answer; one already gone is fine)."""
        if generation == 0:
            raise ValueError("generation 0 is the root collection: it is emptied, not dropped")
        sub = generation_state(root, generation)
        path = f"{sub.base}/{sub.name}"

        async def drop(node: Node) -> Any:
            return await node.transport.request("DELETE", path)

        nodes = [n for s in shards for n in self._cluster.shards[s].nodes]
        await self._cluster.on_every_node("rebuild", drop, nodes, tolerate=(NotFoundError,))
        self._physical.forget(sub)
        logger.info("dropped generation %d of %s", generation, root.name)


def _hnsw(configuration: Mapping[str, Any]) -> dict[str, Any]:
    """The index parameters a configuration sets (what a rebuild changes and checks)."""
    hnsw = configuration.get("hnsw") or {}
    return {k: v for k, v in hnsw.items() if v is not None}
