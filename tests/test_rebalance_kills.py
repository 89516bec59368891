"""A migrator process killed (SIGKILL) at each step, with writers running, then resumed.

The hash move reweights three shards (s0 and s1 give slots to s2); the time move sends day 0's
bucket s0 -> s1 and day 2's s2 -> s0 and makes s0 the hot shard (day 3 stays pinned on s2). So
every shard serves reads in every phase: while the run is dead, the map stays in the phase it
reached and the cluster must answer exactly (``count()`` equals the distinct ids a full
``get()`` returns, which fails if either phase's marks were not hidden), and the resumed run
must finish the same migration."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import sharded_chroma
from sharded_chroma import ControlStoreError, HashPolicy
from sharded_chroma.rebalance import plan_hash, plan_time
from tests._history import Op, check
from tests._rebalancing import owners_of, topology_for
from tests.test_concurrent_writes import (
    NAME,
    POLICIES,
    REPAIR_AFTER,
    Log,
    one_call,
    pool_of,
    raw_parts,
    seen,
    skip_unless_slow,
    summary,
)
from tests.test_rebalance import preload

IDS = 90
WEIGHTS = {"s0": 1.0, "s1": 1.0, "s2": 2.0}
DAYS = ("2025-11-26", "2025-11-27", "2025-11-28", "2025-11-29")
TIME_MOVES = {DAYS[0]: "s1", DAYS[2]: "s0"}

# (step, records handled in it before the kill, the map phase a dead run leaves)
KILL_POINTS = [
    ("dual", 0, "dual"),
    ("copy", 20, "dual"),
    ("verify", 20, "dual"),
    ("cutover", 0, "cutover"),
    ("cleanup", 0, "cleanup"),
    ("stable", 0, "stable"),
]


async def goal_for(client: Any, kind: str) -> Any:
    policy = (await client.partition_map(NAME)).policy
    if kind == "hash":
        return plan_hash(policy, weights=WEIGHTS).goal
    layout = await client.layout(NAME)
    plan = plan_time(
        policy,
        existing_buckets={p.partition: p.shards[0] for p in layout.partitions},
        move=TIME_MOVES,
        hot="s0",
        known_shards=["s0", "s1", "s2"],
    )
    assert not plan.problems and len(plan.moves) == 2, plan.describe()
    return plan.goal


def migrate_and_die(topology: dict[str, Any], step: str, after: int, kind: str) -> None:
    """Child process: start the migration and SIGKILL itself once ``step`` handled ``after``
    records (a crash: no lease released, no record tidied)."""
    handled: dict[str, int] = {}

    def progress(name: str, n: int) -> None:
        handled[name] = handled.get(name, 0) + n
        if name == step and handled[name] >= after:
            os.kill(os.getpid(), signal.SIGKILL)

    async def run() -> None:
        client = await sharded_chroma.AsyncHttpClient(
            topology=sharded_chroma.Topology.build(topology)
        )
        goal = await goal_for(client, kind)
        await client.rebalance(NAME, goal, batch=10, progress=progress)

    asyncio.run(run())


async def write_until(col: Any, log: Log, stop: asyncio.Event, seed: str) -> None:
    rng = random.Random(seed)
    pool = pool_of(IDS)
    n = 0
    while not stop.is_set():
        await one_call(col, rng, f"{seed}-{n}", pool, log)
        n += 1


async def writing(col: Any, log: Log, tasks: int, seed: str) -> tuple[asyncio.Event, Any]:
    stop = asyncio.Event()
    group = asyncio.gather(*(write_until(col, log, stop, f"{seed}{t}") for t in range(tasks)))
    return stop, group


async def resume(client: Any, ttl: float) -> Any:
    """Run the migration again; the dead run's lease blocks it until the lease expires."""
    deadline = time.monotonic() + ttl + 20
    while True:
        try:
            return await client.rebalance(NAME)
        except ControlStoreError as exc:
            if "already run by" not in str(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


@pytest.mark.anyio
@pytest.mark.parametrize(("step", "after", "phase"), KILL_POINTS)
async def test_migrator_killed_at_each_step_is_resumed(
    shard_urls: list[str], tmp_path: Path, step: str, after: int, phase: str
) -> None:
    await killed_and_resumed(shard_urls, tmp_path, step, after, phase, "hash")


@pytest.mark.anyio
@pytest.mark.parametrize(("step", "after", "phase"), KILL_POINTS)
async def test_time_move_killed_at_each_step_is_resumed(
    shard_urls: list[str], tmp_path: Path, step: str, after: int, phase: str
) -> None:
    await killed_and_resumed(shard_urls, tmp_path, step, after, phase, "time")


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["hash", "time"])
@pytest.mark.parametrize("seed", range(8))
async def test_migrator_killed_at_random_points_is_resumed(
    shard_urls: list[str], tmp_path: Path, seed: int, kind: str, request: pytest.FixtureRequest
) -> None:
    """The long form: a seeded step and a seeded number of records into it."""
    skip_unless_slow(request.config)
    rng = random.Random(seed)
    step, _, phase = rng.choice(KILL_POINTS)
    after = rng.randrange(1, 80) if step in ("copy", "verify") else 0
    await killed_and_resumed(shard_urls, tmp_path, step, after, phase, kind)


