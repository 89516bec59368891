"""Replicas that converge: every per-copy failure is hinted, replay keeps the newest version,
node state is durable and shared by every process of the host, a hint a node keeps refusing is
set aside instead of blocking its shard, and a copy that comes back catches up in the
background while writes go on.

Each test is a regression for one way copies drifted apart or served old data before; the
fake operations at the top stand for faults a real server cannot be made to produce on demand
(a 500 answer on one copy). Two clients in one process stand for two processes: each opens
the hint-log file with its own SQLite connections, as a process does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from chromadb.errors import InternalError, InvalidArgumentError

import sharded_chroma
from sharded_chroma import Topology
from sharded_chroma._hints import Hint, HintLog
from sharded_chroma._node import HintTarget, Node
from sharded_chroma._nodestate import NodeStates, SqliteNodeStore
from sharded_chroma._replicas import ReplicaSet
from sharded_chroma._topology import ReplicationConfig, ShardConfig
from sharded_chroma.testing import LocalChromaServer, LocalCluster
from tests._nodes import node_records
from tests._proxy import FaultProxy
from tests._replicated import client_for, emb, node_of, queue_refused_hint
from tests._servers import all_running, own_cluster

pytestmark = pytest.mark.anyio

CID = "00000000-0000-0000-0000-000000000001"


# -- fakes: one copy answering a server error -------------------------------------------------


@contextlib.contextmanager
def fake_set(tmp_path: Path, n: int = 3) -> Iterator[tuple[ReplicaSet, HintLog]]:
    shard = ShardConfig.model_validate(
        {
            "name": "s0",
            "primary": {"url": "http://127.0.0.1:1"},
            "replicas": [{"url": f"http://127.0.0.1:{i + 2}"} for i in range(n - 1)],
        }
    )
    with HintLog(tmp_path / "hints.sqlite3") as log:
        store = SqliteNodeStore(log.path)
        try:
            yield ReplicaSet(shard, ReplicationConfig(), log, NodeStates(store)), log
        finally:
            store.close()


def answering(rs: ReplicaSet, errors: dict[str, Exception]) -> list[str]:
    """Fake transports: a node in ``errors`` raises it, the others store the write."""
    posted: list[str] = []

    def fake(node: Node) -> Any:
        async def request(method: str, path: str, **kw: Any) -> Any:
            if node.url in errors:
                raise errors[node.url]
            posted.append(node.url)
            return {"from": node.url}

        return request

    for n in rs.nodes:
        n.transport.request = fake(n)  # type: ignore[method-assign]
    return posted


async def path_for(node: Node) -> str:
    return "/c/upsert"


TARGET = HintTarget("t", "d", CID, "c", "upsert")


async def test_a_copy_answering_a_server_error_others_did_not_give_is_hinted(
    tmp_path: Path,
) -> None:
    with fake_set(tmp_path) as (rs, log):
        p, r1, r2 = rs.nodes
        answering(rs, {r2.url: InternalError("Nothing found on disk")})
        with sharded_chroma.options(write_concern="quorum"):
            assert await rs.write(path_for, b'{"n":1}', TARGET, "quorum") == {"from": p.url}
        assert log.count(r2.url) == 1 and r2.stale, "the refusing copy missed the write"
        assert not p.stale and not r1.stale


async def test_an_error_every_copy_gives_is_the_requests_and_nothing_is_hinted(
    tmp_path: Path,
) -> None:
    with fake_set(tmp_path) as (rs, log):
        refusal = InvalidArgumentError("bad where")
        answering(rs, {n.url: refusal for n in rs.nodes})
        with pytest.raises(InvalidArgumentError):
            await rs.write(path_for, b'{"n":1}', TARGET, "all")
        assert log.count() == 0 and not any(n.stale for n in rs.nodes)


async def test_reads_fail_over_on_a_server_error_and_raise_it_when_every_copy_gives_it(
    tmp_path: Path,
) -> None:
    with fake_set(tmp_path) as (rs, _log):
        p, r1, r2 = rs.nodes
        asked: list[str] = []
        failing = {p.url, r1.url}

        async def op(node: Node) -> str:
            asked.append(node.url)
            if node.url in failing:
                raise InternalError("Nothing found on disk")
            return node.url

        assert await rs.read(op, prefer=p) == r2.url
        assert asked[0] == p.url and asked[-1] == r2.url
        failing.add(r2.url)
        asked.clear()
        with pytest.raises(InternalError):
            await rs.read(op)
        assert sorted(asked) == sorted(n.url for n in rs.nodes), "each copy asked once"
        # A client error is the request's: raised at once, no other copy asked.
        asked.clear()

        async def bad(node: Node) -> str:
            asked.append(node.url)
            raise InvalidArgumentError("bad filter")

        with pytest.raises(InvalidArgumentError):
            await rs.read(bad)
        assert len(asked) == 1


# -- durable, shared node state ---------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_expired_hints_mark_their_node_for_repair_for_every_process(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "hints.sqlite3"
    a, b = "http://a:1", "http://b:1"
    with HintLog(path, max_age=60.0, clock=clock) as log:
        log.append(a, "t", "d", CID, "c", "upsert", b"{}")
        clock.now += 30
        log.append(b, "t", "d", CID, "c", "upsert", b"{}")
        other = NodeStates(SqliteNodeStore(path))  # another process's view
        other.refresh()
        assert other.get(a).pending == 1 and not other.get(a).needs_repair
        clock.now += 40  # a's hint is 70 s old, b's 40 s
        assert log.expire() == {a: 1}
        other.refresh()
        assert other.get(a).needs_repair and other.behind(a), "the lost write is not forgotten"
        assert "expired" in (other.get(a).reason or "")
        assert other.get(b).pending == 1 and not other.get(b).needs_repair
    # It survives every process closing the file; a repair by anyone clears it for all.
    reopened = NodeStates(SqliteNodeStore(path))
    reopened.refresh()
    assert reopened.get(a).needs_repair
    reopened.clear_repair(a)
    other.refresh()
    assert not other.behind(a)


async def test_a_write_that_could_not_be_kept_marks_the_copy_durably(tmp_path: Path) -> None:
    path = tmp_path / "hints.sqlite3"
    shard = ShardConfig.model_validate(
        {"name": "s0", "primary": {"url": "http://127.0.0.1:1"}, "replicas": [{"url": "http://127.0.0.1:2"}]}
    )  # fmt: skip
    with HintLog(path, max_hints=1) as log:
        log.append("http://other:1", "t", "d", CID, "c", "upsert", b"{}")  # the log is full
        store = SqliteNodeStore(path)
        rs = ReplicaSet(shard, ReplicationConfig(), log, NodeStates(store))
        p, r = rs.nodes
        answering(rs, {r.url: down(r)})
        assert await rs.write(path_for, b'{"n":1}', TARGET, "one") == {"from": p.url}
        store.close()
    # Another process, later: the copy lost a write and must not be read until repaired.
    later = NodeStates(SqliteNodeStore(path))
    later.refresh()
    assert later.get(r.url).needs_repair and later.behind(r.url)
    assert "not kept" in (later.get(r.url).reason or "")


def down(node: Node) -> Exception:
    from sharded_chroma import NodeUnavailableError

    return NodeUnavailableError(shard="s0", node=node.url, attempts=["connection refused"])


# -- against real servers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with own_cluster(3, tmp_path_factory.mktemp("converge-cluster")) as c:
        yield c


@pytest.fixture
def servers(cluster: LocalCluster) -> list[LocalChromaServer]:
    return all_running(cluster)


def pair(primary: str, replica: str, hints: Path, **replication: Any) -> Topology:
    return Topology.build(
        {
            "shards": [{"name": "s0", "primary": primary, "replicas": [replica]}],
            "replication": {"hints_dir": str(hints), "node_retry_after": 0.1, **replication},
        }
    )


async def test_a_process_sees_hints_another_wrote_after_it_started(
    servers: list[LocalChromaServer], tmp_path: Path
) -> None:
    with FaultProxy(servers[1].host, servers[1].port) as proxy:
        topology = pair(servers[0].url, proxy.url, tmp_path, replay_in_background=False)
        async with client_for(topology) as a, client_for(topology) as b:
            col_a = await a.create_collection("seen", embedding_function=None)
            col_b = await b.get_collection("seen", embedding_function=None)
            await col_a.add(ids=["x"], documents=["v1"], embeddings=emb(1))
            proxy.cut()
            with sharded_chroma.options(write_concern="one"):
                await col_a.upsert(ids=["x"], documents=["v2"], embeddings=emb(2))
            proxy.restore()
            # b started before the hint existed; it must not read the copy that missed it.
            assert node_of(b, proxy.url).stale
            for _ in range(20):
                got = await col_b.get(ids=["x"], include=["documents"])
                assert got["documents"] == ["v2"], "read a copy another process knew was behind"
            status = {s.url: s for s in await b.status()}
            assert status[proxy.url].stale and status[proxy.url].pending_hints == 1
            # b's writes to that copy queue behind a's hint instead of overtaking it.
            with sharded_chroma.options(write_concern="one"):
                await col_b.upsert(ids=["x"], documents=["v3"], embeddings=emb(3))
            assert (await b._runtime.cluster.pending_hints()) == {proxy.url: 2}
            # And b replays what a hinted (it used to replay only copies it marked itself).
            assert await b.replay_hints() == 2
            assert not node_of(a, proxy.url).stale
        held = await node_records(proxy.url, "seen")
        assert held["x"][0] == "v3"


async def test_hints_pending_when_a_shard_is_added_are_replayed_by_the_grown_topology(
    servers: list[LocalChromaServer], tmp_path: Path
) -> None:
    with FaultProxy(servers[1].host, servers[1].port) as proxy:
        before = pair(servers[0].url, proxy.url, tmp_path, replay_in_background=False)
        grown = Topology.build(
            {
                "shards": [
                    {"name": "s0", "primary": servers[0].url, "replicas": [proxy.url]},
                    {"name": "s1", "primary": servers[2].url},
                ],
                "replication": {
                    "hints_dir": str(tmp_path),
                    "node_retry_after": 0.1,
                    "replay_in_background": False,
                },
            }
        )
        async with client_for(before) as old:
            col = await old.create_collection("grown", embedding_function=None)
            await col.add(ids=["x"], documents=["v1"], embeddings=emb(1))
            proxy.cut()
            with sharded_chroma.options(write_concern="one"):
                await col.upsert(ids=["x"], documents=["v2"], embeddings=emb(2))
            proxy.restore()
            # A process of the grown topology, started while one of the old still runs, sees
            # the copy as behind and replays the old process's hint to it.
            async with client_for(grown) as new:
                assert node_of(new, proxy.url).stale, "the grown topology lost the hint"
                assert old._runtime.cluster.hints is not None
                assert new._runtime.cluster.hints is not None
                assert new._runtime.cluster.hints.path == old._runtime.cluster.hints.path
                assert await new.replay_hints() == 1
            assert not node_of(old, proxy.url).stale
        held = await node_records(proxy.url, "grown")
        assert held["x"][0] == "v2"
        # The shard removed again: the first topology still finds the one file.
        async with client_for(before) as again:
            assert again._runtime.cluster.hints is not None
            files = [p async for p in anyio.Path(tmp_path).glob("*.sqlite3")]
            assert len(files) == 1


async def test_replay_never_writes_an_older_version_over_a_newer_one(
    servers: list[LocalChromaServer], tmp_path: Path
) -> None:
    with FaultProxy(servers[1].host, servers[1].port) as proxy:
        # Two hosts (their own hint logs): the second never learns the copy missed a write.
        here = pair(servers[0].url, proxy.url, tmp_path / "a", replay_in_background=False)
        there = pair(servers[0].url, proxy.url, tmp_path / "b", replay_in_background=False)
        async with client_for(here) as a, client_for(there) as b:
            col_a = await a.create_collection("lww", embedding_function=None)
            col_b = await b.get_collection("lww", embedding_function=None)
            await col_a.add(ids=["x", "y"], documents=["v1", "y1"], embeddings=emb(1) * 2)
            proxy.cut()
            with sharded_chroma.options(write_concern="one"):
                await col_a.upsert(ids=["x"], documents=["old"], embeddings=emb(2))
                await col_a.delete(ids=["y"])
            proxy.restore()
            await col_b.upsert(ids=["x", "y"], documents=["new", "y-new"], embeddings=emb(3) * 2)
            assert await a.replay_hints() == 2
        held = await node_records(proxy.url, "lww")
        primary = await node_records(servers[0].url, "lww")
        assert primary["x"][0] == "new" and primary["y"][0] == "y-new"
        assert held["x"][0] == "new", "the replayed older upsert overwrote the newer write"
        assert "y" in held and held["y"][0] == "y-new", "the replayed delete removed a newer write"


async def test_a_hint_the_node_keeps_refusing_is_set_aside_not_blocking_the_shard(
    servers: list[LocalChromaServer], tmp_path: Path
) -> None:
    with FaultProxy(servers[1].host, servers[1].port) as proxy:
        topology = pair(servers[0].url, proxy.url, tmp_path, replay_in_background=False)
        async with client_for(topology) as client:
            col = await client.create_collection("refused", embedding_function=None)
            await col.add(ids=["a"], embeddings=emb(1))
            proxy.cut()
            with sharded_chroma.options(write_concern="one"):
                await col.upsert(ids=["b"], documents=["b"], embeddings=emb(2))
                queue_refused_hint(client, proxy.url)
                await col.upsert(ids=["c"], documents=["c"], embeddings=emb(3))
            proxy.restore()
            assert await client.replay_hints() == 3
            node = node_of(client, proxy.url)
            client._runtime.cluster.node_states.refresh()
            state = client._runtime.cluster.node_states.get(proxy.url)
            assert state.pending == 0 and state.quarantined == 1 and state.needs_repair
            assert node.stale, "a copy that refused a write serves no reads until repaired"
            # Reads and writes of the shard go on (writes meet concern `one`; the copy behind
            # gets them hinted).
            with sharded_chroma.options(write_concern="one"):
                await col.upsert(ids=["d"], embeddings=emb(4))
            await client.replay_hints()
            assert sorted((await col.get())["ids"]) == ["a", "b", "c", "d"]
            status = {s.url: s for s in await client.status()}
            assert status[proxy.url].stale
            held = await node_records(proxy.url, "refused")
            assert {"b", "c"} <= set(held), "the good hints around the bad one replayed"
            # A repair makes the copy equal and clears the mark for every process.
            from sharded_chroma._antirepair import repair

            await repair(client)
            assert not node.stale
            async with client_for(topology) as other:
                assert not node_of(other, proxy.url).stale


async def test_a_copy_that_comes_back_catches_up_in_the_background_under_load(
    servers: list[LocalChromaServer], tmp_path: Path
) -> None:
    with FaultProxy(servers[1].host, servers[1].port) as proxy:
        topology = pair(servers[0].url, proxy.url, tmp_path, replay_rate=500.0)
        async with client_for(topology) as client:
            col = await client.create_collection("drain", embedding_function=None)
            node = node_of(client, proxy.url)
            stop = anyio.Event()
            written = 0

            async def load() -> None:
                nonlocal written
                with sharded_chroma.options(write_concern="one"):
                    while not stop.is_set():
                        await col.upsert(ids=[f"k{written % 50}"], embeddings=emb(written))
                        written += 1
                        await anyio.sleep(0.01)

            async with anyio.create_task_group() as tg:
                tg.start_soon(load)
                proxy.cut()
                await anyio.sleep(2.0)
                hinted = await client._runtime.cluster.pending_hints()
                hinted = hinted.get(proxy.url, 0)
                assert hinted > 20, f"only {hinted} writes missed: the load is too light"
                proxy.restore()
                # Nobody calls replay_hints(): the background replayer drains while writes go on.
                deadline = time.monotonic() + 20.0
                while node.stale and time.monotonic() < deadline:  # noqa: ASYNC110 - polls state
                    await anyio.sleep(0.1)
                caught_up = not node.stale
                stop.set()
            assert caught_up, f"still {client._runtime.cluster.node_states.get(proxy.url)}"
            # The writes made until the load stopped may have left a last hint or two (write
            # concern one): compare the copies once those are in as well.
            deadline = time.monotonic() + 20.0
            while node.stale and time.monotonic() < deadline:  # noqa: ASYNC110 - polls state
                await anyio.sleep(0.1)
            assert not node.stale
        held = await node_records(proxy.url, "drain")
        primary = await node_records(servers[0].url, "drain")
        assert held == primary


async def test_repair_keeps_the_newest_version_even_when_the_primary_missed_it(
    servers: list[LocalChromaServer], tmp_path: Path
) -> None:
    from sharded_chroma._antirepair import repair

    with FaultProxy(servers[0].host, servers[0].port) as proxy:
        topology = pair(proxy.url, servers[1].url, tmp_path, replay_in_background=False)
        async with client_for(topology) as client:
            col = await client.create_collection("newest", embedding_function=None)
            await col.add(ids=["x", "y", "z"], documents=["x1", "y1", "z1"], embeddings=emb(1) * 3)
            proxy.cut()
            with sharded_chroma.options(write_concern="one"):
                await col.upsert(ids=["x", "new"], documents=["x2", "n1"], embeddings=emb(2) * 2)
                await col.delete(ids=["y"])
            proxy.restore()
            # The hints are lost (another host's log, or expired): only the replica has the
            # acknowledged writes, and only this host's tombstone says y was deleted.
            log = client._runtime.cluster.hints
            assert log is not None
            assert log.drop_node(proxy.url) == 2
            client._runtime.cluster.node_states.mark_needs_repair(proxy.url, "hints lost")
            # Every collection: only a repair of all of them clears a node's mark.
            fixed = await repair(client)
            assert fixed.clean, fixed
            ours = next(p for p in fixed.pairs if p.collection == "newest")
            assert set(ours.copied) == {"x", "new"}
            assert ours.deleted == ("y",)
            assert not node_of(client, proxy.url).stale, "a clean repair clears the mark"
        for url in (servers[0].url, servers[1].url):
            held = await node_records(url, "newest")
            assert {i: r[0] for i, r in held.items()} == {"x": "x2", "new": "n1", "z": "z1"}, url


async def test_hints_for_a_dropped_time_bucket_never_land_in_the_one_made_again(
    servers: list[LocalChromaServer], tmp_path: Path
) -> None:
    day0 = 1_764_115_200  # 2025-11-26T00:00:00Z
    with FaultProxy(servers[1].host, servers[1].port) as proxy:
        topology = pair(servers[0].url, proxy.url, tmp_path, replay_in_background=False)
        async with client_for(topology) as client:
            policy = sharded_chroma.TimePolicy(field="ts", granularity="day", hot="s0")
            col = await client.create_collection(
                "generations", embedding_function=None, policy=policy
            )
            await col.add(ids=["a"], metadatas=[{"ts": day0 + 10}], embeddings=emb(1))
            proxy.cut()
            with sharded_chroma.options(write_concern="one"):
                await col.upsert(ids=["old"], metadatas=[{"ts": day0 + 20}], embeddings=emb(2))
            proxy.restore()
            # Retention drops the bucket on every copy; a late write makes it again.
            assert await col.drop_partitions(day0 + 86400) == [("s0", "2025-11-26")]
            with sharded_chroma.options(write_concern="one"):  # the copy is still behind
                await col.add(ids=["new"], metadatas=[{"ts": day0 + 30}], embeddings=emb(3))
            await client.replay_hints()
            assert await client._runtime.cluster.pending_hints() == {}
            assert sorted((await col.get())["ids"]) == ["new"]
        bucket = f"{col.id}-2025-11-26"
        for url in (servers[0].url, servers[1].url):
            official = await chromadb_client(url)
            parts = await official.get_collection(bucket, embedding_function=None)
            held = (await parts.get())["ids"]
            assert held == ["new"], f"{url} holds {held}: a hint of the dropped bucket landed"


async def chromadb_client(url: str) -> Any:
    from urllib.parse import urlsplit

    import chromadb

    parts = urlsplit(url)
    return await chromadb.AsyncHttpClient(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 8000,
        database="default_database.sc-parts",
    )


async def test_a_replayer_that_lost_its_lease_stops_before_its_next_batch(tmp_path: Path) -> None:
    from sharded_chroma._replay import HintReplayer

    clock = FakeClock()
    with fake_set(tmp_path, n=2) as (rs, _):
        node = rs.nodes[1]
    with HintLog(tmp_path / "fenced.sqlite3", clock=clock) as log:
        for k in range(250):
            log.append(node.url, "t", "d", CID, "c", "upsert", b'{"ids":["%d"]}' % k)
        posted: list[str] = []

        async def request(method: str, path: str, **kw: Any) -> Any:
            posted.append(path)
            # A stall longer than the lease: another process took it over meanwhile.
            clock.now += 120.0
            assert log.lease(node.url, "another-process", 60.0)
            return {}

        node.transport.request = request  # type: ignore[method-assign]

        async def target(n: Node, t: HintTarget) -> str:
            return "/c/upsert"

        replayer = HintReplayer("s0", log, target, clock)
        # The first batch (200 hints, disjoint ids: one merged request) was applied.
        assert await replayer.replay(node) == 200
        assert len(posted) == 1, "kept writing on a lease another process holds"
        assert log.count(node.url) == 50


def test_hints_merge_into_one_request_only_where_that_changes_nothing() -> None:
    from sharded_chroma._hintruns import coalesce

    def hint(k: int, op: str = "upsert") -> Hint:
        return Hint(k, "http://n:1", "t", "d", CID, "c", op, b"", 0.0)

    def body(*ids: str, docs: bool = True) -> dict[str, Any]:
        return {
            "ids": list(ids),
            "embeddings": [[1.0]] * len(ids),
            "documents": list(ids) if docs else None,
        }

    items = [
        (hint(1), "/p/upsert", body("a", "b")),
        (hint(2), "/p/upsert", body("c")),  # joins: same op, path and columns, new ids
        (hint(3), "/p/upsert", body("a")),  # a again: a new run, so a's two writes keep order
        (hint(4), "/q/upsert", body("d")),  # another collection
        (hint(5), "/q/upsert", body("e", docs=False)),  # other columns
        (hint(6, "delete"), "/q/delete", {"ids": ["e"]}),
        (hint(7), "/q/upsert", body("f")),
        (hint(8), "/q/upsert", body("g", "h", "j")),  # over the bound of 3 records
        (hint(9), "", body("i")),  # a collection deleted since: alone
    ]
    runs = coalesce(items, max_records=3)
    assert [[h.id for h in r.hints] for r in runs] == [[1, 2], [3], [4], [5], [6], [7], [8], [9]]
    merged = runs[0].body()
    assert merged["ids"] == ["a", "b", "c"] and merged["documents"] == ["a", "b", "c"]
    assert merged["embeddings"] == [[1.0]] * 3


async def test_verify_finds_drift_while_records_are_deleted_under_it(
    servers: list[LocalChromaServer], tmp_path: Path
) -> None:
    from sharded_chroma._antientropy import verify

    topology = pair(servers[0].url, servers[1].url, tmp_path, replay_in_background=False)
    async with client_for(topology) as client:
        col = await client.create_collection("verify-deletes", embedding_function=None)
        ids = [f"r-{k:03d}" for k in range(300)]
        await col.add(ids=ids, embeddings=[[float(k), 0.0, 1.0] for k in range(300)])
        # Drift: the replica lost one record (written to directly, say).
        replica = node_of(client, servers[1].url)
        state = await client._runtime.catalog.state(col.id, col.tenant, col.database)
        path = await client._runtime.physical.node_path(state, replica, "/delete")
        await replica.transport.request("POST", path, body={"ids": ["r-120"]})
        # After the primary's first page, a hundred records before it are deleted (both
        # copies, through the client): offset pages would then skip r-120 on both sides.
        primary = node_of(client, servers[0].url)
        request = primary.transport.request
        fired = False

        async def racing(method: str, path: str, **kw: Any) -> Any:
            nonlocal fired
            answer = await request(method, path, **kw)
            body = kw.get("body") or {}
            if path.endswith("/get") and body.get("include") and not fired:
                fired = True
                await col.delete(ids=ids[:100])
            return answer

        primary.transport.request = racing  # type: ignore[method-assign]
        try:
            found = await verify(client, collections=["verify-deletes"], page_size=64)
        finally:
            primary.transport.request = request  # type: ignore[method-assign]
        assert fired
        assert "r-120" in found.pairs[0].missing, found.pairs[0]


async def test_only_deletes_that_surely_removed_their_ids_leave_tombstones(
    servers: list[LocalChromaServer], tmp_path: Path
) -> None:
    with FaultProxy(servers[1].host, servers[1].port) as proxy:
        topology = pair(servers[0].url, proxy.url, tmp_path, replay_in_background=False)
        async with client_for(topology) as client:
            col = await client.create_collection("sure-deletes", embedding_function=None)
            await col.add(
                ids=["x", "y"], metadatas=[{"tag": "a"}, {"tag": "a"}], embeddings=emb(1) * 2
            )
            proxy.cut()
            with sharded_chroma.options(write_concern="one"):
                # A filter that matches nothing: x is not deleted anywhere.
                await col.delete(ids=["x"], where={"tag": "b"})
                await col.delete(ids=["y"])
            proxy.restore()
            states = client._runtime.cluster.node_states
            got = states.tombstones(proxy.url, str(col.id), ["x", "y"])
            assert set(got) == {"y"}, f"tombstones {got}: a filtered delete would delete x"
            assert states.tombstones(servers[0].url, str(col.id), ["y"]) == {}
            await client.replay_hints()
            assert sorted((await col.get())["ids"]) == ["x"]
