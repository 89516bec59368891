"""Routing: which part each record goes to, and which parts a read must ask."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chromadb.api.types import IDs, Metadatas

from .._fanout import fan_out, raise_for_failures
from .._policies import HashPolicy, Placement, Scope, TimePolicy
from ..catalog._layouts import PartLayouts, Target
from ..catalog._state import CollectionState
from ..control._served import served_map, serving_policy

__all__ = ["Plan", "Router", "shards_of"]

# A bounded time filter spanning at most this many buckets addresses them by name.
_DIRECT_BUCKETS = 64


@dataclass(frozen=True)
class Plan:
    """What a read must ask, which shards the filter let it skip, and shards that failed
    while their buckets were being listed."""

    targets: dict[str, Target]
    skipped: tuple[str, ...]
    failed: dict[str, Exception]


def shards_of(targets: Iterable[Target]) -> tuple[str, ...]:
    """The shards of some targets, each once, in first-seen order."""
    return tuple(dict.fromkeys(t.shard for t in targets))


class Router:
    """Placement of records into parts (pure) and read planning (lists buckets when needed)."""

    def __init__(self, shard_names: Sequence[str], layouts: PartLayouts) -> None:
        self.shard_names = tuple(shard_names)
        self._layouts = layouts

    @staticmethod
    def ids_routed(state: CollectionState) -> bool:
        """Whether a record's place follows from its id alone."""
        policy = serving_policy(state)
        return isinstance(policy, HashPolicy) and policy.field is None

    def place_records(
        self, state: CollectionState, ids: IDs, metadatas: Metadatas | None
    ) -> list[Placement]:
        """Every record's placement, or RoutingError before anything is written."""
        policy = serving_policy(state)
        if isinstance(policy, HashPolicy):
            return policy.place_all(ids, metadatas)
        return [
            policy.place(record_id, None if metadatas is None else metadatas[i])
            for i, record_id in enumerate(ids)
        ]

    def key_of(self, state: CollectionState, placement: Placement) -> str:
        return self._layouts.target(state, placement.shard, placement.bucket).key

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
            target = self._layouts.target(state, where.shard, where.bucket)
            groups[target.key] = positions
            parts[target.key] = target
        order = sorted(groups)
        return {k: groups[k] for k in order}, {k: parts[k] for k in order}

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
        policy = serving_policy(state)
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
        layouts = self._layouts
        if direct and scope.times is not None:
            labels = policy.buckets_within(scope.times, _DIRECT_BUCKETS)
            if labels is not None:
                # A bounded time filter names its buckets: address them by name, without
                # listing (a bucket that does not exist reads as empty, see ``Reader``).
                targets = {}
                for label in labels:
                    shard = policy.shard_of(label)
                    if shard in by_shard:
                        t = layouts.target(state, shard, label, by_shard[shard])
                        targets[t.key] = t
                asked = {t.shard for t in targets.values()}
                skipped = tuple(s for s in self.shard_names if s not in asked)
                return Plan(targets, skipped, {})
        listed, failed = await fan_out(
            {s: functools.partial(layouts.list_buckets, state, s) for s in by_shard}
        )
        targets = {}
        served = served_map(state)
        moving = served is not None and served.migrating
        for shard in by_shard:
            for label in listed.get(shard, ()):
                if moving and policy.owner_of(label) not in (shard, None):
                    continue  # a move's copy of the bucket, or its old place: not read here
                if policy.bucket_may_match(label, scope):
                    t = layouts.target(state, shard, label, by_shard[shard])
                    targets[t.key] = t
        return Plan(targets, skipped, failed)

    async def all_parts(self, state: CollectionState, operation: str) -> dict[str, Target]:
        """Every part of a collection; any shard that cannot list its buckets fails the call."""
        found = await self.plan(state, None, None)
        raise_for_failures(operation, found.failed)
        return found.targets
