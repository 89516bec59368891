"""Where a write is mirrored while a move fills a new generation (pure)."""

from __future__ import annotations

import pytest

from sharded_chroma import CompositePolicy, FieldPolicy, HashPolicy, RoutingError, TimePolicy
from sharded_chroma.ops._genmirror import READ_BACK, generation_split, placeable

OLD = FieldPolicy(field="region", partitions={"eu": ("s0",), "us": ("s1",)})
NEW = FieldPolicy(field="region", partitions={"eu": ("s0", "s2"), "us": ("s1",)})


def body(ids: list[str], regions: list[str] | None, **extra: object) -> dict[str, object]:
    out: dict[str, object] = {"ids": ids, **extra}
    if regions is not None:
        out["metadatas"] = [{"region": r, "_sc_ver": 7} for r in regions]
    return out


def test_a_rebuild_mirrors_the_whole_request_to_the_same_shard() -> None:
    sent = body(["a", "b"], ["eu", "us"])
    assert generation_split("update", "s0", sent, OLD, OLD) == ("update", {"s0": sent})
    assert generation_split("add", "s0", sent, OLD, OLD)[0] == "add"


def test_writes_that_make_records_are_mirrored_from_the_records_as_written() -> None:
    for op in ("add", "upsert"):
        assert generation_split(op, "s0", body(["a", "b"], ["eu", "us"]), OLD, NEW) == (
            READ_BACK,
            {},
        )


def test_under_hash_of_the_id_requests_are_split_by_id() -> None:
    old, new = HashPolicy(shards=("s0", "s1")), HashPolicy(shards=("s0", "s1", "s2"))
    ids = [f"r{i}" for i in range(60)]
    op, shares = generation_split("add", "s0", {"ids": ids}, old, new)
    assert op == "add"
    placed = {rid: shard for shard, share in shares.items() for rid in share["ids"]}  # type: ignore[union-attr]
    assert placed == {rid: new.place(rid, None).shard for rid in ids}
    assert len(set(placed.values())) == 3


def test_updates_of_other_keys_and_deletes_go_to_every_goal_shard() -> None:
    update = {"ids": ["a"], "metadatas": [{"colour": "red", "_sc_ver": 8}]}
    assert generation_split("update", "s0", update, OLD, NEW) == (
        "update",
        {"s0": update, "s1": update, "s2": update},
    )
    delete = {"ids": ["a"], "where": {"_sc_ver": 7}}
    assert set(generation_split("delete", "s0", delete, OLD, NEW)[1]) == {"s0", "s1", "s2"}
    by_filter = {"where": {"colour": "red"}}
    assert set(generation_split("delete", "s1", by_filter, OLD, NEW)[1]) == {"s0", "s1", "s2"}


def test_an_update_of_a_routing_field_is_mirrored_from_the_records_as_written() -> None:
    update = {"ids": ["a"], "metadatas": [{"region": "us", "_sc_ver": 9}]}
    assert generation_split("update", "s0", update, OLD, NEW) == (READ_BACK, {})
    composite_old = CompositePolicy(field="region", partitions=OLD.partitions, hash_key="user")
    composite_new = CompositePolicy(field="region", partitions=NEW.partitions, hash_key="user")
    by_user = {"ids": ["a"], "metadatas": [{"user": "u2", "_sc_ver": 9}]}
    assert generation_split("update", "s0", by_user, composite_old, composite_new)[0] == READ_BACK


def test_a_record_the_goal_cannot_place_is_refused_before_anything_is_sent() -> None:
    goal = FieldPolicy(field="region", partitions={"eu": ("s0",)})
    with pytest.raises(RoutingError):
        generation_split("upsert", "s1", body(["a"], ["us"]), OLD, goal)


def test_only_moves_keeping_the_routing_fields_go_through_a_generation() -> None:
    assert placeable(OLD, NEW) is None
    assert placeable(HashPolicy(field="region"), NEW) is None
    assert "routing fields" in str(placeable(HashPolicy(), NEW))
    by_user = FieldPolicy(field="user", partitions={"u1": ("s0",)})
    assert "routing fields" in str(placeable(OLD, by_user))
    assert "time buckets" in str(placeable(TimePolicy(field="ts", hot="s0"), NEW))
