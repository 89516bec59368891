"""The rebalance planner: from a policy and a goal, the new policy and the fewest moves.

Pure and synchronous: nothing here reads or writes a shard. A plan lists its problems instead
of raising, so one look (``describe``) shows all of them; ``raise_for_problems`` makes them an
error. A plan with problems keeps the current policy as its goal and has no moves.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .._frozen import FrozenDict
from .._policies import FieldPolicy, HashPolicy, TimePolicy
from ._plans import Move, PlannedPolicy, RebalancePlan, raise_for_problems

__all__ = [
    "Move",
    "PlannedPolicy",
    "RebalancePlan",
    "plan_field",
    "plan_hash",
    "plan_time",
    "raise_for_problems",
]

P = TypeVar("P", bound=BaseModel)
K = TypeVar("K")
_NO_MOVES: Mapping[str, str] = FrozenDict()


def _rebuilt(policy: P, problems: list[str], **changes: Any) -> P:
    """``policy`` with ``changes``, validated (``model_copy`` would not check the result)."""
    if problems:
        return policy
    try:
        return type(policy).model_validate({**_fields(policy), **changes})
    except ValidationError as exc:
        for e in exc.errors(include_input=False):
            where = ".".join(str(x) for x in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"the goal policy{' ' + where if where else ''}: {msg}")
        return policy


def _fields(model: BaseModel) -> dict[str, Any]:
    # Not dict(model): that also yields cached properties kept in the instance's __dict__.
    return {name: getattr(model, name) for name in type(model).model_fields}


def _plan(
    current: PlannedPolicy,
    goal: PlannedPolicy,
    moves: list[Move],
    balance: Mapping[str, int],
    problems: list[str],
    unit: str,
) -> RebalancePlan:
    # A plan with problems moves nothing: half a goal is not a goal.
    return RebalancePlan(
        current=current,
        goal=current if problems else goal,
        moves=() if problems else tuple(moves),
        balance=FrozenDict(balance),
        problems=tuple(problems),
        unit=unit,
    )


def _count(counts: Mapping[K, int] | None, keys: Iterable[K]) -> int | None:
    return None if counts is None else sum(counts.get(k, 0) for k in keys)


def _repeated(names: Sequence[str]) -> list[str]:
    return sorted({n for n in names if names.count(n) > 1})


# -- hash ------------------------------------------------------------------------------------------


def _quotas(
    slots: int, weights: Mapping[str, Fraction], owned: Mapping[str, int]
) -> dict[str, int]:
    """Slots per shard proportional to weight, by largest remainder (each within 1 of exact)."""
    total = sum(weights.values())
    exact = {s: slots * w / total for s, w in weights.items()}
    quota = {s: math.floor(e) for s, e in exact.items()}
    left = slots - sum(quota.values())
    order = list(weights)
    # Among equal remainders the shard that owns more gets the extra slot, so a goal equal to
    # the current ownership (the uniform table, say) moves nothing.
    rank = sorted(order, key=lambda s: (quota[s] - exact[s], -owned.get(s, 0), order.index(s)))
    for s in rank[:left]:
        quota[s] += 1
    return quota


def _hash_problems(
    policy: HashPolicy,
    shards: Sequence[str],
    weights: Mapping[str, float],
    slot_counts: Mapping[int, int] | None,
) -> list[str]:
    problems = []
    if not policy.shards:
        problems.append("the policy names no shards yet; bind it to a topology first")
    elif not shards:
        problems.append("no shards are left to own the slots")
    if dups := _repeated(shards):
        problems.append(f"shard(s) {dups} are listed more than once")
    for name, weight in weights.items():
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            problems.append(f"the weight of {name!r} must be a number >= 0, got {weight!r}")
        elif name in policy.shards and name not in shards and weight > 0:
            problems.append(f"shard {name!r} is removed but still given weight {weight}")
        elif name not in shards and name not in policy.shards:
            problems.append(f"weights name unknown shard {name!r}; shards are {list(shards)}")
    given = [weights.get(s, 1.0) for s in dict.fromkeys(shards)]
    if shards and all(w == 0 for w in given if isinstance(w, (int, float))):
        problems.append("every weight is zero: some shard must own the slots")
    if (heavy := sum(1 for w in given if w != 0)) > policy.slots:
        problems.append(f"{heavy} shards have weight but there are only {policy.slots} slots")
    outside = sorted(s for s in slot_counts or () if not 0 <= s < policy.slots)
    if outside:
        problems.append(f"slot_counts name slot(s) outside 0..{policy.slots - 1}: {outside[:5]}")
    return problems


def plan_hash(
    policy: HashPolicy,
    *,
    shards: Sequence[str] | None = None,
    weights: Mapping[str, float] | None = None,
    slot_counts: Mapping[int, int] | None = None,
) -> RebalancePlan:
    """Re-divide the slots of a hash policy over ``shards`` (default: its own) by ``weights``.

    Each shard's quota is proportional to its weight (default 1; 0 drains it). A shard keeps
    the lowest of its slots up to its quota and gives away the rest from the end of its ranges;
    the freed slots go, in slot order, to the shards under quota in ``shards`` order. So the
    slots moved are the fewest possible, ``sum(max(0, owned - quota))``, in few ranges.
    ``slot_counts`` (records per slot) adds records per move and a record balance."""
    new = tuple(policy.shards if shards is None else shards)
    weights = dict(weights or {})
    problems = _hash_problems(policy, new, weights, slot_counts)
    owners = _owners(policy)
    after = list(owners)
    if not problems:
        owned = {s: owners.count(s) for s in policy.shards}
        quota = _quotas(policy.slots, {s: Fraction(weights.get(s, 1.0)) for s in new}, owned)
        kept, freed = dict.fromkeys(owners, 0), list[int]()
        for slot, shard in enumerate(owners):  # in slot order: the lowest slots are kept
            if kept[shard] < quota.get(shard, 0):  # a removed shard keeps nothing
                kept[shard] += 1
            else:
                freed.append(slot)
        takers = [s for s in new for _ in range(quota[s] - owned.get(s, 0))]
        for slot, taker in zip(freed, takers, strict=True):
            after[slot] = taker
    table = HashPolicy.table_from_owners(after)
    if problems or (
        len(new) <= policy.slots and after == _owners(HashPolicy(slots=policy.slots, shards=new))
    ):
        table = ()  # the uniform table over the new shards: stored as no table at all
    goal = _rebuilt(policy, problems, shards=new, table=table)
    moving: dict[tuple[str, str], list[int]] = {}
    for slot, (was, now) in enumerate(zip(owners, after, strict=True)):
        if was != now:
            moving.setdefault((was, now), []).append(slot)
    moves = [
        Move(source, target, slots=_ranges(mine), records=_count(slot_counts, mine))
        for (source, target), mine in moving.items()
    ]
    balance = dict.fromkeys(policy.shards if problems else new, 0)
    for slot, shard in enumerate(after):
        if shard:  # "" only when the policy names no shards (a problem already)
            balance[shard] += 1 if slot_counts is None else slot_counts.get(slot, 0)
    unit = "slots" if slot_counts is None else "records"
    return _plan(policy, goal, moves, balance, problems, unit)


def _owners(policy: HashPolicy) -> list[str]:
    """The owner of every slot, in slot order."""
    runs = sorted((lo, hi, s) for s, ranges in policy.owner_slots().items() for lo, hi in ranges)
    return [s for lo, hi, s in runs for _ in range(lo, hi)] or [""] * policy.slots


def _ranges(slots: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Sorted slots as ``[lo, hi)`` ranges of consecutive slots."""
    runs = (list(r) for _, r in itertools.groupby(enumerate(slots), key=lambda p: p[1] - p[0]))
    return tuple((run[0][1], run[-1][1] + 1) for run in runs)


