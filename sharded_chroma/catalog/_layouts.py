"""Parts of a logical collection, and every rule about time buckets.

A part is one physical collection on one shard. Under hash, field and composite policies a
collection has one part per shard (the physical collection of its own name). Under a time
policy each bucket is its own physical collection on the shard the policy names, so retention
can drop a bucket by deleting a collection, in time independent of its size. Buckets live in a
companion database (``<database>.sc-parts``) so they never show up in ``list_collections`` and
``count_collections``; their names are ``<cluster id>-<bucket label>`` and their reserved
metadata names the collection and bucket they belong to. Nothing caches which buckets exist,
so a bucket another process created a moment ago is never missed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from chromadb.errors import NotFoundError

from .._fanout import fan_out, raise_for_failures
from .._node import Node
from .._policies import TimePolicy
from .._transport import iter_collections
from ..cluster._cluster import Cluster
from ._generations import generations_on
from ._physical import PhysicalIds, make_part
from ._state import BUCKET_META, ID_META, PARENT_META, CollectionState, parts_database

__all__ = ["PartLayouts", "Target", "parts_database"]

logger = logging.getLogger("sharded_chroma.parts")


_TOMBSTONES = "tombstones"
TOMBS_META = "_sc_tombs"
"""On a delete-mark collection: the cluster id of the collection whose deletes it marks."""


@dataclass(frozen=True)
class Target:
    """One physical collection a call asks: a shard, the state to address it with, and the
    ids to ask it for (None: no id filter)."""

    shard: str
    state: CollectionState
    ids: list[str] | None = None

    @property
    def key(self) -> str:
        return self.shard if self.state.bucket is None else f"{self.shard}/{self.state.bucket}"


class PartLayouts:
    """Addresses parts (root collections and time buckets) and makes, lists and drops buckets."""

    def __init__(self, cluster: Cluster, physical: PhysicalIds) -> None:
        self._cluster = cluster
        self._physical = physical

    # -- addressing -------------------------------------------------------------------------

    def is_bucketed(self, state: CollectionState) -> bool:
        return isinstance(state.policy, TimePolicy)

    def bucket_state(self, state: CollectionState, bucket: str) -> CollectionState:
        sub = state.buckets.get(bucket)
        if sub is None:
            sub = state.buckets[bucket] = CollectionState(
                id=uuid.uuid5(state.id, bucket),
                name=f"{state.id}-{bucket}",
                tenant=state.tenant,
                database=parts_database(state.database),
                physical={},
                policy=state.policy,
                bucket=bucket,
                parent=state.id,
            )
        return sub

    def target(
        self, state: CollectionState, shard: str, bucket: str | None, ids: list[str] | None = None
    ) -> Target:
        sub = state if bucket is None else self.bucket_state(state, bucket)
        return Target(shard, sub, ids)

    def part_of_key(self, state: CollectionState, key: str) -> Target:
        """The part a ``Target.key`` names."""
        shard, _, bucket = key.partition("/")
        return self.target(state, shard, bucket or None)

    async def stored_dimension(self, state: CollectionState) -> int | None:
        """The dimension the shards' physical collections hold, None while unknown or when
        they disagree; shards that cannot answer now are left out, so a write routed to live
        shards does not fail because another shard is down."""

        async def model(node: Node) -> Any:
            if self.is_bucketed(state):
                # The root collections of a time-placed collection hold no records: ask its
                # buckets on this node until one has a dimension.
                base = f"/tenants/{state.tenant}/databases/{parts_database(state.database)}"
                for _, name in await self.buckets_on(node, state.tenant, state.database, state.id):
                    raw = await node.transport.request("GET", f"{base}/collections/{name}")
                    if raw.get("dimension") is not None:
                        return raw
                return {}
            await self._physical.node_path(state, node)
            return await node.transport.request(
                "GET", f"{state.base}/by-id/{state.physical[node.url]}"
            )

        cluster = self._cluster
        answers, _ = await fan_out(
            {n: functools.partial(cluster.shards[n].read, model) for n in cluster.shard_names}
        )
        dims = {int(m["dimension"]) for m in answers.values() if m.get("dimension") is not None}
        return dims.pop() if len(dims) == 1 else None

    # -- buckets ----------------------------------------------------------------------------

    async def ensure_bucket(self, state: CollectionState, shard: str, bucket: str) -> None:
        """Create a bucket's physical collection on every copy of its shard (once per client).

        Every copy must answer: a copy without the bucket could not take replayed writes."""
        sub = self.bucket_state(state, bucket)
        nodes = self._cluster.shards[shard].nodes
        if all(n.url in sub.physical for n in nodes):
            return
        metadata = {ID_META: str(sub.id), PARENT_META: str(state.id), BUCKET_META: bucket}
        await self._create_part(sub, metadata, state.configuration or None, nodes)

    def tombstone_state(self, state: CollectionState) -> CollectionState:
        """The hidden collection of a collection's delete marks (see ``ops._tombstones``), on
        the catalog shard in the companion database; found by name, never listed as a bucket."""
        if state.tombstones is None:
            state.tombstones = CollectionState(
                id=uuid.uuid5(state.id, _TOMBSTONES),
                name=f"{state.id}-{_TOMBSTONES}",
                tenant=state.tenant,
                database=parts_database(state.database),
                physical={},
                policy=state.policy,
                bucket=_TOMBSTONES,
            )
        return state.tombstones

    async def ensure_tombstones(self, state: CollectionState) -> CollectionState:
        """The delete-mark collection on every copy of the catalog shard (all must answer)."""
        sub = self.tombstone_state(state)
        nodes = self._cluster.shards[self._cluster.catalog_shard].nodes
        if all(n.url in sub.physical for n in nodes):
            return sub
        metadata = {ID_META: str(sub.id), TOMBS_META: str(state.id)}
        await self._create_part(sub, metadata, None, nodes)
        return sub

    async def _create_part(
        self,
        sub: CollectionState,
        metadata: dict[str, Any],
        configuration: Any,
        nodes: list[Node],
    ) -> None:
        async def create(node: Node) -> Any:
            raw = await make_part(node, sub, metadata, configuration)
            self._physical.record(sub, node, UUID(str(raw["id"])))
            return raw

        await self._cluster.on_every_node("create_part", create, nodes)

    async def buckets_on(
        self, node: Node, tenant: str, database: str, cluster_id: UUID
    ) -> list[tuple[str, str]]:
        """``(label, physical name)`` of each bucket of ``cluster_id`` on one node, by label."""
        base = f"/tenants/{tenant}/databases/{parts_database(database)}/collections"
        found = []
        with contextlib.suppress(NotFoundError):  # no bucket was ever made on this node
            async for raw in iter_collections(node.transport, base):
                meta = raw.get("metadata") or {}
                if meta.get(PARENT_META) == str(cluster_id) and meta.get(BUCKET_META):
                    found.append((str(meta[BUCKET_META]), str(raw["name"])))
        return sorted(found)

    async def list_buckets(self, state: CollectionState, shard: str) -> list[str]:
        """Labels of the collection's buckets on a shard, read from one copy."""
        found = await self._cluster.shards[shard].read(
            lambda node: self.buckets_on(node, state.tenant, state.database, state.id)
        )
        return [label for label, _ in found]

    async def replica_buckets(
        self, state: CollectionState, shard: str, *, create_missing: bool
    ) -> list[str]:
        """Labels of the buckets on any copy of a shard (for anti-entropy); with
        ``create_missing`` a bucket missing on some copy is made there, empty, so repair can
        fill it. Every copy must answer."""
        nodes = self._cluster.shards[shard].nodes
        found = await self._cluster.on_every_node(
            "list_buckets",
            lambda node: self.buckets_on(node, state.tenant, state.database, state.id),
            nodes,
        )
        per_node = {url: {label for label, _ in pairs} for url, pairs in found.items()}
        labels = sorted(set().union(*per_node.values()))
        if create_missing:
            for label in labels:
                if any(label not in have for have in per_node.values()):
                    self._physical.forget(self.bucket_state(state, label))
                    await self.ensure_bucket(state, shard, label)
        return labels

    async def drop_all(self, tenant: str, database: str, cluster_id: UUID) -> None:
        """Delete every bucket and generation (and the delete marks) of a collection on every
        node, before the collection itself."""
        base = f"/tenants/{tenant}/databases/{parts_database(database)}/collections"

        async def drop(node: Node) -> None:
            names = [b for _, b in await self.buckets_on(node, tenant, database, cluster_id)]
            names += [g for _, g in await generations_on(node, tenant, database, cluster_id)]
            for name in [*names, f"{cluster_id}-{_TOMBSTONES}"]:
                with contextlib.suppress(NotFoundError):
                    await node.transport.request("DELETE", f"{base}/{name}")

        await self._cluster.on_every_node("delete_collection", drop)

    async def reconfigure(self, state: CollectionState, body: dict[str, Any]) -> None:
        """Apply a collection's configuration change to every bucket and generation on every
        node."""
        base = f"/tenants/{state.tenant}/databases/{parts_database(state.database)}/collections"

        async def put(node: Node) -> None:
            key = (node, state.tenant, state.database, state.id)
            names = [b for _, b in await self.buckets_on(*key)]
            names += [g for _, g in await generations_on(node, *key[1:])]
            for bucket in names:
                raw = await node.transport.request("GET", f"{base}/{bucket}")
                await node.transport.request("PUT", f"{base}/{raw['id']}", body=body)

        await self._cluster.on_every_node("modify", put)

    async def drop_buckets(
        self, state: CollectionState, before: float, *, dry_run: bool
    ) -> list[tuple[str, str]]:
        """Delete every bucket that ends at or before ``before`` (epoch seconds).

        Returns ``(shard, bucket)`` pairs, sorted by bucket; with ``dry_run`` nothing is
        deleted. A bucket is deleted from every copy of its shard (all must answer)."""
        policy = state.policy
        if not isinstance(policy, TimePolicy):
            raise ValueError(
                f"collection {state.name!r} is placed by a {policy.kind!r} policy; only a time "
                "policy has buckets to drop"
            )
        shards = sorted(policy.shards_named())
        listed, failures = await fan_out(
            {s: functools.partial(self.list_buckets, state, s) for s in shards}
        )
        raise_for_failures("drop_partitions", failures)
        doomed = []
        for shard, labels in listed.items():
            for label in labels:
                span = policy.interval_of(label)
                if span is not None and span[1] <= before:
                    doomed.append((shard, label))
        doomed.sort(key=lambda x: (x[1], x[0]))
        if dry_run:
            return doomed
        for shard, label in doomed:
            await self.drop_bucket(state, shard, label)
        return doomed

    async def drop_bucket(self, state: CollectionState, shard: str, label: str) -> None:
        """Delete one bucket's physical collection from every copy of one shard (all must
        answer; one already gone is fine)."""
        sub = self.bucket_state(state, label)
        path = f"{sub.base}/{sub.name}"

        async def drop(node: Node) -> Any:
            return await node.transport.request("DELETE", path)

        await self._cluster.on_every_node(
            "drop_partitions", drop, self._cluster.shards[shard].nodes, tolerate=(NotFoundError,)
        )
        state.buckets.pop(label, None)
        logger.info("dropped bucket %s of %s on shard %s", label, state.name, shard)
