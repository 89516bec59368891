"""The rebalance planner (``sharded_chroma.rebalance``): hash plans move the fewest slots and
reach their goal table, time plans move only the named buckets, field plans re-home the named
partitions, and every problem is reported at once. Pure, no servers."""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sharded_chroma import ConfigurationError
from sharded_chroma._policies import (
    CompositePolicy,
    FieldPolicy,
    HashPolicy,
    build_policy,
    policy_from_json,
    policy_to_json,
)
from sharded_chroma._routing import slot_for_key
from sharded_chroma.rebalance import (
    Move,
    RebalancePlan,
    plan_field,
    plan_hash,
    plan_time,
    raise_for_problems,
)

relaxed = settings(max_examples=200, deadline=None)
NAMES = tuple(f"s{i}" for i in range(6))
ADDED = ("n0", "n1", "n2")


def owners(policy: HashPolicy) -> list[str]:
    """The owner of every slot, checking each slot is owned exactly once."""
    out = [""] * policy.slots
    for shard, ranges in policy.owner_slots().items():
        for lo, hi in ranges:
            for slot in range(lo, hi):
                assert out[slot] == "", f"slot {slot} owned twice"
                out[slot] = shard
    assert "" not in out, "a slot has no owner"
    return out


@st.composite
def current_policies(draw: st.DrawFn) -> HashPolicy:
    """A uniform policy, or one with an arbitrary table (some shards may own nothing)."""
    shards = tuple(draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=5, unique=True)))
    slots = draw(st.integers(len(shards), 200))
    if draw(st.booleans()):
        return HashPolicy(shards=shards, slots=slots)
    per_slot = draw(st.lists(st.sampled_from(shards), min_size=slots, max_size=slots))
    return HashPolicy(shards=shards, slots=slots, table=HashPolicy.table_from_owners(per_slot))


@st.composite
def hash_goals(draw: st.DrawFn) -> tuple[HashPolicy, list[str], dict[str, float]]:
    """A current policy, a new shard list (some removed, some added) and valid weights."""
    policy = draw(current_policies())
    kept = [s for s in policy.shards if draw(st.booleans())] or [policy.shards[0]]
    new = kept + draw(st.lists(st.sampled_from(ADDED), max_size=3, unique=True))
    weight = st.sampled_from([0, 0.5, 1, 1, 2, 3, 0.1, 7.25])
    weights = {s: draw(weight) for s in new if draw(st.booleans())}
    heavy = [s for s in new if weights.get(s, 1) != 0]
    assume(heavy and len(heavy) <= policy.slots)
    return policy, new, weights


def check_plan(plan: RebalancePlan, new: list[str], weights: dict[str, float]) -> None:
    current, goal = plan.current, plan.goal
    assert isinstance(current, HashPolicy) and isinstance(goal, HashPolicy)
    assert plan.problems == () and goal.shards == tuple(new) and goal.slots == current.slots
    before, after = owners(current), owners(goal)  # every slot owned exactly once
    quota = Counter(after)
    assert dict(plan.balance) == {s: quota[s] for s in new} and plan.unit == "slots"
    # Each quota is within one slot of the exact proportional share.
    share = {s: Fraction(weights.get(s, 1)) for s in new}
    for s in new:
        assert abs(quota[s] - current.slots * share[s] / sum(share.values())) < 1
    # The slots moved are the fewest any plan with these quotas can move ...
    had = Counter(before)
    moved = sum(m.slot_count for m in plan.moves)
    assert moved == sum(max(0, had[s] - quota[s]) for s in had)
    # ... because every shard keeps what it had, up to its quota.
    for s in current.shards:
        kept = sum(1 for b, a in zip(before, after, strict=True) if b == a == s)
        assert kept == min(had[s], quota[s])
    # Applying the moves to the current table gives the goal table; the ranges are disjoint.
    applied, seen = list(before), set[int]()
    for m in plan.moves:
        assert m.source != m.target and m.slots and not m.buckets and not m.partitions
        for lo, hi in m.slots:
            assert lo < hi
            for slot in range(lo, hi):
                assert slot not in seen and applied[slot] == m.source
                seen.add(slot)
                applied[slot] = m.target
    assert applied == after
    assert policy_from_json(policy_to_json(goal)) == goal


@relaxed
@given(hash_goals())
def test_hash_plans_move_the_fewest_slots_and_reach_the_goal(
    case: tuple[HashPolicy, list[str], dict[str, float]],
) -> None:
    policy, new, weights = case
    check_plan(plan_hash(policy, shards=new, weights=weights), new, weights)


