"""Explicit slot tables in ``HashPolicy``: a table-less policy places exactly as before, a table
places, prunes and round-trips by its owners, and a malformed table is refused. No servers."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharded_chroma._errors import ConfigurationError
from sharded_chroma._policies import HashPolicy, build_policy, policy_from_json, policy_to_json
from sharded_chroma._routing import slot_for_key, uniform_table

relaxed = settings(max_examples=150, deadline=None)
NAMES = ("a", "b", "c", "d", "e")
keys = st.lists(st.text(max_size=12), max_size=40)


@st.composite
def tabled(draw: st.DrawFn) -> HashPolicy:
    """A hash policy with an arbitrary table: every slot drawn an owner among some shards."""
    shards = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=5, unique=True))
    slots = draw(st.integers(1, 64))
    owners = draw(st.lists(st.sampled_from(shards), min_size=slots, max_size=slots))
    field = draw(st.sampled_from([None, "tenant"]))
    table = HashPolicy.table_from_owners(owners)
    return HashPolicy(field=field, slots=slots, shards=tuple(shards), table=table)


def expand(policy: HashPolicy) -> list[str]:
    """The owner of every slot, read from ``owner_slots``."""
    owners = [""] * policy.slots
    for shard, ranges in policy.owner_slots().items():
        for lo, hi in ranges:
            for slot in range(lo, hi):
                assert owners[slot] == "", f"slot {slot} owned twice"
                owners[slot] = shard
    return owners


@relaxed
@given(st.integers(1, 6), st.integers(1, 300), keys)
def test_a_table_less_policy_places_as_the_uniform_table(
    n: int, extra: int, ids: list[str]
) -> None:
    shards = tuple(f"s{i}" for i in range(n))
    slots = n + extra - 1
    policy = HashPolicy(shards=shards, slots=slots)
    uniform = uniform_table(n, slots)
    expected = [shards[uniform.shard_for_key(k)] for k in ids]
    assert [policy.place(k, None).shard for k in ids] == expected
    assert [p.shard for p in policy.place_all(ids, None)] == expected
    assert expand(policy) == [shards[o] for o in uniform.owners]
    assert [policy.slot_owner(s) for s in range(slots)] == [shards[o] for o in uniform.owners]
    # The same ownership written out as a table places every key the same way.
    explicit = HashPolicy(
        shards=shards, slots=slots, table=HashPolicy.table_from_owners(expand(policy))
    )
    assert [p.shard for p in explicit.place_all(ids, None)] == expected


def test_table_less_json_is_unchanged() -> None:
    policy = HashPolicy(field="tenant", shards=("a", "b"), slots=16)
    text = '{"kind":"hash","field":"tenant","slots":16,"shards":["a","b"]}'
    assert policy_to_json(policy) == text
    assert "table" not in policy.model_dump()
    assert policy_from_json(text) == policy
    assert policy_to_json(policy_from_json(text)) == text


def test_json_round_trip_with_a_table() -> None:
    policy = HashPolicy(shards=("a", "b", "c"), slots=16, table=((0, "b"), (5, "a"), (9, "b")))
    text = policy_to_json(policy)
    assert '"table":[[0,"b"],[5,"a"],[9,"b"]]' in text
    back = policy_from_json(text)
    assert back == policy and back.table == policy.table
    assert policy_to_json(back) == text
    # As written in a topology file: lists, not tuples.
    table = [[0, "b"], [5, "a"], [9, "b"]]
    assert (
        build_policy({"kind": "hash", "shards": ["a", "b", "c"], "slots": 16, "table": table})
        == policy
    )


@relaxed
@given(tabled())
def test_round_trip_of_random_tables(policy: HashPolicy) -> None:
    assert policy_from_json(policy_to_json(policy)) == policy


@relaxed
@given(tabled(), keys)
def test_place_all_agrees_with_place_and_the_table(policy: HashPolicy, ids: list[str]) -> None:
    metadatas = [{"tenant": k} for k in ids]
    one = [policy.place(k, m).shard for k, m in zip(ids, metadatas, strict=True)]
    assert [p.shard for p in policy.place_all(ids, metadatas)] == one
    assert one == [policy.slot_owner(slot_for_key(k, policy.slots)) for k in ids]


@relaxed
@given(tabled())
def test_owner_slots_cover_every_slot_once_and_rebuild_the_table(policy: HashPolicy) -> None:
    owners = expand(policy)
    assert "" not in owners
    assert set(policy.owner_slots()) == set(policy.shards)
    assert owners == [policy.slot_owner(s) for s in range(policy.slots)]
    assert HashPolicy.table_from_owners(owners) == policy.table
    assert policy.shards_named() == frozenset(policy.shards)


@relaxed
@given(tabled(), st.lists(st.text(max_size=8), min_size=1, max_size=5))
def test_scope_of_a_hashed_field_names_the_table_owner(
    policy: HashPolicy, values: list[str]
) -> None:
    policy = policy.model_copy(update={"field": "tenant"})
    owner = {v: policy.place("r", {"tenant": v}).shard for v in values}
    assert policy.scope({"tenant": values[0]}).shards == {owner[values[0]]}
    assert policy.scope({"tenant": {"$eq": values[0]}}).shards == {owner[values[0]]}
    assert policy.scope({"tenant": {"$in": values}}).shards == set(owner.values())
    assert policy.scope({"tenant": {"$ne": values[0]}}).shards is None


def test_a_shard_may_own_no_slot_and_outnumber_the_slots() -> None:
    policy = HashPolicy(shards=("a", "b", "c"), slots=2, table=((0, "c"), (1, "a")))
    assert policy.owner_slots() == {"a": [(1, 2)], "b": [], "c": [(0, 1)]}
    assert {policy.place(f"k{i}", None).shard for i in range(50)} == {"a", "c"}
    with pytest.raises(ConfigurationError, match="at least the shard count"):
        build_policy({"kind": "hash", "shards": ["a", "b", "c"], "slots": 2})


def test_slot_owner_refuses_a_slot_outside_the_space() -> None:
    policy = HashPolicy(shards=("a",), slots=4)
    for slot in (-1, 4):
        with pytest.raises(ValueError, match=r"outside 0\.\.3"):
            policy.slot_owner(slot)


@pytest.mark.parametrize(
    ("table", "shards", "match"),
    [
        ([[1, "a"]], ["a", "b"], "must start at slot 0, not 1"),
        ([[-1, "a"]], ["a", "b"], "must start at slot 0, not -1"),
        ([[0, "a"], [0, "b"]], ["a", "b"], "starts must increase: 0 follows 0"),
        ([[0, "a"], [5, "b"], [3, "a"]], ["a", "b"], "starts must increase: 3 follows 5"),
        ([[0, "a"], [3, "a"]], ["a", "b"], "runs at 0 and 3 both name 'a'; join them"),
        ([[0, "a"], [16, "b"]], ["a", "b"], "start 16 is not below 16"),
        ([[0, "a"], [4, "x"]], ["a", "b"], r"names shard\(s\) \['x'\] that are not in shards"),
        ([[0, "a"]], [], "needs the shards it names"),
        ([[0]], ["a"], "table"),
    ],
)
def test_malformed_tables_are_refused(table: Any, shards: list[str], match: str) -> None:
    config = {"kind": "hash", "slots": 16, "shards": shards, "table": table}
    with pytest.raises(ConfigurationError, match=match):
        build_policy(config)
    with pytest.raises(ConfigurationError, match=match):
        policy_from_json(orjson.dumps(config).decode())  # as stored with a collection


def test_table_from_owners_is_normalized() -> None:
    assert HashPolicy.table_from_owners(["a", "a", "b", "b", "a"]) == ((0, "a"), (2, "b"), (4, "a"))
    assert HashPolicy.table_from_owners(["a"]) == ((0, "a"),)
    assert HashPolicy.table_from_owners([]) == ()
