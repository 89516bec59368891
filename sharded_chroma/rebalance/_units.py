"""What one migration moves, as parts: the source parts, the target parts, and where each
record of a source part goes. Hash of the id: each source shard's root collection, records to
the goal's shard for their id. Time: whole buckets, each its own physical collection, from the
shard the current policy gives them to the one the goal does. A move into a new generation
(a rebuild, or a policy routing by metadata): every record, from the current generation's
part to the goal's part for it in the next."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._policies import TimePolicy, policy_to_json
from ..catalog._generations import generation_state
from ..catalog._layouts import PartLayouts, Target
from ..catalog._state import CollectionState
from ._homes import BucketHomes, HashHomes, Homes, PlacedHomes

__all__ = ["Units", "generation_units", "moving_units"]


@dataclass(frozen=True)
class Units:
    sources: tuple[Target, ...]
    targets: tuple[Target, ...]
    homes: Homes
    buckets: tuple[tuple[str, str], ...] = ()
    """Time: ``(source shard, label)`` of each moving bucket."""


async def moving_units(
    layouts: PartLayouts, state: CollectionState, source: Any, goal: Any
) -> Units:
    """The parts the move from ``source`` to ``goal`` reads and writes now (time buckets are
    listed again on every call: a bucket made during the move moves too). The target buckets
    are made where they are missing."""
    if not isinstance(goal, TimePolicy):
        return Units(
            tuple(Target(s, state) for s in sorted(source.shards_named())),
            tuple(Target(s, state) for s in sorted(goal.shards_named())),
            HashHomes(goal, state),
        )
    moves: list[tuple[str, str, str]] = []
    for shard in sorted(source.shards_named()):
        for label in await layouts.list_buckets(state, shard):
            if source.owner_of(label) != shard:
                continue  # a copy this move (or an earlier one) made here
            home = goal.owner_of(label)
            if home is not None and home != shard:
                moves.append((shard, label, home))
    for _, label, home in moves:
        await layouts.ensure_bucket(state, home, label)
    sources = [Target(s, layouts.bucket_state(state, label)) for s, label, _ in moves]
    targets = [Target(h, layouts.bucket_state(state, label)) for _, label, h in moves]
    homes = BucketHomes({src.key: dst for src, dst in zip(sources, targets, strict=True)})
    return Units(tuple(sources), tuple(targets), homes, tuple((s, lb) for s, lb, _ in moves))


def generation_units(state: CollectionState, source: Any, goal: Any, old: int, new: int) -> Units:
    """A move from ``source`` at generation ``old`` to ``goal`` at ``new``."""
    sources = tuple(Target(s, generation_state(state, old)) for s in sorted(source.shards_named()))
    targets = tuple(Target(s, generation_state(state, new)) for s in sorted(goal.shards_named()))
    homes: Homes
    if policy_to_json(source) == policy_to_json(goal):
        homes = BucketHomes({src.key: dst for src, dst in zip(sources, targets, strict=True)})
    else:
        homes = PlacedHomes(goal, generation_state(state, new))
    return Units(sources, targets, homes)
