"""Online rebalancing against real Chroma servers and a real control store, while two writer
processes add, upsert, update, delete, get and query the same ids throughout; judged by the
history checker afterwards."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest

import sharded_chroma
from sharded_chroma import ConfigurationError, ControlStoreError, HashPolicy
from sharded_chroma.rebalance import plan_hash, plan_time
from sharded_chroma.testing._etcd import LocalEtcd
from tests._history import Op, Value, check
from tests._rebalancing import (
    gathered_with_reads,
    owners_of,
    topology_for,
    writer_process,
)
from tests.test_concurrent_writes import (
    DAY,
    NAME,
    POLICIES,
    REPAIR_AFTER,
    T0,
    Log,
    assert_busy,
    pool_of,
    raw_parts,
    seen,
    stop_children,
    summary,
)

pytestmark = pytest.mark.anyio

IDS = 120
THREE = ("s0", "s1", "s2")


@pytest.fixture
def four_urls(shard_urls: list[str], oracle_url: str) -> list[str]:
    """Four wiped servers: the three shards, then the oracle's server as the fourth."""
    return [*shard_urls, oracle_url]


def control_table(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    if kind == "sqlite":
        return {"backend": "sqlite", "path": str(tmp_path / "control.sqlite3")}
    etcd: LocalEtcd = request.getfixturevalue("etcd")
    return {
        "backend": "etcd",
        "endpoints": [etcd.endpoint],
        "namespace": f"/{tmp_path.name}/",
    }


async def client_of(topology: dict[str, Any]) -> Any:
    return await sharded_chroma.AsyncHttpClient(topology=sharded_chroma.Topology.build(topology))


def preloaded(rid: str) -> dict[str, Any]:
    """A record's first metadata: every policy's routing fields (the time spread over four
    days, as the writers' are)."""
    n = int(rid[2:])
    return {"w": f"pre-{rid}", "region": "eu", "user": f"u{n % 4}", "ts": T0 + (n % 4) * DAY}


async def preload(col: Any, log: Log, ids: int) -> None:
    """Every id of the pool written once (logged, so the checker knows the values)."""
    pool = pool_of(ids)
    for start in range(0, len(pool), 40):
        chunk = tuple(pool[start : start + 40])
        values = tuple(Value(preloaded(rid), f"pre-{rid}") for rid in chunk)
        record = {
            "ids": list(chunk),
            "embeddings": [[0.1 * (i % 7), 0.2, 0.3] for i in range(len(chunk))],
            "metadatas": [dict(v.metadata) for v in values],
            "documents": [v.document for v in values],
        }

        async def call(record: dict[str, Any] = record) -> None:
            await col.upsert(**record)

        await log.write("upsert", chunk, values, call)


def run_migration_under_writers(
    urls: list[str],
    topology: dict[str, Any],
    tmp_path: Path,
    start: Any,
    goal_of: Any,
    seconds: float,
    act: Any = None,
) -> tuple[Any, Any, list[Op], list[str], list[str]]:
    """Create the collection with policy ``start``, preload it, start two writer processes,
    migrate to ``goal_of(policy)`` meanwhile (or run ``act(client, goal)`` instead); return
    the report, goal and what was recorded."""
    main_log = Log()

    async def create() -> Any:
        async with await client_of(topology) as client:
            col = await client.create_collection(NAME, embedding_function=None, policy=start)
            await preload(col, main_log, IDS)
            return col.id

    asyncio.run(create())
    ctx = multiprocessing.get_context("spawn")
    gate = ctx.Barrier(3)
    stop = ctx.Event()
    outs = [tmp_path / f"w{n}.pickle" for n in range(2)]
    procs = [
        ctx.Process(
            target=writer_process,
            args=(topology, f"p{n}-", IDS, seconds, str(outs[n]), gate, stop),
        )
        for n in range(2)
    ]
    for proc in procs:
        proc.start()

    async def migrate() -> tuple[Any, Any, float, float]:
        async with await client_of(topology) as client:
            policy = (await client.partition_map(NAME)).policy
            goal = goal_of(policy)
            await asyncio.to_thread(gate.wait, 120)
            await asyncio.sleep(1.0)
            began = time.monotonic()
            if act is None:
                report = await client.rebalance(NAME, goal, batch=25, concurrency=2)
            else:
                report = await act(client, goal)
            ended = time.monotonic()
            # The writers go on a little under the final map, then stop.
            await asyncio.sleep(2.0)
            stop.set()
            return report, goal, began, ended

    try:
        report, goal, began, ended = asyncio.run(migrate())
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=seconds + 60)
        stop_children(procs)
    assert [p.exitcode for p in procs] == [0, 0]
    ops, errors, dupes = gathered_with_reads(outs)
    writes = [op for op in ops if op.kind != "get"]
    # The migration ran while the writers wrote: some writes began before it and some ended
    # after it (otherwise this test would prove nothing about writes during a move).
    assert min(op.start for op in writes) < began
    assert max(op.end for op in writes) > ended, "the writers stopped before the migration ended"
    return report, goal, main_log.ops + ops, errors, dupes