@relaxed
@given(hash_goals(), st.lists(st.text(max_size=10), max_size=30))
def test_only_records_in_moved_slots_change_place(
    case: tuple[HashPolicy, list[str], dict[str, float]], ids: list[str]
) -> None:
    policy, new, weights = case
    plan = plan_hash(policy, shards=new, weights=weights)
    moved = {s for m in plan.moves for lo, hi in m.slots for s in range(lo, hi)}
    for rid in ids:
        changed = plan.goal.place(rid, None) != policy.place(rid, None)
        assert changed == (slot_for_key(rid, policy.slots) in moved)


@relaxed
@given(hash_goals(), st.data())
def test_slot_counts_give_records_per_move_and_balance(
    case: tuple[HashPolicy, list[str], dict[str, float]], data: st.DataObject
) -> None:
    policy, new, weights = case
    counts = {s: data.draw(st.integers(0, 50)) for s in range(policy.slots)}
    plan = plan_hash(policy, shards=new, weights=weights, slot_counts=counts)
    assert plan.unit == "records" and sum(plan.balance.values()) == sum(counts.values())
    goal = plan.goal
    assert isinstance(goal, HashPolicy)
    for shard, n in plan.balance.items():
        assert n == sum(counts[s] for s in range(goal.slots) if goal.slot_owner(s) == shard)
    for m in plan.moves:
        assert m.records == sum(counts[s] for lo, hi in m.slots for s in range(lo, hi))


@relaxed
@given(current_policies())
def test_a_plan_to_the_same_weights_on_a_uniform_table_moves_nothing(policy: HashPolicy) -> None:
    plan = plan_hash(HashPolicy(shards=policy.shards, slots=policy.slots))
    assert plan.moves == () and plan.goal == plan.current and plan.goal.table == ()


@relaxed
@given(current_policies(), st.data())
def test_draining_a_shard_moves_exactly_its_slots(policy: HashPolicy, data: st.DataObject) -> None:
    drained = data.draw(st.sampled_from(policy.shards))
    had = Counter(owners(policy))
    assume(had[drained] < policy.slots)
    # The others weighted by what they own (a uniform table: equally), so none is over quota.
    weights: dict[str, float] = {s: had[s] for s in policy.shards}
    if not policy.table:
        weights = {}
    weights[drained] = 0
    plan = plan_hash(policy, weights=weights)
    check_plan(plan, list(policy.shards), weights)
    assert sum(m.slot_count for m in plan.moves) == had[drained]
    assert all(m.source == drained for m in plan.moves)
    assert plan.goal.owner_slots()[drained] == []  # type: ignore[union-attr]
    assert drained in plan.goal.shards_named()  # still listed, owning nothing, until removed


def test_growing_three_shards_to_four_moves_a_quarter_in_three_ranges() -> None:
    policy = HashPolicy(shards=("s0", "s1", "s2"))
    plan = plan_hash(
        policy, shards=["s0", "s1", "s2", "s3"], slot_counts=dict.fromkeys(range(4096), 2)
    )
    assert [(m.source, m.target, m.slots) for m in plan.moves] == [
        ("s0", "s3", ((1024, 1366),)),
        ("s1", "s3", ((2390, 2731),)),
        ("s2", "s3", ((3755, 4096),)),
    ]
    assert sum(m.slot_count for m in plan.moves) == 1024 == 4096 // 4
    assert [m.records for m in plan.moves] == [684, 682, 682]
    assert dict(plan.balance) == dict.fromkeys(("s0", "s1", "s2", "s3"), 2048)
    text = plan.describe()
    assert "3 move(s), 1024 of 4096 slots (25.0%), 2,048 records" in text
    assert "s0 -> s3: slots 1024-1365 (342 slots), 684 records" in text
    assert "balance after the plan (records per shard):" in text
    assert text.count("2,048   25.0%") == 4, text  # each shard holds a quarter


def test_removing_a_shard_hands_its_slots_to_its_neighbours() -> None:
    plan = plan_hash(HashPolicy(shards=("s0", "s1", "s2"), slots=12), shards=["s0", "s2"])
    assert [(m.source, m.target, m.slots) for m in plan.moves] == [
        ("s1", "s0", ((4, 6),)),
        ("s1", "s2", ((6, 8),)),
    ]
    assert plan.goal == HashPolicy(shards=("s0", "s2"), slots=12)  # uniform again: no table


