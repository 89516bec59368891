"""A rebuilding process killed (SIGKILL) at each step with writers running, then resumed or
aborted: reads stay exact while it is dead, and afterwards the history checker passes with
every record in exactly one generation."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import sharded_chroma
from sharded_chroma import ControlStoreError
from tests._history import Op, check
from tests._rebalancing import topology_for
from tests.test_concurrent_writes import NAME, POLICIES, REPAIR_AFTER, Log, raw_parts, seen, summary
from tests.test_rebalance import preload
from tests.test_rebalance_kills import KILL_POINTS, writing
from tests.test_rebuild import gen_ids, generations_on, root_ids

pytestmark = pytest.mark.anyio

IDS = 90
HNSW = {"max_neighbors": 20}


def rebuild_and_die(topology: dict[str, Any], step: str, after: int) -> None:
    """Child process: start the rebuild and SIGKILL itself once ``step`` handled ``after``
    records (no lease released, no record tidied)."""
    handled: dict[str, int] = {}

    def progress(name: str, n: int) -> None:
        handled[name] = handled.get(name, 0) + n
        if name == step and handled[name] >= after:
            os.kill(os.getpid(), signal.SIGKILL)

    async def run() -> None:
        client = await sharded_chroma.AsyncHttpClient(
            topology=sharded_chroma.Topology.build(topology)
        )
        await client.rebuild(NAME, HNSW, batch=10, progress=progress)

    asyncio.run(run())


async def after_the_lease(call: Any, ttl: float) -> Any:
    """``call()`` once the dead run's lease has expired."""
    deadline = time.monotonic() + ttl + 20
    while True:
        try:
            return await call()
        except ControlStoreError as exc:
            if "already run by" not in str(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def killed(
    shard_urls: list[str], tmp_path: Path, step: str, after: int, phase: str, then: str
) -> None:
    topology = topology_for(shard_urls, {"backend": "sqlite", "path": str(tmp_path / "c.db")})
    ttl = topology["control"]["lease_ttl"]
    log = Log()
    async with await sharded_chroma.AsyncHttpClient(
        topology=sharded_chroma.Topology.build(topology)
    ) as client:
        col = await client.create_collection(
            NAME, embedding_function=None, policy=POLICIES["field"]
        )
        await preload(col, log, IDS)
        stop, group = await writing(col, log, 3, "a")
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=rebuild_and_die, args=(topology, step, after))
        proc.start()
        try:
            await asyncio.to_thread(proc.join, 180)
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
        stop.set()
        await group
        assert proc.exitcode == -signal.SIGKILL, f"the rebuild was not killed ({proc.exitcode})"

        current = await client.partition_map(NAME)
        assert current.phase == phase, current
        listed = (await col.get(include=[]))["ids"]
        assert await col.count() == len(set(listed)) == len(listed)

        stop, group = await writing(col, log, 3, "b")
        try:
            if then == "resume":
                report = await after_the_lease(lambda: client.rebalance(NAME), ttl)
                assert report.steps[-1] == "done" and report.resumed_at is not None
            else:
                report = await after_the_lease(lambda: client.abort_rebalance(NAME), ttl)
                assert report.steps[-1] == "aborted"
        finally:
            stop.set()
            await group

        await asyncio.sleep(REPAIR_AFTER)
        final = seen(await col.get(include=["metadatas", "documents"]))
        parts = await raw_parts(shard_urls, str(col.id))
        found = check(log.ops, final, parts)
        assert not found, "\n".join(found[:15]) + summary(log.ops, log.errors)
        current = await client.partition_map(NAME)
        gens = [await generations_on(url, str(col.id)) for url in shard_urls]
        if then == "resume":
            assert (current.phase, current.generation) == ("stable", 1)
            assert root_ids(parts) == [] and gen_ids(parts, 1)
            assert all(set(g) == {1} for g in gens), gens
        else:
            assert (current.phase, current.generation) == ("stable", 0)
            assert gen_ids(parts, 1) == [] and root_ids(parts)
            assert gens == [{}] * len(shard_urls), "the new generation was not dropped"
        writes: list[Op] = [op for op in log.ops if op.kind != "get" and op.outcome == "ok"]
        assert len(writes) > 50


@pytest.mark.parametrize(("step", "after", "phase"), KILL_POINTS)
async def test_rebuild_killed_at_each_step_is_resumed(
    shard_urls: list[str], tmp_path: Path, step: str, after: int, phase: str
) -> None:
    await killed(shard_urls, tmp_path, step, after, phase, "resume")


@pytest.mark.parametrize(("step", "after", "phase"), [p for p in KILL_POINTS if p[2] == "dual"])
async def test_rebuild_killed_before_cutover_is_aborted(
    shard_urls: list[str], tmp_path: Path, step: str, after: int, phase: str
) -> None:
    await killed(shard_urls, tmp_path, step, after, phase, "abort")
