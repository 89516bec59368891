"""How a collection's records spread over partitions and shards, for status views.

Per shard and per time bucket the counts come from each part's count (cheap). Partitions of a
field or composite policy are not physical, so their counts come from reading every record's
routing value once (ids and metadata, one page at a time): time grows with the collection.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._fanout import fan_out, raise_for_failures
from ._policies import FieldPolicy, TimePolicy
from .catalog._layouts import Target
from .catalog._state import CollectionState
from .control._served import serving_policy

if TYPE_CHECKING:
    from .ops._partio import PartIO
    from .ops._reader import Reader
    from .ops._router import Router

__all__ = ["CollectionLayout", "PartitionCount", "collection_layout"]

UNPLACED = "(unplaced)"
"""Partition name for records whose routing value the policy cannot place (none written by
this library has one; records written around it might)."""


@dataclass(frozen=True)
class PartitionCount:
    partition: str
    shards: tuple[str, ...]
    records: int


@dataclass(frozen=True)
class CollectionLayout:
    """Record counts of one collection per partition and per shard."""

    collection: str
    policy: str
    shards: Mapping[str, int] = field(default_factory=dict)
    """Records per shard, for every shard the policy can place records on."""
    partitions: tuple[PartitionCount, ...] = ()

    @property
    def records(self) -> int:
        return sum(self.shards.values())

    @property
    def skew(self) -> float:
        """Largest deviation of a shard's count from the mean, as a fraction of the mean."""
        if not self.shards or not self.records:
            return 0.0
        mean = self.records / len(self.shards)
        return max(abs(n - mean) / mean for n in self.shards.values())


async def _field_counts(
    io: PartIO, policy: FieldPolicy, parts: Mapping[str, Target]
) -> dict[str, int]:
    async def scan(target: Target) -> dict[str, int]:
        out: dict[str, int] = {}
        body = {"include": ["metadatas"]}
        async for page in io.pages(target, body):
            for meta in page.get("metadatas") or ():
                name = policy.partition_of_value((meta or {}).get(policy.field)) or UNPLACED
                out[name] = out.get(name, 0) + 1
        return out

    results, failures = await fan_out({k: functools.partial(scan, t) for k, t in parts.items()})
    raise_for_failures("layout", failures)
    total: dict[str, int] = {}
    for counts in results.values():
        for name, n in counts.items():
            total[name] = total.get(name, 0) + n
    return total


async def collection_layout(
    router: Router, reader: Reader, io: PartIO, state: CollectionState
) -> CollectionLayout:
    policy: Any = serving_policy(state)
    counts = await reader.part_counts(state)
    parts = await router.all_parts(state, "layout")
    used = policy.shards_named()
    shards = {s: 0 for s in router.shard_names if s in used}
    for key, n in counts.items():
        shards[parts[key].shard] = shards.get(parts[key].shard, 0) + n
    partitions: list[PartitionCount]
    if isinstance(policy, TimePolicy):
        partitions = [
            PartitionCount(str(parts[k].state.bucket), (parts[k].shard,), n)
            for k, n in sorted(counts.items(), key=lambda kv: str(parts[kv[0]].state.bucket))
        ]
    elif isinstance(policy, FieldPolicy):
        by_name = await _field_counts(io, policy, parts)
        partitions = [
            PartitionCount(name, tuple(shard_list), by_name.get(name, 0))
            for name, shard_list in policy.partitions.items()
        ]
        if by_name.get(UNPLACED):
            partitions.append(PartitionCount(UNPLACED, (), by_name[UNPLACED]))
    else:
        partitions = [PartitionCount(s, (s,), n) for s, n in shards.items()]
    return CollectionLayout(state.name, policy.kind, shards, tuple(partitions))