# -- time ------------------------------------------------------------------------------------------


def plan_time(
    policy: TimePolicy,
    *,
    existing_buckets: Mapping[str, str],
    move: Mapping[str, str] = _NO_MOVES,
    hot: str | None = None,
    bucket_counts: Mapping[str, int] | None = None,
    known_shards: Sequence[str],
) -> RebalancePlan:
    """Move named time buckets (label -> new shard) and/or change the hot shard.

    ``existing_buckets`` maps each bucket that exists to the shard it is on. A new ``hot`` only
    changes where new buckets go: every existing bucket that is on the old hot shard by default
    (not in ``buckets``) and is not moved is pinned there in ``buckets``, so only the named
    buckets move. With explicit ``ranges``, moving a bucket rewrites its range's shard (a range
    with no bucket yet moves no records); there is no hot shard to change."""
    known = set(known_shards)
    names = {r.name for r in policy.ranges}
    problems = []
    for label in move:
        if label not in existing_buckets and label not in names:
            problems.append(f"unknown bucket {label!r}: it does not exist")
    for shard in dict.fromkeys([*move.values(), *([] if hot is None else [hot])]):
        if shard not in known:
            problems.append(f"unknown shard {shard!r}; shards are {sorted(known)}")
    if policy.ranges and hot is not None:
        problems.append("a policy with explicit ranges has no hot shard; move ranges by name")
    for label, shard in existing_buckets.items():
        placed = policy.shard_of(label) if not policy.ranges or label in names else shard
        if placed != shard:
            problems.append(
                f"bucket {label!r} is on shard {shard!r} but the policy places it on "
                f"{placed!r}; finish or repair that move first"
            )
    if policy.ranges:
        ranges = [
            r if r.name not in move else {**_fields(r), "shard": move[r.name]}
            for r in policy.ranges
        ]
        goal = _rebuilt(policy, problems, ranges=ranges)
    else:
        buckets = dict(policy.buckets)
        if hot is not None and hot != policy.hot:
            # Pinned first, then the moves: a moved bucket is never pinned.
            for label in existing_buckets:
                if label not in policy.buckets and label not in move:
                    buckets[label] = str(policy.hot)
        goal = _rebuilt(policy, problems, buckets={**buckets, **move}, hot=hot or policy.hot)
    moving: dict[tuple[str, str], list[str]] = {}
    for label, target in move.items():
        source = existing_buckets.get(label)
        if source is not None and source != target:
            moving.setdefault((source, target), []).append(label)
    moves = [
        Move(source, target, buckets=tuple(sorted(labels)), records=_count(bucket_counts, labels))
        for (source, target), labels in moving.items()
    ]
    balance = dict.fromkeys(sorted(known | set(existing_buckets.values())), 0)
    for label, shard in existing_buckets.items():
        where = shard if problems else move.get(label, shard)
        balance[where] += 1 if bucket_counts is None else bucket_counts.get(label, 0)
    unit = "buckets" if bucket_counts is None else "records"
    return _plan(policy, goal, moves, balance, problems, unit)