def test_weights_divide_the_slots_by_largest_remainder() -> None:
    plan = plan_hash(HashPolicy(shards=("a", "b"), slots=10), weights={"a": 2, "b": 1})
    assert dict(plan.balance) == {"a": 7, "b": 3}  # exact 6.67 and 3.33
    # b keeps the lowest of its slots and gives away from the end of its range.
    assert plan.goal.table == ((0, "a"), (5, "b"), (8, "a"))  # type: ignore[union-attr]
    assert plan.moves == (Move("b", "a", slots=((8, 10),)),)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"weights": {"zz": 1}}, "weights name unknown shard 'zz'"),
        (
            {"shards": ["a", "b"], "weights": {"c": 1}},
            "shard 'c' is removed but still given weight",
        ),
        ({"weights": {"a": 0, "b": 0, "c": 0}}, "every weight is zero"),
        ({"weights": {"a": -1}}, "the weight of 'a' must be a number >= 0, got -1"),
        ({"weights": {"a": float("nan")}}, "the weight of 'a' must be a number >= 0"),
        ({"shards": ["a", "b", "c", "d", "e"]}, "5 shards have weight but there are only 4 slots"),
        ({"shards": ["a", "b", "a"]}, r"shard\(s\) \['a'\] are listed more than once"),
        ({"shards": []}, "no shards are left"),
        ({"slot_counts": {4: 1}}, r"slot_counts name slot\(s\) outside 0..3: \[4\]"),
    ],
)
def test_hash_problems_are_reported_not_raised(changes: dict[str, Any], problem: str) -> None:
    policy = HashPolicy(shards=("a", "b", "c"), slots=4)
    plan = plan_hash(policy, **changes)
    assert plan.goal == policy and plan.moves == ()
    assert any(re.search(problem, p) for p in plan.problems), plan.problems
    assert "problems:" in plan.describe() and "not planned" in plan.describe()
    with pytest.raises(ConfigurationError, match=problem):
        raise_for_problems(plan)


def test_every_problem_is_reported_at_once() -> None:
    plan = plan_hash(HashPolicy(shards=("a", "b")), shards=["a", "a"], weights={"x": 1, "b": 2})
    assert len(plan.problems) == 3
    with pytest.raises(ConfigurationError, match="3 problem"):
        raise_for_problems(plan)
    raise_for_problems(plan_hash(HashPolicy(shards=("a", "b"))))  # no problems: no error
    assert plan_hash(HashPolicy()).problems == (
        "the policy names no shards yet; bind it to a topology first",
    )


# -- time ------------------------------------------------------------------------------------------

DAYS = ("2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04")
T_SHARDS = ("h", "c", "n")


def day_policy(**config: Any) -> Any:
    return build_policy({"kind": "time", "field": "ts", "granularity": "day", **config})


def test_a_new_hot_shard_pins_the_old_buckets_and_moves_only_the_named() -> None:
    policy = day_policy(hot="h", buckets={DAYS[0]: "c"})
    existing = {DAYS[0]: "c", DAYS[1]: "h", DAYS[2]: "h", DAYS[3]: "h"}
    counts = {DAYS[0]: 5, DAYS[1]: 7, DAYS[2]: 9, DAYS[3]: 1}
    plan = plan_time(
        policy,
        existing_buckets=existing,
        move={DAYS[1]: "c", DAYS[3]: "c"},
        hot="n",
        bucket_counts=counts,
        known_shards=T_SHARDS,
    )
    assert plan.problems == ()
    assert plan.goal.hot == "n"  # type: ignore[union-attr]
    assert dict(plan.goal.buckets) == {DAYS[0]: "c", DAYS[1]: "c", DAYS[2]: "h", DAYS[3]: "c"}  # type: ignore[union-attr]
    assert plan.moves == (Move("h", "c", buckets=(DAYS[1], DAYS[3]), records=8),)
    assert dict(plan.balance) == {"c": 13, "h": 9, "n": 0} and plan.unit == "records"
    assert plan.goal.place("r", {"ts": "2026-02-01T00:00:00Z"}).shard == "n"  # new buckets
    text = plan.describe()
    assert "h -> c: bucket(s) 2026-01-02, 2026-01-04, 8 records" in text and "59.1%" in text


@relaxed
@given(st.data())
def test_time_plans_move_exactly_the_named_buckets(data: st.DataObject) -> None:
    mapped = data.draw(st.dictionaries(st.sampled_from(DAYS), st.sampled_from(T_SHARDS)))
    hot = data.draw(st.sampled_from(T_SHARDS))
    policy = day_policy(hot=hot, buckets=mapped)
    existing = {
        d: policy.shard_of(d) for d in data.draw(st.lists(st.sampled_from(DAYS), unique=True))
    }
    move = data.draw(
        st.dictionaries(st.sampled_from(sorted(existing) or ["x"]), st.sampled_from(T_SHARDS))
    )
    assume(all(label in existing for label in move))
    new_hot = data.draw(st.sampled_from([None, *T_SHARDS]))
    plan = plan_time(
        policy, existing_buckets=existing, move=move, hot=new_hot, known_shards=T_SHARDS
    )
    assert plan.problems == ()
    for label, shard in existing.items():
        assert plan.goal.shard_of(label) == move.get(label, shard)  # type: ignore[union-attr]
    moved = {b: m for m in plan.moves for b in m.buckets}
    assert moved.keys() == {b for b, t in move.items() if t != existing[b]}
    for label, m in moved.items():
        assert (m.source, m.target) == (existing[label], move[label]) and m.records is None
    assert len({(m.source, m.target) for m in plan.moves}) == len(plan.moves)  # one per pair
    assert sum(plan.balance.values()) == len(existing) and plan.unit == "buckets"


