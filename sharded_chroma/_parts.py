"""Parts of a logical collection: where its records can be, and what a call must ask.

A part is one physical collection on one shard. Under hash, field and composite policies a
collection has one part per shard (the physical collection of its own name). Under a time
policy each bucket is its own physical collection on the shard the policy names, so retention
can drop a bucket by deleting a collection, in time independent of its size. Buckets live in a
companion database (``<database>.sc-parts``) so they never show up in ``list_collections`` and
``count_collections``; their names are ``<cluster id>-<bucket label>`` and their reserved
metadata names the collection and bucket they belong to.

A get or query whose filter bounds the time to a few buckets addresses them by name (a bucket
that does not exist reads as empty); every other call lists the companion database on the
shards it must ask. Neither caches which buckets exist, so a bucket another process created a
moment ago is never missed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from chromadb.api.collection_configuration import (
    UpdateCollectionConfiguration,
    update_collection_configuration_to_json,
)
from chromadb.api.types import CollectionMetadata, IDs, Metadatas
from chromadb.errors import ChromaError, NotFoundError

from ._backend import _BUCKET_META, _ID_META, _PARENT_META, CollectionState
from ._catalog import CatalogOps
from ._fanout import fan_out, raise_for_failures
from ._policies import HashPolicy, Placement, Scope, TimePolicy
from ._replicas import Node
from ._transport import iter_collections

__all__ = ["PartOps", "Target", "parts_database"]

logger = logging.getLogger("sharded_chroma.parts")

# A bounded time filter spanning at most this many buckets addresses them by name.
_DIRECT_BUCKETS = 64


def parts_database(database: str) -> str:
    """The companion database holding a database's time buckets."""
    return f"{database}.sc-parts"


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


@dataclass(frozen=True)
class Plan:
    """What a read must ask, which shards the filter let it skip, and shards that failed
    while their buckets were being listed."""

    targets: dict[str, Target]
    skipped: tuple[str, ...]
    failed: dict[str, Exception]


