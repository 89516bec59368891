"""Regression tests of the review of online rebalancing: the marks each phase writes, a scan
left early, abort once the map left dual, and an abort that stopped half-way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import sharded_chroma
from sharded_chroma import ConfigurationError, HashPolicy
from sharded_chroma.control._maps import INCOMING_KEY, OUTGOING_KEY, PartitionMap
from sharded_chroma.ops._migrating import split_write
from sharded_chroma.rebalance import plan_hash
from tests._rebalancing import owners_of, topology_for
from tests.test_concurrent_writes import NAME

THREE = ("s0", "s1", "s2")
OLD = HashPolicy(shards=THREE)
NEW = plan_hash(OLD, weights={"s0": 1, "s1": 1, "s2": 2}).goal


def moving_id() -> str:
    """An id the reweighting moves from s0 to s2."""
    return next(
        f"r{i}"
        for i in range(10_000)
        if OLD.place(f"r{i}", None).shard == "s0" and NEW.place(f"r{i}", None).shard == "s2"
    )


def body_of(rid: str) -> dict[str, Any]:
    return {"ids": [rid], "embeddings": [[1.0, 0, 0]], "metadatas": [{"k": 1}], "documents": None}


@pytest.mark.parametrize(
    ("phase", "policy", "other", "own_shard", "other_shard", "own_mark", "copy_mark"),
    [
        ("dual", OLD, NEW, "s0", "s2", OUTGOING_KEY, INCOMING_KEY),
        # The new place is marked incoming in cutover too: a reader still in dual hides it.
        ("cutover", NEW, OLD, "s2", "s0", INCOMING_KEY, OUTGOING_KEY),
    ],
)
def test_each_mirrored_phase_marks_both_places(
    phase: str,
    policy: Any,
    other: Any,
    own_shard: str,
    other_shard: str,
    own_mark: str,
    copy_mark: str,
) -> None:
    served = PartitionMap(epoch=2, policy=policy, other=other, phase=phase, tag="t1")
    rid = moving_id()
    own, mirrors = split_write("add", own_shard, body_of(rid), served)
    assert set(mirrors) == {other_shard}
    assert own["metadatas"] == [{"k": 1, own_mark: "t1"}]
    assert mirrors[other_shard]["metadatas"] == [{"k": 1, copy_mark: "t1"}]
    # A dual reader hides incoming copies, a cutover reader outgoing ones: each sees one.
    dual = PartitionMap(epoch=1, policy=OLD, other=NEW, phase="dual", tag="t1").read_filter()
    late = PartitionMap(epoch=2, policy=NEW, other=OLD, phase="cutover", tag="t1").read_filter()
    assert dual == {INCOMING_KEY: {"$ne": "t1"}} and late == {OUTGOING_KEY: {"$ne": "t1"}}
    for view in (own["metadatas"][0], mirrors[other_shard]["metadatas"][0]):
        assert (view.get(INCOMING_KEY) == "t1") != (view.get(OUTGOING_KEY) == "t1")


def test_only_the_parts_that_can_hold_hidden_copies_are_read_with_the_filter() -> None:
    """s0 and s1 give slots to s2: incoming copies land on s2 only, outgoing marks on s0 and
    s1 only, so each phase filters those parts and reads the others as they are."""
    dual = PartitionMap(epoch=2, policy=OLD, other=NEW, phase="dual", tag="t1")
    cutover = PartitionMap(epoch=3, policy=NEW, other=OLD, phase="cutover", tag="t1")
    cleanup = PartitionMap(epoch=4, policy=NEW, other=OLD, phase="cleanup", tag="t1")
    aborting = PartitionMap(epoch=3, policy=OLD, other=NEW, phase="aborting", tag="t1")
    for served, hiding in ((dual, {"s2"}), (aborting, {"s2"}), (cutover, {"s0", "s1"})):
        assert {s for s in THREE if served.hides_on(s)} == hiding, served.phase
    assert {s for s in THREE if cleanup.hides_on(s)} == {"s0", "s1"}
    stable = PartitionMap(epoch=5, policy=NEW)
    assert not any(stable.hides_on(s) for s in THREE)
    # Where a mark can land, it does: a mirrored write of a moving record marks both places.
    rid = moving_id()
    own, mirrors = split_write("add", "s0", body_of(rid), dual)
    assert own["metadatas"][0][OUTGOING_KEY] == "t1" and set(mirrors) == {"s2"}


def test_an_aborting_map_mirrors_nothing_and_hides_the_copies() -> None:
    served = PartitionMap(epoch=3, policy=OLD, other=NEW, phase="aborting", tag="t1")
    assert served.mirror_policy() is None
    assert served.read_filter() == {INCOMING_KEY: {"$ne": "t1"}}


async def client_of(topology: dict[str, Any]) -> Any:
    return await sharded_chroma.AsyncHttpClient(topology=sharded_chroma.Topology.build(topology))


async def loaded(client: Any, n: int = 60) -> Any:
    col = await client.create_collection(NAME, embedding_function=None, policy=OLD)
    ids = [f"r{i}" for i in range(n)]
    await col.add(ids=ids, embeddings=[[float(i), 1.0, 0.0] for i in range(n)])
    return col


class Stop(Exception):
    """Raised from a progress hook: the run stops right after that step's map swap."""