async def killed_and_resumed(
    shard_urls: list[str], tmp_path: Path, step: str, after: int, phase: str, kind: str
) -> None:
    topology = topology_for(shard_urls, {"backend": "sqlite", "path": str(tmp_path / "c.db")})
    log = Log()
    async with await sharded_chroma.AsyncHttpClient(
        topology=sharded_chroma.Topology.build(topology)
    ) as client:
        policy = HashPolicy() if kind == "hash" else POLICIES["time"]
        col = await client.create_collection(NAME, embedding_function=None, policy=policy)
        await preload(col, log, IDS)
        stop, group = await writing(col, log, 3, "a")
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=migrate_and_die, args=(topology, step, after, kind))
        proc.start()
        try:
            await asyncio.to_thread(proc.join, 180)
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
        stop.set()
        await group
        assert proc.exitcode == -signal.SIGKILL, f"the migrator was not killed ({proc.exitcode})"

        # Dead at that step: the map stays in its phase and reads are exact.
        current = await client.partition_map(NAME)
        assert current.phase == phase, current
        listed = (await col.get(include=[]))["ids"]
        assert await col.count() == len(set(listed)) == len(listed)

        stop, group = await writing(col, log, 3, "b")
        try:
            report = await resume(client, topology["control"]["lease_ttl"])
        finally:
            stop.set()
            await group
        assert report.steps[-1] == "done"
        assert report.resumed_at is not None

        await asyncio.sleep(REPAIR_AFTER)
        final = seen(await col.get(include=["metadatas", "documents"]))
        parts = await raw_parts(shard_urls, str(col.id))
        found = check(log.ops, final, parts)
        assert not found, "\n".join(found[:15]) + summary(log.ops, log.errors)
        goal = (await client.partition_map(NAME)).policy
        if kind == "hash":
            assert_hash_placed(goal, await owners_of(shard_urls, str(col.id)))
        else:
            assert_time_placed(goal, parts, str(col.id))
        writes: list[Op] = [op for op in log.ops if op.kind != "get" and op.outcome == "ok"]
        assert len(writes) > 50


def assert_hash_placed(goal: Any, owners: dict[str, list[str]]) -> None:
    assert goal.owner_slots()["s2"] and len(goal.owner_slots()["s2"]) >= 1
    misplaced = [
        rid for shard, ids in owners.items() for rid in ids if goal.place(rid, None).shard != shard
    ]
    assert not misplaced
    share = len(owners.get("s2", [])) / max(1, sum(len(v) for v in owners.values()))
    assert 0.35 < share < 0.65, f"s2 holds {share:.0%} of the records, planned 50%"


def assert_time_placed(goal: Any, parts: dict[str, list[str]], cluster_id: str) -> None:
    """Every bucket is on its goal shard, and only there: the old places were dropped."""
    assert goal.hot == "s0"
    assert [goal.shard_of(d) for d in DAYS] == ["s1", "s1", "s0", "s2"]
    where: dict[str, list[str]] = {}
    for key in parts:
        shard, _, name = key.partition(":")
        label = name.rsplit("/", 1)[-1].removeprefix(f"{cluster_id}-")
        if label != NAME:
            where.setdefault(label, []).append(shard)
    assert where == {d: [goal.shard_of(d)] for d in DAYS}, where