def final_checks(
    urls: list[str], topology: dict[str, Any], goal: Any, ops: list[Op], errors: list[str]
) -> None:
    async def final() -> tuple[list[str], dict[str, list[str]], Any, int, Any]:
        async with await client_of(topology) as client:
            col = await client.get_collection(NAME, embedding_function=None)
            await asyncio.sleep(REPAIR_AFTER)
            got = seen(await col.get(include=["metadatas", "documents"]))
            parts = await raw_parts(urls, str(col.id))
            owners = await owners_of(urls, str(col.id))
            current = await client.partition_map(NAME)
            return check(ops, got, parts), owners, current, await col.count(), got

    found, owners, current, count, got = asyncio.run(final())
    distinct = len({rid for rid, _ in got})
    meta = {rid: dict(value.metadata) for rid, value in got}
    assert not found, f"{len(found)} violations:\n" + "\n".join(found[:15]) + summary(ops, errors)
    assert count == distinct
    assert current.phase == "stable" and current.policy == goal
    # Every record lives exactly where the goal puts it, so the balance is the plan's.
    misplaced = [
        (rid, shard)
        for shard, ids in owners.items()
        for rid in ids
        if goal.place(rid, meta[rid]).shard != shard
    ]
    assert not misplaced, f"records left off their goal shard: {misplaced[:10]}"