class PartOps(CatalogOps):
    """Placement of records into parts, and the parts a read must ask."""

    # -- time buckets -----------------------------------------------------------------------

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
            )
        return sub

    async def ensure_bucket(self, state: CollectionState, shard: str, bucket: str) -> None:
        """Create a bucket's physical collection on every copy of its shard (once per client).

        Every copy must answer: a copy without the bucket could not take replayed writes."""
        sub = self.bucket_state(state, bucket)
        nodes = self.shards[shard].nodes
        if all(n.url in sub.physical for n in nodes):
            return
        tenant_base = f"/tenants/{sub.tenant}/databases"
        body = {
            "name": sub.name,
            "metadata": {_ID_META: str(sub.id), _PARENT_META: str(state.id), _BUCKET_META: bucket},
            "configuration": state.configuration or None,
            "get_or_create": True,
        }

        async def create(node: Node) -> Any:
            try:
                await node.transport.request("POST", tenant_base, body={"name": sub.database})
            except ChromaError as exc:
                # Already there (another bucket or process made it): the next call tells.
                logger.debug("database %s on %s: %s", sub.database, node.url, exc)
            raw = await node.transport.request(
                "POST", f"{tenant_base}/{sub.database}/collections", body=body
            )
            sub.physical[node.url] = UUID(str(raw["id"]))
            return raw

        await self.on_every_node("create_bucket", create, nodes)

    async def delete_collection(
        self, name: str, tenant: str = "default_tenant", database: str = "default_database"
    ) -> None:
        """Delete a collection, its time buckets first: if that fails the collection is still
        listed and the call can be repeated, instead of buckets left behind unseen."""
        self._check_open()
        path = self._base(tenant, database) + f"/collections/{name}"

        async def one(node: Node) -> UUID:
            raw = await node.transport.request("GET", path)
            return self._logical_id(self._model(raw), node)

        try:
            cluster_id = await self.shards[self.catalog_shard].read(one)
        except NotFoundError:
            cluster_id = None  # the catalog delete below raises the single-server error
        if cluster_id is not None:
            base = f"{self._base(tenant, parts_database(database))}/collections"

            async def drop(node: Node) -> None:
                for _, bucket in await self._buckets_on(node, tenant, database, cluster_id):
                    with contextlib.suppress(NotFoundError):
                        await node.transport.request("DELETE", f"{base}/{bucket}")

            await self.on_every_node("delete_collection", drop)
        await super().delete_collection(name, tenant, database)

    async def _modify(
        self,
        id: UUID,
        new_name: str | None = None,
        new_metadata: CollectionMetadata | None = None,
        new_configuration: UpdateCollectionConfiguration | None = None,
        tenant: str = "default_tenant",
        database: str = "default_database",
    ) -> None:
        """Rename or change a collection; a configuration change reaches its buckets too, and
        buckets made later copy the new configuration."""
        await super()._modify(id, new_name, new_metadata, new_configuration, tenant, database)
        state = await self.state(id, tenant, database)
        if new_configuration is None or not isinstance(state.policy, TimePolicy):
            return
        body = {
            "new_name": None,
            "new_metadata": None,
            "new_configuration": update_collection_configuration_to_json(new_configuration),
        }
        base = f"{self._base(tenant, parts_database(database))}/collections"

        async def put(node: Node) -> None:
            for _, bucket in await self._buckets_on(node, tenant, database, state.id):
                raw = await node.transport.request("GET", f"{base}/{bucket}")
                await node.transport.request("PUT", f"{base}/{raw['id']}", body=body)

        await self.on_every_node("modify", put)
        raw = await self.catalog_node.transport.request(
            "GET", f"{self._base(tenant, database)}/collections/{state.name}"
        )
        state.configuration = dict(raw.get("configuration_json") or {})

    async def _buckets_on(
        self, node: Node, tenant: str, database: str, cluster_id: UUID
    ) -> list[tuple[str, str]]:
        """``(label, physical name)`` of each bucket of ``cluster_id`` on one node, by label."""
        base = f"{self._base(tenant, parts_database(database))}/collections"
        found = []
        with contextlib.suppress(NotFoundError):  # no bucket was ever made on this node
            async for raw in iter_collections(node.transport, base):
                meta = raw.get("metadata") or {}
                if meta.get(_PARENT_META) == str(cluster_id) and meta.get(_BUCKET_META):
                    found.append((str(meta[_BUCKET_META]), str(raw["name"])))
        return sorted(found)

    async def replica_buckets(
        self, state: CollectionState, shard: str, *, create_missing: bool
    ) -> list[str]:
        """Labels of the buckets on any copy of a shard (for anti-entropy); with
        ``create_missing`` a bucket missing on some copy is made there, empty, so repair can
        fill it. Every copy must answer."""
        nodes = self.shards[shard].nodes
        found = await self.on_every_node(
            "list_buckets",
            lambda node: self._buckets_on(node, state.tenant, state.database, state.id),
            nodes,
        )
        per_node = {url: {label for label, _ in pairs} for url, pairs in found.items()}
        labels = sorted(set().union(*per_node.values()))
        if create_missing:
            for label in labels:
                if any(label not in have for have in per_node.values()):
                    self.bucket_state(state, label).physical.clear()
                    await self.ensure_bucket(state, shard, label)
        return labels

    async def list_buckets(self, state: CollectionState, shard: str) -> list[str]:
        """Labels of the collection's buckets on a shard, read from one copy."""
        found = await self.shards[shard].read(
            lambda node: self._buckets_on(node, state.tenant, state.database, state.id)
        )
        return [label for label, _ in found]

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
            sub = self.bucket_state(state, label)
            path = f"/tenants/{sub.tenant}/databases/{sub.database}/collections/{sub.name}"

            async def drop(node: Node, path: str = path) -> Any:
                return await node.transport.request("DELETE", path)

            await self.on_every_node(
                "drop_partitions", drop, self.shards[shard].nodes, tolerate=(NotFoundError,)
            )
            state.buckets.pop(label, None)
            logger.info("dropped bucket %s of %s on shard %s", label, state.name, shard)
        return doomed

    # -- placement --------------------------------------------------------------------------

    def place_records(
        self, state: CollectionState, ids: IDs, metadatas: Metadatas | None
    ) -> list[Placement]:
        """Every record's placement, or RoutingError before anything is written."""
        policy = state.policy
        if isinstance(policy, HashPolicy):
            return policy.place_all(ids, metadatas)
        return [
            policy.place(record_id, None if metadatas is None else metadatas[i])
            for i, record_id in enumerate(ids)
        ]

    def group_placements(
        self, state: CollectionState, placements: Sequence[Placement]
    ) -> tuple[dict[str, list[int]], dict[str, Target]]:
        """Positions per part key (parts in a stable order), and the part of each key."""
        by_place: dict[Placement, list[int]] = {}
        for pos, where in enumerate(placements):
            by_place.setdefault(where, []).append(pos)
        groups: dict[str, list[int]] = {}
        parts: dict[str, Target] = {}
        for where, positions in by_place.items():
            target = self.target(state, where.shard, where.bucket)
            groups[target.key] = positions
            parts[target.key] = target
        order = sorted(groups)
        return {k: groups[k] for k in order}, {k: parts[k] for k in order}

    def target(
        self, state: CollectionState, shard: str, bucket: str | None, ids: list[str] | None = None
    ) -> Target:
        sub = state if bucket is None else self.bucket_state(state, bucket)
        return Target(shard, sub, ids)

    def ids_routed(self, state: CollectionState) -> bool:
        """Whether a record's place follows from its id alone."""
        return isinstance(state.policy, HashPolicy) and state.policy.field is None

    # -- what a read asks -------------------------------------------------------------------

    async def plan(
        self,
        state: CollectionState,
        ids: IDs | None,
        where: Mapping[str, Any] | None,
        *,
        direct: bool = False,
    ) -> Plan:
        """The parts a read must ask: the shards the policy uses, narrowed by the filter's
        scope and, under hash of the id, by the ids; time buckets listed on those shards.

        With ``direct``, a time filter bounded to a few buckets names them without listing;
        the caller must then read a bucket that does not exist as empty."""
        policy = state.policy
        scope: Scope = policy.scope(where)
        used = policy.shards_named()
        shards = [s for s in self.shard_names if s in used]
        if scope.shards is not None:
            shards = [s for s in shards if s in scope.shards]
        by_shard: dict[str, list[str] | None] = {
            s: (None if ids is None else list(ids)) for s in shards
        }
        if ids is not None and self.ids_routed(state):
            owners: dict[str, list[str]] = {}
            for record_id in ids:
                owners.setdefault(policy.place(record_id, None).shard, []).append(record_id)
            by_shard = {s: owners[s] for s in shards if s in owners}
        skipped = tuple(s for s in self.shard_names if s not in by_shard)
        if not isinstance(policy, TimePolicy):
            targets = {s: Target(s, state, i) for s, i in by_shard.items()}
            return Plan(targets, skipped, {})
        if direct and scope.times is not None:
            labels = policy.buckets_within(scope.times, _DIRECT_BUCKETS)
            if labels is not None:
                # A bounded time filter names its buckets: address them by name, without
                # listing (a bucket that does not exist reads as empty, see ``_reads``).
                targets = {}
                for label in labels:
                    shard = policy.shard_of(label)
                    if shard in by_shard:
                        t = self.target(state, shard, label, by_shard[shard])
                        targets[t.key] = t
                asked = {t.shard for t in targets.values()}
                skipped = tuple(s for s in self.shard_names if s not in asked)
                return Plan(targets, skipped, {})
        listed, failed = await fan_out(
            {s: functools.partial(self.list_buckets, state, s) for s in by_shard}
        )
        targets = {}
        for shard in by_shard:
            for label in listed.get(shard, ()):
                if policy.bucket_may_match(label, scope):
                    t = self.target(state, shard, label, by_shard[shard])
                    targets[t.key] = t
        return Plan(targets, skipped, failed)

    async def all_parts(self, state: CollectionState, operation: str) -> dict[str, Target]:
        """Every part of a collection; any shard that cannot list its buckets fails the call."""
        found = await self.plan(state, None, None)
        raise_for_failures(operation, found.failed)
        return found.targets


def shards_of(targets: Iterable[Target]) -> tuple[str, ...]:
    """The shards of some targets, each once, in first-seen order."""
    return tuple(dict.fromkeys(t.shard for t in targets))
