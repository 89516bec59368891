"""Per-node physical collection ids: the one component that looks them up and records them."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from chromadb.errors import ChromaError, NotFoundError

from .._node import HintTarget, Node
from .._transport import iter_collections
from ._state import ID_META, CollectionState, StateCache

__all__ = ["PhysicalIds", "make_part"]


class PhysicalIds:
    """Resolves the request path of a logical collection (or bucket) on one node.

    ``catalog_url`` is the catalog node's URL: there the cluster id *is* the physical id, so a
    collection made outside this library (no ``_sc_id`` metadata) is still recognised."""

    def __init__(self, catalog_url: str, states: StateCache) -> None:
        self._catalog_url = catalog_url
        self._states = states

    async def node_path(self, state: CollectionState, node: Node, suffix: str = "") -> str:
        """The request path of a collection on one node, looking its physical id up once."""
        pid = state.physical.get(node.url)
        if pid is None:
            pid = await self.find(
                node,
                state.tenant,
                state.database,
                state.id,
                state.name,
                # A bucket's or generation's name never changes (made of the cluster id).
                by_name_only=state.bucket is not None or state.generation > 0,
            )
            state.physical[node.url] = pid
        return f"{state.base}/{pid}{suffix}"

    def known_path(self, state: CollectionState, node: Node, suffix: str = "") -> str | None:
        """``node_path`` if the id is already known, without asking anyone."""
        pid = state.physical.get(node.url)
        return None if pid is None else f"{state.base}/{pid}{suffix}"

    def record(self, state: CollectionState, node: Node, physical_id: UUID) -> None:
        """A physical id learnt from a create answer."""
        state.physical[node.url] = physical_id

    def forget(self, state: CollectionState) -> None:
        """Look every node's id up again next time (the collection was dropped and re-made)."""
        state.physical.clear()

    def is_cluster_collection(self, raw: Mapping[str, Any], node: Node, cluster_id: UUID) -> bool:
        marked = (raw.get("metadata") or {}).get(ID_META)
        if marked is not None:
            return str(marked) == str(cluster_id)
        return node.url == self._catalog_url and str(raw["id"]) == str(cluster_id)

    async def find(
        self,
        node: Node,
        tenant: str,
        database: str,
        cluster_id: UUID,
        name: str,
        *,
        by_name_only: bool = False,
    ) -> UUID:
        """A node's physical id of the cluster collection ``cluster_id``.

        Found by name first, but only trusted when the cluster id matches: the collection may
        have been renamed, or deleted and re-created under the same name, since the caller
        learnt the name (hints can be days old). Raises NotFoundError when it is gone.
        """
        base = f"/tenants/{tenant}/databases/{database}/collections"
        try:
            raw = await node.transport.request("GET", f"{base}/{name}")
            if self.is_cluster_collection(raw, node, cluster_id):
                return UUID(str(raw["id"]))
        except NotFoundError:
            pass
        if not by_name_only:
            async for raw in iter_collections(node.transport, base):
                if self.is_cluster_collection(raw, node, cluster_id):
                    return UUID(str(raw["id"]))
        raise NotFoundError(f"Collection [{cluster_id}] does not exist")

    async def replay_path(self, node: Node, target: HintTarget) -> str:
        """Where a hinted write goes on ``node``: found by the cluster id the hint names."""
        cluster_id = UUID(target.collection_id)
        state = self._states.get(cluster_id)
        if state is not None and node.url in state.physical:
            return await self.node_path(state, node, f"/{target.op}")
        pid = await self.find(
            node, target.tenant, target.database, cluster_id, target.collection_name
        )
        return f"/tenants/{target.tenant}/databases/{target.database}/collections/{pid}/{target.op}"


async def make_part(
    node: Node, sub: CollectionState, metadata: Mapping[str, Any], configuration: Any
) -> dict[str, Any]:
    """Make (or get) a part's physical collection on one node, in its database (made first
    if missing); the server's model of it."""
    databases = f"/tenants/{sub.tenant}/databases"
    # Already there (another part or process made it): the collection call below tells.
    with contextlib.suppress(ChromaError):
        await node.transport.request("POST", databases, body={"name": sub.database})
    body = {
        "name": sub.name,
        "metadata": dict(metadata),
        "configuration": configuration,
        "get_or_create": True,
    }
    raw: dict[str, Any] = await node.transport.request(
        "POST", f"{databases}/{sub.database}/collections", body=body
    )
    return raw