# -- field and composite ---------------------------------------------------------------------------


def plan_field(
    policy: FieldPolicy,
    *,
    move: Mapping[str, Sequence[str]],
    partition_counts: Mapping[str, int] | None = None,
    known_shards: Sequence[str],
) -> RebalancePlan:
    """Give partitions new shard lists (partition -> shards); a ``CompositePolicy`` as well.

    One move per partition whose shard tuple changes, ``source``/``target`` the old and new
    shards joined by commas. ``records`` is the whole partition's count: records are hashed
    over a partition's shards in order, so a changed list re-places records among all of them.
    The record balance splits a partition's count evenly over its shards (the hash does, on
    average). A single string is taken as a list of one shard."""
    known = set(known_shards)
    wanted = {p: (s,) if isinstance(s, str) else tuple(s) for p, s in move.items()}
    problems = []
    for partition, shards in wanted.items():
        if partition not in policy.partitions:
            problems.append(f"unknown partition {partition!r}; known: {sorted(policy.partitions)}")
        if not shards:
            problems.append(f"partition {partition!r} needs at least one shard")
        if dups := _repeated(shards):
            problems.append(f"partition {partition!r} lists shard(s) {dups} more than once")
        for shard in dict.fromkeys(shards):
            if shard not in known:
                problems.append(f"unknown shard {shard!r}; shards are {sorted(known)}")
    goal = _rebuilt(policy, problems, partitions={**policy.partitions, **wanted})
    moves = [
        Move(old, ",".join(shards), partitions=(p,), records=_count(partition_counts, [p]))
        for p, shards in wanted.items()
        if p in policy.partitions and shards != policy.partitions[p]
        for old in [",".join(policy.partitions[p])]
    ]
    final = policy.partitions if problems else goal.partitions
    balance = dict.fromkeys(sorted(known | policy.shards_named()), 0)
    for partition, shards in final.items():
        each, extra = (1, 0)
        if partition_counts is not None:
            each, extra = divmod(partition_counts.get(partition, 0), len(shards))
        for i, shard in enumerate(shards):
            balance[shard] += each + (1 if i < extra else 0)
    unit = "partitions" if partition_counts is None else "records"
    return _plan(policy, goal, moves, balance, problems, unit)
