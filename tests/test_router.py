"""The router and the part layouts without servers: placement groups, read plans, pruning and
direct bucket addressing (a plan that needs no listing sends no request)."""

from __future__ import annotations

import uuid

import pytest

from sharded_chroma import FieldPolicy, HashPolicy, TimePolicy, Topology
from sharded_chroma.catalog._layouts import PartLayouts, parts_database
from sharded_chroma.catalog._physical import PhysicalIds
from sharded_chroma.catalog._state import CollectionState, StateCache
from sharded_chroma.cluster._cluster import Cluster
from sharded_chroma.ops._router import Router

pytestmark = pytest.mark.anyio

# Nothing listens here: any request a plan made would fail the test with a connection error.
URLS = ["http://127.0.0.1:9", "http://127.0.0.1:10", "http://127.0.0.1:11"]


def router_for(policy: object) -> tuple[Router, CollectionState]:
    topology = Topology.from_urls(URLS)
    states = StateCache()
    physical = PhysicalIds(URLS[0], states)
    cluster = Cluster(topology, physical.replay_path)
    layouts = PartLayouts(cluster, physical)
    state = CollectionState(
        id=uuid.uuid4(),
        name="c",
        tenant="t",
        database="d",
        physical={},
        policy=topology.bind(policy),
    )
    return Router(cluster.shard_names, layouts), state


async def test_hash_plan_with_ids_asks_only_their_owners() -> None:
    router, state = router_for(HashPolicy())
    ids = [f"id{i}" for i in range(40)]
    owners = {p.shard for p in router.place_records(state, ids, None)}
    plan = await router.plan(state, ids, None)
    assert set(plan.targets) == owners
    for shard, target in plan.targets.items():
        assert target.ids is not None
        assert all(router.place_records(state, [i], None)[0].shard == shard for i in target.ids)
    assert set(plan.skipped) == set(router.shard_names) - owners
    assert router.ids_routed(state)


async def test_field_plan_prunes_to_the_partition_and_groups_writes() -> None:
    router, state = router_for(
        FieldPolicy(field="region", partitions={"eu": ["s0"], "us": ["s1"], "ap": ["s2"]})
    )
    assert not router.ids_routed(state)
    plan = await router.plan(state, None, {"region": {"$in": ["eu", "ap"]}})
    assert sorted(plan.targets) == ["s0", "s2"] and plan.skipped == ("s1",)
    groups, parts = router.group_placements(
        state,
        router.place_records(
            state, ["a", "b", "c"], [{"region": "us"}, {"region": "eu"}, {"region": "us"}]
        ),
    )
    assert groups == {"s0": [1], "s1": [0, 2]}
    assert {k: p.shard for k, p in parts.items()} == {"s0": "s0", "s1": "s1"}


async def test_bounded_time_filter_names_its_buckets_without_listing() -> None:
    router, state = router_for(
        TimePolicy(field="ts", granularity="day", hot="s2", buckets={"2026-11-25": "s0"})
    )
    where = {"$and": [{"ts": {"$gte": 1795564800}}, {"ts": {"$lt": 1795737600}}]}
    plan = await router.plan(state, None, where, direct=True)  # 2026-11-25 and -26
    assert sorted(plan.targets) == ["s0/2026-11-25", "s2/2026-11-26"]
    bucket = plan.targets["s0/2026-11-25"].state
    assert bucket.database == parts_database("d") and bucket.name == f"{state.id}-2026-11-25"
    assert bucket.id == uuid.uuid5(state.id, "2026-11-25")
    assert set(plan.skipped) == {"s1"}
    # The same label always maps to the same state object: physical ids are learnt once.
    again = await router.plan(state, None, where, direct=True)
    assert again.targets["s0/2026-11-25"].state is bucket
