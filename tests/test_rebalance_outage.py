"""The control store itself failing during a move (a real etcd member killed and restarted by
pid), and rolling a move back with ``abort``."""

from __future__ import annotations

import asyncio
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

import sharded_chroma
from sharded_chroma import (
    ConfigurationError,
    ControlStoreError,
    ControlUnavailableError,
    HashPolicy,
)
from sharded_chroma.rebalance import plan_hash
from sharded_chroma.testing._etcd import LocalEtcd
from tests._history import Op, Value, check
from tests._rebalancing import owners_of, topology_for
from tests.test_concurrent_writes import NAME, REPAIR_AFTER, Log, raw_parts, seen
from tests.test_rebalance import preload

pytestmark = pytest.mark.anyio

IDS = 60
TTL = 3.0


async def client_of(topology: dict[str, Any]) -> Any:
    return await sharded_chroma.AsyncHttpClient(topology=sharded_chroma.Topology.build(topology))


async def phase_of(client: Any) -> str:
    return str((await client.partition_map(NAME)).phase)


async def until_phase(client: Any, phase: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while await phase_of(client) != phase:
        assert time.monotonic() < deadline, f"the map never reached {phase}"
        await asyncio.sleep(0.1)


def record(rid: str, token: str) -> dict[str, Any]:
    return {
        "ids": [rid],
        "embeddings": [[0.5, 0.5, 0.5]],
        "metadatas": [{"w": token}],
        "documents": [token],
    }


async def test_etcd_down_during_a_move(
    shard_urls: list[str], tmp_path: Path, etcd: LocalEtcd
) -> None:
    """Reads go on under the last map; writes stop with a clear error once the client's lease
    may have expired (never before the store is gone, never to a place no map names); after
    etcd is back both work again and the migration resumes to the end."""
    _ignore_grpc_callbacks_into_closed_loops()
    control = {
        "backend": "etcd",
        "endpoints": [etcd.endpoint],
        "namespace": f"/{tmp_path.name}/",
        "lease_ttl": TTL,
        "timeout": 1.0,
    }
    topology = topology_for(shard_urls, control)
    log = Log()
    async with await client_of(topology) as client:
        col = await client.create_collection(NAME, embedding_function=None, policy=HashPolicy())
        await preload(col, log, IDS)
        policy = (await client.partition_map(NAME)).policy
        goal = plan_hash(policy, weights={"s0": 1, "s1": 1, "s2": 2}).goal
        # Slow enough to still be copying when etcd dies.
        migration = asyncio.create_task(client.rebalance(NAME, goal, batch=5, rate=10.0))
        await until_phase(client, "dual")
        etcd.kill()
        killed = time.monotonic()
        try:
            refused_at = None
            n = 0
            while time.monotonic() - killed < TTL + 6:
                got = await col.get(ids=["id000", "id001"])
                assert sorted(got["ids"]) == ["id000", "id001"]
                assert (
                    len(
                        (await col.query(query_embeddings=[[0.1, 0.2, 0.3]], n_results=5))["ids"][0]
                    )
                    == 5
                )
                token = f"outage-{n}"
                n += 1
                rid = f"id{n % IDS:03d}"
                values = (Value({"w": token}, token),)
                started = time.monotonic()
                try:
                    await col.upsert(**record(rid, token))
                except ControlUnavailableError as exc:
                    # Refused before anything was sent; recorded as unknown all the same.
                    log.ops.append(
                        Op("upsert", (rid,), started, time.monotonic(), "unknown", values)
                    )
                    refused_at = refused_at or time.monotonic()
                    assert "lease" in str(exc) and etcd.endpoint in str(exc)
                else:
                    assert refused_at is None, "a write went through after one was refused"
                    log.ops.append(Op("upsert", (rid,), started, time.monotonic(), "ok", values))
                await asyncio.sleep(0.1)
            assert refused_at is not None, "writes never stopped while etcd was down"
            assert refused_at - killed < TTL + 2.0
            with pytest.raises((ControlStoreError, ControlUnavailableError)):
                await migration
        finally:
            if not migration.done():
                migration.cancel()
            etcd.start()
        # Back: writes work again once the lease is renewed (the member elects itself first,
        # and a loaded machine can take tens of seconds over it).
        deadline = time.monotonic() + 60
        while True:
            token = f"back-{time.monotonic()}"
            # Log.write records a raise as an unknown outcome.
            await log.write(
                "upsert",
                ("id001",),
                (Value({"w": token}, token),),
                lambda token=token: col.upsert(**record("id001", token)),
            )
            if log.ops[-1].outcome == "ok":
                break
            assert time.monotonic() < deadline, "writes never resumed after etcd came back"
            await asyncio.sleep(0.3)
        report = await _resume(client)
        assert report.steps[-1] == "done"
        await asyncio.sleep(REPAIR_AFTER)
        final = seen(await col.get(include=["metadatas", "documents"]))
        found = check(log.ops, final, await raw_parts(shard_urls, str(col.id)))
        assert not found, found[:10]


def _ignore_grpc_callbacks_into_closed_loops() -> None:
    """grpc's completion queue can hand an event for a channel whose loop (a client's
    control-store thread) has already closed to this loop, where it fails with "Event loop is
    closed"; anyio's pytest plugin then fails the test for a callback error that is grpc's
    own bookkeeping, not the behaviour under test (seen in most full-suite runs on
    2026-12-03, also before the change of that day). Only that exact failure is dropped;
    every other callback error still reaches the plugin's handler."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (
            isinstance(exc, RuntimeError)
            and str(exc) == "Event loop is closed"
            and "completion_queue" in "".join(traceback.format_tb(exc.__traceback__))
        ):
            return
        if previous is None:
            loop.default_exception_handler(context)
        else:
            previous(loop, context)

    loop.set_exception_handler(handler)


async def _resume(client: Any) -> Any:
    deadline = time.monotonic() + TTL + 30
    while True:
        try:
            return await client.rebalance(NAME)
        except (ControlStoreError, ControlUnavailableError):
            # The killed run's lease outlives the outage by up to its ttl.
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def test_abort_before_cutover_rolls_the_move_back(
    shard_urls: list[str], tmp_path: Path
) -> None:
    topology = topology_for(shard_urls, {"backend": "sqlite", "path": str(tmp_path / "c.db")})
    log = Log()
    async with await client_of(topology) as client:
        col = await client.create_collection(NAME, embedding_function=None, policy=HashPolicy())
        await preload(col, log, IDS)
        before = await client.partition_map(NAME)
        goal = plan_hash(before.policy, weights={"s0": 1, "s1": 1, "s2": 2}).goal
        migration = asyncio.create_task(client.rebalance(NAME, goal, batch=5, rate=20.0))
        await until_phase(client, "dual")
        await asyncio.sleep(1.0)  # some copies made
        migration.cancel()
        with pytest.raises(asyncio.CancelledError):
            await migration
        token = "during"
        await log.write(
            "upsert",
            ("id005",),
            (Value({"w": token}, token),),
            lambda: col.upsert(**record("id005", token)),
        )
        report = await client.abort_rebalance(NAME)
        assert report.steps[-1] == "aborted"
        after = await client.partition_map(NAME)
        assert after.phase == "stable" and after.policy == before.policy
        assert after.epoch > before.epoch
        with pytest.raises(ConfigurationError, match="no migration"):
            await client.abort_rebalance(NAME)
        # Nothing is left where the aborted goal would have put it: every record is where
        # the original policy places it, once, and the history holds.
        owners = await owners_of(shard_urls, str(col.id))
        misplaced = [
            rid
            for shard, ids in owners.items()
            for rid in ids
            if before.policy.place(rid, None).shard != shard
        ]
        assert not misplaced
        final = seen(await col.get(include=["metadatas", "documents"]))
        assert not check(log.ops, final, await raw_parts(shard_urls, str(col.id)))
        assert await col.count() == IDS
