"""Node state shared by every host through the control store.

Two clients with their own hint logs stand for two hosts: host A misses a write on a copy (the
copy is cut off behind a proxy, the write is acknowledged by the primary and kept in A's hint
log), the copy comes back, and host B, which never saw it fail, must not read from it until
A's hints are replayed. Likewise for a copy A marked as needing repair: B does not read from
it, and a repair run on B clears the mark on A too. Each runs on the SQLite control store and
on a real etcd. Without the shared state, B reads the copy half the time (round robin) and
gets the old values.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest

import sharded_chroma
from sharded_chroma import ControlUnavailableError, ShardedClient, Topology
from sharded_chroma._antirepair import repair
from sharded_chroma._nodestate import NodeState
from sharded_chroma.control._open import open_backend
from sharded_chroma.testing._etcd import LocalEtcd
from tests._proxy import FaultProxy
from tests._replicated import node_of
from tests.test_rebalance_outage import _ignore_grpc_callbacks_into_closed_loops

pytestmark = pytest.mark.anyio

NAME = "shared_state"
IDS = [f"r{i}" for i in range(12)]
VECTORS = [[float(i), 1.0, 0.5] for i in range(len(IDS))]


@pytest.fixture(autouse=True)
async def _grpc_bookkeeping() -> None:
    # Stopping etcd under a client can leave grpc an event for a closed loop (see there).
    _ignore_grpc_callbacks_into_closed_loops()


@pytest.fixture(params=["sqlite", "etcd"])
def control(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"backend": "sqlite", "path": str(tmp_path / "control.db"), "lease_ttl": 3.0}
    etcd: LocalEtcd = request.getfixturevalue("etcd")
    return {
        "backend": "etcd",
        "endpoints": [etcd.endpoint],
        "namespace": f"/{tmp_path.name}/",
        "lease_ttl": 3.0,
        "timeout": 1.0,
    }


@pytest.fixture
def proxy(oracle_url: str) -> Iterator[FaultProxy]:
    """The replica of the one shard, behind a proxy that can cut it off."""
    where = urlsplit(oracle_url)
    assert where.hostname is not None and where.port is not None
    with FaultProxy(where.hostname, where.port) as p:
        yield p


def host(
    primary: str, replica: str, control: dict[str, Any], hints: Path, **replication: Any
) -> Topology:
    return Topology.build(
        {
            "shards": [{"name": "s0", "primary": primary, "replicas": [replica]}],
            "replication": {
                "hints_dir": str(hints),
                "replay_in_background": False,
                "node_retry_after": 0.1,
                "read_selection": "round_robin",
                **replication,
            },
            "control": control,
        }
    )


@contextlib.asynccontextmanager
async def hosts(
    shard_urls: list[str], proxy: FaultProxy, control: dict[str, Any], tmp: Path, **a_config: Any
) -> AsyncIterator[tuple[ShardedClient, ShardedClient]]:
    a_topology = host(shard_urls[0], proxy.url, control, tmp / "a", **a_config)
    b_topology = host(shard_urls[0], proxy.url, control, tmp / "b")
    async with (
        await sharded_chroma.AsyncHttpClient(topology=a_topology) as a,
        await sharded_chroma.AsyncHttpClient(topology=b_topology) as b,
    ):
        yield a, b


def state(client: ShardedClient, url: str) -> NodeState:
    """What ``client`` knows of ``url`` now, as the watch brought it (no fence)."""
    states = client._runtime.cluster.node_states
    states.refresh()
    return states.get(url)


async def fenced(client: ShardedClient, url: str) -> NodeState:
    """What ``client`` knows of ``url`` after taking in everything published before now, as
    every read of records does."""
    states = client._runtime.cluster.node_states
    await states.fence()
    return states.get(url)


async def eventually(what: str, ok: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not ok():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await anyio.sleep(0.05)


async def miss_writes(col: Any, proxy: FaultProxy, n: int, value: int) -> None:
    """``n`` upserts of every id the replica misses (acknowledged by the primary)."""
    proxy.cut()
    with sharded_chroma.options(write_concern="one"):
        for k in range(n):
            await col.upsert(ids=IDS, embeddings=VECTORS, metadatas=[{"n": value + k}] * len(IDS))
    proxy.restore()


async def reads_the_copy(client: ShardedClient, col: Any, url: str, want: set[int]) -> None:
    """``client`` reads from the copy at ``url`` again, and finds ``want`` there too."""
    replica = node_of(client, url)
    before = replica.stats.requests
    for _ in range(6):
        assert await values(col) == want
    assert replica.stats.requests > before


async def values(col: Any) -> set[int]:
    got = await col.get(ids=IDS, include=["metadatas"])
    return {int(m["n"]) for m in got["metadatas"]}


async def test_a_copy_behind_on_one_host_serves_no_reads_on_another(
    shard_urls: list[str], proxy: FaultProxy, control: dict[str, Any], tmp_path: Path
) -> None:
    async with hosts(shard_urls, proxy, control, tmp_path) as (a, b):
        col_a = await a.create_collection(NAME, embedding_function=None)
        col_b = await b.get_collection(NAME, embedding_function=None)
        await col_a.add(ids=IDS, embeddings=VECTORS, metadatas=[{"n": 0}] * len(IDS))
        await miss_writes(col_a, proxy, 1, 1)
        assert state(a, proxy.url).pending > 0
        # B never saw the copy fail; it knows only what A published.
        seen_b = await fenced(b, proxy.url)
        assert seen_b.elsewhere == 1 and seen_b.behind and seen_b.pending == 0
        for _ in range(20):
            assert await values(col_b) == {1}
        # A catches the copy up: its key goes, and B reads from the copy again.
        assert await a._runtime.cluster.replay_hints() > 0
        await eventually("B sees the copy current", lambda: not state(b, proxy.url).behind)
        await reads_the_copy(b, col_b, proxy.url, {1})


async def test_a_repair_mark_is_seen_and_cleared_on_every_host(
    shard_urls: list[str], proxy: FaultProxy, control: dict[str, Any], tmp_path: Path
) -> None:
    """A's hint log holds one write: the second missed write is lost for the copy, which
    then needs a repair. B sees the mark (and why); a repair run on B clears it on A too."""
    async with hosts(shard_urls, proxy, control, tmp_path, hint_max_count=1) as (a, b):
        col_a = await a.create_collection(NAME, embedding_function=None)
        col_b = await b.get_collection(NAME, embedding_function=None)
        await col_a.add(ids=IDS, embeddings=VECTORS, metadatas=[{"n": 0}] * len(IDS))
        await miss_writes(col_a, proxy, 2, 1)
        assert state(a, proxy.url).needs_repair
        seen_b = await fenced(b, proxy.url)
        assert seen_b.needs_repair and seen_b.shared_mark > 0
        assert seen_b.reason is not None and "not kept" in seen_b.reason
        for _ in range(10):
            assert await values(col_b) == {2}
        await a._runtime.cluster.replay_hints()  # the one kept; the other is still lost
        assert (await fenced(b, proxy.url)).needs_repair
        report = await repair(b)
        assert report.pairs, report
        assert not state(b, proxy.url).needs_repair
        await eventually("A's own mark is cleared", lambda: not state(a, proxy.url).behind)
        await reads_the_copy(b, col_b, proxy.url, {2})
        # The copy has every write now: read from it alone, A finds the newest.
        assert await values(col_a) == {2}


async def test_hints_of_a_host_whose_clients_are_gone_need_a_repair(
    shard_urls: list[str], proxy: FaultProxy, control: dict[str, Any], tmp_path: Path
) -> None:
    """A closes with a hint pending. Nobody on another host can replay it, so B takes the
    copy for one needing repair (still reading none of it), and B's repair settles it."""
    b_topology = host(shard_urls[0], proxy.url, control, tmp_path / "b")
    async with await sharded_chroma.AsyncHttpClient(topology=b_topology) as b:
        a_topology = host(shard_urls[0], proxy.url, control, tmp_path / "a")
        async with await sharded_chroma.AsyncHttpClient(topology=a_topology) as a:
            col_a = await a.create_collection(NAME, embedding_function=None)
            await col_a.add(ids=IDS, embeddings=VECTORS, metadatas=[{"n": 0}] * len(IDS))
            await miss_writes(col_a, proxy, 1, 1)
        col_b = await b.get_collection(NAME, embedding_function=None)
        await eventually("B sees the hints orphaned", lambda: state(b, proxy.url).needs_repair)
        seen_b = await fenced(b, proxy.url)
        assert seen_b.orphans and seen_b.reason is not None and "no client" in seen_b.reason
        for _ in range(10):
            assert await values(col_b) == {1}
        await repair(b)
        assert not state(b, proxy.url).behind
        await reads_the_copy(b, col_b, proxy.url, {1})


