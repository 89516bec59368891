"""A client that cannot acknowledge a new epoch holds a migration at its barrier until the
client's lease expires, and no longer: a writer process is frozen (SIGSTOP, by its pid) while
it has the collection open, the migration is started, and the dual step must wait for the
frozen client's lease to run out before it copies anything. The process is then thawed
(SIGCONT) and writes on through the rest of the move; afterwards the history checker runs over
both processes' operations (no acknowledged write lost, no deleted record back, no id twice).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import sharded_chroma
from sharded_chroma import HashPolicy
from sharded_chroma.rebalance import plan_hash
from tests._history import check
from tests._rebalancing import owners_of, topology_for
from tests.test_concurrent_writes import (
    NAME,
    REPAIR_AFTER,
    Log,
    one_call,
    pool_of,
    raw_parts,
    seen,
    summary,
)
from tests.test_rebalance import control_table, preload

IDS = 60
TTL = 4.0
WEIGHTS = {"s0": 1.0, "s1": 1.0, "s2": 2.0}


def frozen_writer(spec: dict[str, Any], ready: Any, out: str, seconds: float) -> None:
    """Child process: opens the collection (so migrations wait for it), says so, then writes
    and deletes ids of the pool until ``seconds`` have passed on the wall clock (a freeze
    counts), its history pickled to ``out``."""

    async def run() -> tuple[Any, Any]:
        client = await sharded_chroma.AsyncHttpClient(topology=sharded_chroma.Topology.build(spec))
        col = await client.get_collection(NAME, embedding_function=None)
        await col.count()
        ready.set()
        log, rng, pool = Log(), random.Random("frozen"), pool_of(IDS)
        until, n = time.time() + seconds, 0
        while time.time() < until:
            await one_call(col, rng, f"frozen-{n}", pool, log)
            n += 1
            await asyncio.sleep(0.02)
        await client.aclose()
        return log.ops, log.errors

    Path(out).write_bytes(pickle.dumps(asyncio.run(run())))


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sqlite", "etcd"])
async def test_a_frozen_client_holds_the_barrier_until_its_lease_expires(
    shard_urls: list[str], tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    control = {**control_table(kind, tmp_path, request), "lease_ttl": TTL}
    spec = topology_for(shard_urls, control)
    log = Log()
    async with await sharded_chroma.AsyncHttpClient(
        topology=sharded_chroma.Topology.build(spec)
    ) as client:
        col = await client.create_collection(NAME, embedding_function=None, policy=HashPolicy())
        await preload(col, log, IDS)
        goal = plan_hash((await client.partition_map(NAME)).policy, weights=WEIGHTS).goal
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        out = tmp_path / "frozen.pickle"
        child = ctx.Process(target=frozen_writer, args=(spec, ready, str(out), 30.0))
        child.start()
        events: list[tuple[float, str, int]] = []
        try:
            assert await asyncio.to_thread(ready.wait, 120), (
                "the writer never opened the collection"
            )
            await asyncio.sleep(0.5)
            assert child.pid is not None
            os.kill(child.pid, signal.SIGSTOP)
            frozen_at = time.monotonic()

            def progress(step: str, n: int) -> None:
                events.append((time.monotonic(), step, n))
                if step == "copy" and child.pid is not None:
                    os.kill(child.pid, signal.SIGCONT)  # thawed once the barrier is passed

            report = await client.rebalance(NAME, goal, batch=10, progress=progress)
        finally:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGCONT)
        await asyncio.to_thread(child.join, 120)
        if child.is_alive():
            child.kill()
        assert child.exitcode == 0, f"the writer failed ({child.exitcode})"
        assert report.steps[-1] == "done", report

        dual = next(t for t, step, _ in events if step == "dual")
        copying = next(t for t, step, _ in events if step == "copy")
        # The lease is renewed every ttl/6 and runs out ttl after the last renewal: the barrier
        # passes no sooner than 5/6 ttl after the freeze (less a little for clock rates), and
        # not after waiting for the acknowledgement timeout either.
        assert copying - frozen_at >= 0.75 * TTL, (
            f"the move copied {copying - frozen_at:.2f} s after a client froze with the "
            f"collection open; its lease ({TTL} s) cannot have expired"
        )
        assert copying - dual < TTL + 10.0

        child_ops, child_errors = pickle.loads(out.read_bytes())
        ops = log.ops + child_ops
        acked_after = [op for op in child_ops if op.kind != "get" and op.outcome == "ok"]
        assert acked_after, "the thawed writer acknowledged nothing"
        await asyncio.sleep(REPAIR_AFTER)
        final = seen(await col.get(include=["metadatas", "documents"]))
        parts = await raw_parts(shard_urls, str(col.id))
        found = check(ops, final, parts)
        assert not found, "\n".join(found[:15]) + summary(ops, log.errors + child_errors)
        owners = await owners_of(shard_urls, str(col.id))
        assert all(goal.place(r, None).shard == s for s, ids in owners.items() for r in ids)