def stop_at(step: str) -> Any:
    def progress(name: str, n: int) -> None:
        if name == step:
            raise Stop(step)

    return progress


@pytest.mark.anyio
async def test_a_scan_left_early_does_not_hold_the_next_epoch(
    shard_urls: list[str], tmp_path: Path
) -> None:
    control = {"backend": "sqlite", "path": str(tmp_path / "c.db"), "ack_timeout": 15.0}
    async with await client_of(topology_for(shard_urls, control)) as client:
        col = await loaded(client)
        async for _page in col.scan(batch_size=10):
            break
        report = await client.rebalance(NAME, NEW, batch=20)
        assert report.steps[-1] == "done"


@pytest.mark.anyio
async def test_abort_is_refused_once_the_map_is_stable_under_the_goal(
    shard_urls: list[str], tmp_path: Path
) -> None:
    topology = topology_for(shard_urls, {"backend": "sqlite", "path": str(tmp_path / "c.db")})
    async with await client_of(topology) as client:
        col = await loaded(client)
        with pytest.raises(Stop):
            await client.rebalance(NAME, NEW, batch=20, progress=stop_at("stable"))
        assert (await client.partition_map(NAME)).policy == NEW
        with pytest.raises(ConfigurationError, match="has cut over"):
            await client.abort_rebalance(NAME)
        report = await client.rebalance(NAME)
        assert report.steps[-1] == "done" and report.resumed_at == "cleanup"
        assert await col.count() == 60
        owners = await owners_of(shard_urls, str(col.id))
        assert all(NEW.place(rid, None).shard == s for s, ids in owners.items() for rid in ids)


@pytest.mark.anyio
async def test_an_abort_stopped_half_way_is_finished_by_abort_only(
    shard_urls: list[str], tmp_path: Path
) -> None:
    topology = topology_for(shard_urls, {"backend": "sqlite", "path": str(tmp_path / "c.db")})
    async with await client_of(topology) as client:
        col = await loaded(client)
        with pytest.raises(Stop):
            await client.rebalance(NAME, NEW, batch=20, progress=stop_at("verify"))
        rebalancing = client._live().rebalancing
        with pytest.raises(Stop):
            await rebalancing.abort(NAME, progress=stop_at("aborting"))
        with pytest.raises(ConfigurationError, match=r"abort .* is under way"):
            await client.rebalance(NAME)
        # Meanwhile reads are exact: the copies stay hidden while the abort is unfinished.
        listed = (await col.get(include=[]))["ids"]
        assert await col.count() == len(listed) == len(set(listed)) == 60
        report = await client.abort_rebalance(NAME)
        assert report.steps[-1] == "aborted"
        current = await client.partition_map(NAME)
        assert current.phase == "stable" and current.policy == OLD
        owners = await owners_of(shard_urls, str(col.id))
        assert all(OLD.place(rid, None).shard == s for s, ids in owners.items() for rid in ids)
        assert sum(len(ids) for ids in owners.values()) == 60


@pytest.mark.anyio
async def test_the_report_counts_every_copied_record_when_sources_copy_at_once(
    shard_urls: list[str], tmp_path: Path
) -> None:
    topology = topology_for(shard_urls, {"backend": "sqlite", "path": str(tmp_path / "c.db")})
    async with await client_of(topology) as client:
        await loaded(client, 300)
        moving = [
            f"r{i}"
            for i in range(300)
            if OLD.place(f"r{i}", None).shard != NEW.place(f"r{i}", None).shard
        ]
        sources = {OLD.place(r, None).shard for r in moving}
        assert len(sources) >= 2
        report = await client.rebalance(NAME, NEW, batch=20, concurrency=3)
        assert report.steps[-1] == "done"
        assert report.copied == len(moving)