async def test_a_write_whose_miss_cannot_be_shared_is_not_acknowledged(
    shard_urls: list[str], proxy: FaultProxy, tmp_path: Path, etcd: LocalEtcd
) -> None:
    """etcd stops while the copy is cut off: the write is stored on the primary and kept in
    A's hint log, but B could not learn the copy is behind, so A raises; once etcd is back,
    the same write succeeds and B does not read the copy."""
    control = {
        "backend": "etcd",
        "endpoints": [etcd.endpoint],
        "namespace": f"/{tmp_path.name}/",
        "lease_ttl": 6.0,
        "timeout": 1.0,
    }
    async with hosts(shard_urls, proxy, control, tmp_path) as (a, b):
        col_a = await a.create_collection(NAME, embedding_function=None)
        col_b = await b.get_collection(NAME, embedding_function=None)
        await col_a.add(ids=IDS, embeddings=VECTORS, metadatas=[{"n": 0}] * len(IDS))
        proxy.cut()
        etcd.kill()
        try:
            with (
                pytest.raises(ControlUnavailableError) as caught,
                sharded_chroma.options(write_concern="one"),
            ):
                await col_a.upsert(ids=IDS, embeddings=VECTORS, metadatas=[{"n": 1}] * 12)
            assert "not acknowledged" in str(caught.value)
        finally:
            etcd.start()
        proxy.restore()
        # A's hint is pending and A publishes it once the store is back.
        await eventually("B sees the copy behind", lambda: state(b, proxy.url).behind, 15.0)
        for _ in range(10):
            assert await values(col_b) == {1}