@pytest.mark.parametrize("kind", ["sqlite", "etcd"])
def test_grow_three_to_four_under_two_writer_processes(
    four_urls: list[str], tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    topology = topology_for(four_urls, control_table(kind, tmp_path, request))

    def grow(policy: Any) -> Any:
        return plan_hash(policy, shards=[*policy.shards, "s3"]).goal

    report, goal, ops, errors, dupes = run_migration_under_writers(
        four_urls, topology, tmp_path, HashPolicy(shards=THREE), grow, seconds=120.0
    )
    assert report.steps[-1] == "done", report
    assert report.copied > 0
    assert not dupes, dupes[:5]
    assert_busy(ops, errors)
    final_checks(four_urls, topology, goal, ops, errors)


def test_shrink_four_to_three_under_two_writer_processes(
    four_urls: list[str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    topology = topology_for(four_urls, control_table("sqlite", tmp_path, request))

    def drain(policy: Any) -> Any:
        return plan_hash(policy, shards=list(THREE)).goal

    report, goal, ops, errors, dupes = run_migration_under_writers(
        four_urls, topology, tmp_path, HashPolicy(shards=(*THREE, "s3")), drain, seconds=120.0
    )
    assert report.steps[-1] == "done", report
    assert "s3" not in {s for s, _ in goal.owner_slots().items() if _}
    assert not dupes, dupes[:5]
    final_checks(four_urls, topology, goal, ops, errors)


def test_move_time_buckets_and_the_hot_shard_under_two_writer_processes(
    four_urls: list[str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Day 0's bucket moves s0 -> s3, and the hot shard moves s2 -> s3 taking day 2's bucket
    with it (day 3's stays on s2, pinned), while the writers move records between days."""
    topology = topology_for(four_urls, control_table("sqlite", tmp_path, request))
    days = ["2025-11-26", "2025-11-27", "2025-11-28", "2025-11-29"]

    def move(policy: Any) -> Any:
        existing = {days[0]: "s0", days[1]: "s1", days[2]: "s2", days[3]: "s2"}
        plan = plan_time(
            policy,
            existing_buckets=existing,
            move={days[0]: "s3", days[2]: "s3"},
            hot="s3",
            known_shards=[*THREE, "s3"],
        )
        assert not plan.problems, plan.problems
        return plan.goal

    report, goal, ops, errors, dupes = run_migration_under_writers(
        four_urls, topology, tmp_path, POLICIES["time"], move, seconds=120.0
    )
    assert report.steps[-1] == "done", report
    assert goal.shard_of(days[0]) == goal.shard_of(days[2]) == "s3"
    assert goal.shard_of(days[3]) == "s2"
    assert not dupes, dupes[:5]
    assert_busy(ops, errors)
    final_checks(four_urls, topology, goal, ops, errors)


async def test_a_second_migrator_is_refused(four_urls: list[str], tmp_path: Path) -> None:
    topology = topology_for(four_urls, {"backend": "sqlite", "path": str(tmp_path / "c.db")})
    async with await client_of(topology) as client:
        col = await client.create_collection(
            NAME, embedding_function=None, policy=HashPolicy(shards=THREE)
        )
        await col.add(ids=["a", "b"], embeddings=[[1.0, 0, 0], [0, 1.0, 0]])
        policy = (await client.partition_map(NAME)).policy
        goal = plan_hash(policy, shards=[*THREE, "s3"]).goal
        started = asyncio.Event()

        def progress(step: str, n: int) -> None:
            started.set()

        first = asyncio.create_task(client.rebalance(NAME, goal, progress=progress, rate=1.0))
        await started.wait()
        with pytest.raises(ControlStoreError, match="already run by"):
            await client.rebalance(NAME, goal)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first


async def test_bad_goals_are_refused_before_anything_moves(
    four_urls: list[str], tmp_path: Path
) -> None:
    topology = topology_for(four_urls, {"backend": "sqlite", "path": str(tmp_path / "c.db")})
    async with await client_of(topology) as client:
        await client.create_collection(
            NAME, embedding_function=None, policy=HashPolicy(shards=THREE)
        )
        before = await client.partition_map(NAME)
        with pytest.raises(ConfigurationError, match="unknown shard"):
            await client.rebalance(NAME, HashPolicy(shards=(*THREE, "s9")))
        with pytest.raises(ConfigurationError, match="same slot space"):
            await client.rebalance(NAME, HashPolicy(shards=(*THREE, "s3"), slots=1024))
        for goal in (
            {"kind": "field", "field": "region", "partitions": {"eu": ["s3"]}},
            {"kind": "hash", "field": "user", "shards": [*THREE, "s3"]},
        ):
            with pytest.raises(ConfigurationError, match="keeps the routing fields"):
                await client.rebalance(NAME, goal)
        with pytest.raises(ConfigurationError, match="no migration to resume"):
            await client.rebalance(NAME)
        after = await client.partition_map(NAME)
        assert after == before


async def test_rebalance_needs_a_control_store(shard_urls: list[str]) -> None:
    async with await sharded_chroma.AsyncHttpClient(shards=shard_urls) as client:
        await client.create_collection(NAME, embedding_function=None)
        with pytest.raises(ConfigurationError, match=r"\[control\]"):
            await client.rebalance(NAME, HashPolicy())


async def test_a_client_without_the_control_store_is_refused_once_a_move_began(
    four_urls: list[str], tmp_path: Path
) -> None:
    """It would route by the stored policy and write past the mirroring: refused on open, with
    the reason, from the moment the migration starts (and after it ends)."""
    topology = topology_for(four_urls, {"backend": "sqlite", "path": str(tmp_path / "c.db")})
    plain = sharded_chroma.Topology.build({k: v for k, v in topology.items() if k != "control"})
    async with await client_of(topology) as client:
        col = await client.create_collection(
            NAME, embedding_function=None, policy=HashPolicy(shards=THREE)
        )
        await col.add(ids=["a", "b", "c"], embeddings=[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
        async with await sharded_chroma.AsyncHttpClient(topology=plain) as other:
            assert await (await other.get_collection(NAME, embedding_function=None)).count() == 3
        policy = (await client.partition_map(NAME)).policy
        await client.rebalance(NAME, plan_hash(policy, shards=[*THREE, "s3"]).goal)
        async with await sharded_chroma.AsyncHttpClient(topology=plain) as other:
            with pytest.raises(ConfigurationError, match=r"\[control\]"):
                await other.get_collection(NAME, embedding_function=None)
        # Its own clients still see every record, and the user's metadata shows no mark.
        assert sorted((await col.get())["ids"]) == ["a", "b", "c"]
        assert (await client.get_collection(NAME, embedding_function=None)).metadata is None
