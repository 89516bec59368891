"""Giving a migration's target shards the collection: made where it is missing, with the
catalog node's metadata and configuration, and refused where it exists with another one."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from chromadb.errors import NotFoundError

from .._errors import ConfigurationError
from .._node import Node
from ..catalog._catalog import Catalog
from ..catalog._generations import Generations, generation_state
from ..catalog._state import ID_META, CollectionState
from ..cluster._cluster import Cluster

__all__ = ["TargetCollections"]

logger = logging.getLogger("sharded_chroma.rebalance")


class TargetCollections:
    """Makes a collection exist, identically configured, on every node of some shards, and
    stores its final policy once a migration is done."""

    def __init__(self, cluster: Cluster, catalog: Catalog, generations: Generations) -> None:
        self._cluster = cluster
        self._catalog = catalog
        self._generations = generations

    async def store_policy(
        self, state: CollectionState, policy: Any, generation: int | None = None
    ) -> None:
        await self._catalog.store_policy(state, policy, generation)

    async def configuration(self, state: CollectionState, generation: int) -> dict[str, Any]:
        """The configuration of the collection's ``generation`` on the catalog node (the
        root's at 0)."""
        sub = generation_state(state, generation)
        path = f"{sub.base}/{sub.name}"
        raw = await self._cluster.catalog_node.transport.request("GET", path)
        return dict(raw.get("configuration_json") or {})

    async def ensure(
        self, state: CollectionState, shards: Sequence[str], generation: int = 0
    ) -> None:
        """The collection on every node of ``shards``; after a rebuild (``generation`` > 0)
        the generation's collections too, configured as the catalog shard's."""
        path = f"{state.base}/{state.name}"
        catalog_node = self._cluster.catalog_node
        catalog = await catalog_node.transport.request("GET", path)
        metadata = {**(catalog.get("metadata") or {}), ID_META: str(state.id)}
        wanted = catalog.get("configuration_json")
        for shard in shards:
            for node in self._cluster.shards[shard].nodes:
                await self._ensure_on(node, shard, state, path, metadata, wanted)
        if generation:
            config = await self.configuration(state, generation)
            await self._generations.ensure(state, generation, shards, config)

    async def _ensure_on(
        self,
        node: Node,
        shard: str,
        state: CollectionState,
        path: str,
        metadata: dict[str, Any],
        wanted: Any,
    ) -> None:
        try:
            found = await node.transport.request("GET", path)
        except NotFoundError:
            body = {
                "name": state.name,
                "metadata": metadata,
                "configuration": wanted,
                "get_or_create": True,
            }
            found = await node.transport.request("POST", state.base, body=body)
            logger.info("collection %s made on shard %s node %s", state.name, shard, node.url)
        marked = (found.get("metadata") or {}).get(ID_META)
        if node is not self._cluster.catalog_node and str(marked) != str(state.id):
            raise ConfigurationError(
                f"shard {shard!r} node {node.url} holds another collection named "
                f"{state.name!r} (not this cluster's); nothing was moved"
            )
        if found.get("configuration_json") != wanted:
            raise ConfigurationError(
                f"collection {state.name!r} on shard {shard!r} node {node.url} is configured "
                "differently from the catalog shard's (index space or parameters); results "
                "could not be merged, so nothing was moved"
            )