async def test_a_key_dropped_by_another_host_is_put_back(
    shard_urls: list[str], proxy: FaultProxy, control: dict[str, Any], tmp_path: Path
) -> None:
    """Another host may drop A's key (taking A's log for orphaned while A's lease lapsed):
    while A still holds the hints, A says so again, and B stops reading the copy."""
    async with hosts(shard_urls, proxy, control, tmp_path) as (a, b):
        col_a = await a.create_collection(NAME, embedding_function=None)
        col_b = await b.get_collection(NAME, embedding_function=None)
        await col_a.add(ids=IDS, embeddings=VECTORS, metadatas=[{"n": 0}] * len(IDS))
        await miss_writes(col_a, proxy, 1, 1)
        assert (await fenced(b, proxy.url)).elsewhere == 1
        backend = open_backend(a._runtime.topology)
        try:

            async def stale_keys() -> list[str]:
                return [e.key for e in await backend.list("nodestate/node/") if "/stale/" in e.key]

            [key] = await stale_keys()
            assert await backend.delete(key)
            deadline = time.monotonic() + 5.0
            while await stale_keys() != [key]:
                assert time.monotonic() < deadline, "A did not put its key back within 5 s"
                await anyio.sleep(0.05)
        finally:
            await backend.aclose()
        assert (await fenced(b, proxy.url)).elsewhere == 1
        for _ in range(10):
            assert await values(col_b) == {1}


async def test_a_read_right_after_another_hosts_write_skips_the_copy_it_missed(
    shard_urls: list[str], proxy: FaultProxy, control: dict[str, Any], tmp_path: Path
) -> None:
    """B reads the moment A's write returns, before B's watch could have told it anything:
    only the fence each read begins with keeps B off the copy (round robin would send one
    of every two reads there)."""
    async with hosts(shard_urls, proxy, control, tmp_path) as (a, b):
        col_a = await a.create_collection(NAME, embedding_function=None)
        col_b = await b.get_collection(NAME, embedding_function=None)
        await col_a.add(ids=IDS, embeddings=VECTORS, metadatas=[{"n": 0}] * len(IDS))
        for n in range(1, 6):
            await miss_writes(col_a, proxy, 1, n)
            for _ in range(4):
                assert await values(col_b) == {n}, f"round {n}"
            assert await a._runtime.cluster.replay_hints() > 0
            await eventually("B sees the copy current", lambda: not state(b, proxy.url).behind)