def test_time_problems() -> None:
    policy = day_policy(hot="h", buckets={DAYS[0]: "c"})
    plan = plan_time(
        policy,
        existing_buckets={DAYS[0]: "h", DAYS[1]: "h"},
        move={DAYS[2]: "c", DAYS[1]: "zz"},
        hot="yy",
        known_shards=T_SHARDS,
    )
    assert plan.goal == policy and plan.moves == ()
    assert plan.problems == (
        "unknown bucket '2026-01-03': it does not exist",
        "unknown shard 'zz'; shards are ['c', 'h', 'n']",
        "unknown shard 'yy'; shards are ['c', 'h', 'n']",
        "bucket '2026-01-01' is on shard 'h' but the policy places it on 'c'; "
        "finish or repair that move first",
    )


def test_time_ranges_move_by_rewriting_their_shard() -> None:
    spans = [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]
    ranges = [{"name": n, "start": lo, "end": hi, "shard": "s1"} for n, lo, hi in spans]
    policy = build_policy({"kind": "time", "field": "ts", "ranges": ranges})
    policy.ranges[0].interval  # cached on the model: must not leak into the goal  # noqa: B018
    plan = plan_time(
        policy,
        existing_buckets={"a": "s1", "b": "s1"},
        move={"a": "s2", "c": "s2"},
        known_shards=["s1", "s2"],
    )
    assert plan.problems == ()
    assert [r.shard for r in plan.goal.ranges] == ["s2", "s1", "s2"]  # type: ignore[union-attr]
    assert plan.moves == (Move("s1", "s2", buckets=("a",)),)  # "c" has no bucket yet: no records
    hot = plan_time(policy, existing_buckets={}, hot="s2", known_shards=["s1", "s2"])
    assert hot.problems == ("a policy with explicit ranges has no hot shard; move ranges by name",)


# -- field and composite ---------------------------------------------------------------------------

REGIONS: dict[str, Any] = {"field": "region", "partitions": {"eu": ("s1",), "us": ("s2", "s3")}}
F_SHARDS = ("s1", "s2", "s3", "s4")


@pytest.mark.parametrize(
    "policy", [FieldPolicy(**REGIONS), CompositePolicy(**REGIONS, hash_key="t")]
)
def test_field_plans_reassign_the_named_partitions(policy: FieldPolicy) -> None:
    plan = plan_field(
        policy,
        move={"eu": ["s1", "s4"], "us": ("s2", "s3")},  # "us" unchanged: no move
        partition_counts={"eu": 11, "us": 4},
        known_shards=F_SHARDS,
    )
    assert plan.problems == () and type(plan.goal) is type(policy)
    assert plan.goal == policy.model_copy(
        update={"partitions": {"eu": ("s1", "s4"), "us": ("s2", "s3")}}
    )
    assert plan.moves == (Move("s1", "s1,s4", partitions=("eu",), records=11),)
    assert dict(plan.balance) == {"s1": 6, "s2": 2, "s3": 2, "s4": 5}
    assert "s1 -> s1,s4: partition(s) eu, 11 records" in plan.describe()
    single = plan_field(policy, move={"us": "s4"}, known_shards=F_SHARDS)  # one shard, as a string
    assert single.goal.partitions["us"] == ("s4",)  # type: ignore[union-attr]
    assert (
        dict(single.balance) == {"s1": 1, "s2": 0, "s3": 0, "s4": 1} and single.unit == "partitions"
    )


def test_field_problems() -> None:
    policy = FieldPolicy(**REGIONS, slots=2)
    plan = plan_field(
        policy, move={"xx": ["s1"], "eu": [], "us": ["s2", "s2", "q"]}, known_shards=F_SHARDS
    )
    assert plan.goal == policy and plan.moves == ()
    assert plan.problems == (
        "unknown partition 'xx'; known: ['eu', 'us']",
        "partition 'eu' needs at least one shard",
        "partition 'us' lists shard(s) ['s2'] more than once",
        "unknown shard 'q'; shards are ['s1', 's2', 's3', 's4']",
    )
    # What only the policy itself checks comes back as a problem too.
    wide = plan_field(policy, move={"eu": ["s1", "s2", "s3"]}, known_shards=F_SHARDS)
    assert wide.problems == ("the goal policy: partition 'eu' has more shards than slots",)
