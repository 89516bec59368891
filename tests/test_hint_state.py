"""The hint-log file's node state and tombstones, and the replay lock, without servers: races a
review found (a repair clearing a mark added while it ran, counts drifting under a process
running older code, tombstones dropped while a copy still needs them, a blocked replay waiter
wedging a copy or the event loop, a refused write hinted to a copy that never gets it)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from chromadb.errors import InvalidArgumentError

from sharded_chroma._errors import ConfigurationError
from sharded_chroma._hintfile import claim_hint_file
from sharded_chroma._hints import HintLog
from sharded_chroma._node import HintTarget, Node
from sharded_chroma._nodestate import NodeStates, SqliteNodeStore
from sharded_chroma._replay import HintReplayer
from sharded_chroma._replicas import ReplicaSet
from sharded_chroma._topology import ReplicationConfig, ShardConfig

pytestmark = pytest.mark.anyio

CID = "00000000-0000-0000-0000-000000000002"
A, B = "http://127.0.0.1:1", "http://127.0.0.1:2"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "hints.sqlite3"


def view(path: Path) -> NodeStates:
    states = NodeStates(SqliteNodeStore(path))
    states.refresh()
    return states


def test_a_repair_clears_only_the_marks_it_saw_begin(path: Path) -> None:
    with HintLog(path) as log:
        states = view(path)
        states.mark_needs_repair(A, "hints lost")
        seen = states.get(A)
        # While the repair compares, another write misses A and cannot be kept.
        states.mark_needs_repair(A, "another missed write not kept")
        states.clear_repair(A, seen)
        assert view(path).get(A).needs_repair, "a mark added during the repair was cleared"
        states.clear_repair(A, view(path).get(A))
        assert not view(path).behind(A)
        assert log.count() == 0


def test_quarantined_hints_added_during_a_repair_stay(path: Path) -> None:
    with HintLog(path) as log:
        first = log.append(A, "t", "d", CID, "c", "upsert", b"{}")
        log.refused(first, "InvalidArgumentError: bad", quarantine=True)
        seen = view(path).get(A)
        second = log.append(A, "t", "d", CID, "c", "upsert", b"{}")
        log.refused(second, "InvalidArgumentError: bad", quarantine=True)
        view(path).clear_repair(A, seen)
        after = view(path).get(A)
        assert after.quarantined == 1 and after.needs_repair


def test_counts_follow_hints_written_by_a_process_running_older_code(path: Path) -> None:
    with HintLog(path) as log:
        log.append(A, "t", "d", CID, "c", "upsert", b"{}")
        # Older code inserts rows without knowing the counters.
        raw = sqlite3.connect(path, isolation_level=None)
        raw.execute(
            "INSERT INTO hints (node, tenant, database, collection_id, collection_name, op,"
            " body, size, created_at) VALUES (?, 't', 'd', ?, 'c', 'upsert', x'7b7d', 2, 1.0)",
            (A, CID),
        )
        raw.close()
        assert log.count(A) == 2
        batch = log.pending(A)
        assert log.ack(A, batch[-1].id) == 2
        assert log.count(A) == 0 and not view(path).behind(A)


def test_tombstones_belong_to_the_copy_that_missed_the_delete_and_outlive_its_repair(
    path: Path,
) -> None:
    clock = FakeClock()
    with HintLog(path, max_age=60.0, max_hints=1, clock=clock) as log:
        log.append(A, "t", "d", CID, "c", "delete", b"{}", version=7, deleted_ids=["x"])
        states = view(path)
        assert states.tombstones(A, CID, ["x", "y"]) == {"x": 7}
        assert states.tombstones(B, CID, ["x"]) == {}, "another copy's record is not deleted"
        # A full log keeps no hint, but the tombstone, which the repair will need.
        with pytest.raises(Exception, match="full"):
            log.append(B, "t", "d", CID, "c", "delete", b"{}", version=9, deleted_ids=["z"])
        assert states.tombstones(B, CID, ["z"]) == {"z": 9}
        clock.now += 120.0
        assert log.expire() == {A: 1}  # A's hint expired: A needs repair now
        assert view(path).get(A).needs_repair
        assert states.tombstones(A, CID, ["x"]) == {"x": 7}, "dropped while A needs repair"
        states.clear_repair(A)
        log.expire()
        assert states.tombstones(A, CID, ["x"]) == {}


def two_copies(log: HintLog, store: SqliteNodeStore) -> ReplicaSet:
    shard = ShardConfig.model_validate(
        {"name": "s0", "primary": {"url": A}, "replicas": [{"url": B}]}
    )
    return ReplicaSet(shard, ReplicationConfig(), log, NodeStates(store))


@pytest.fixture
def copies(path: Path) -> Iterator[tuple[ReplicaSet, HintLog]]:
    with HintLog(path) as log:
        store = SqliteNodeStore(path)
        try:
            yield two_copies(log, store), log
        finally:
            store.close()


async def test_a_write_the_copies_refuse_is_not_hinted_to_a_copy_behind(
    copies: tuple[ReplicaSet, HintLog],
) -> None:
    rs, log = copies
    p, r = rs.nodes
    log.append(r.url, "t", "d", CID, "c", "upsert", b"{}")  # r is behind

    async def refuse(method: str, path: str, **kw: Any) -> Any:
        raise InvalidArgumentError("dimension mismatch")

    p.transport.request = refuse  # type: ignore[method-assign]

    async def path_for(node: Node) -> str:
        return "/c/upsert"

    target = HintTarget("t", "d", CID, "c", "upsert")
    with pytest.raises(InvalidArgumentError):
        await rs.write(path_for, b'{"n":1}', target, "one")
    assert log.count(r.url) == 1, "the refused write was queued for the copy behind"


def replayer_and_node(log: HintLog, store: SqliteNodeStore) -> tuple[HintReplayer, Node]:
    rs = two_copies(log, store)
    node = rs.nodes[1]

    async def target(n: Node, t: HintTarget) -> str:
        return "/c/upsert"

    return HintReplayer("s0", log, target), node


async def test_many_waiting_replays_neither_wedge_the_copy_nor_the_loop(path: Path) -> None:
    with HintLog(path) as log:
        store = SqliteNodeStore(path)
        replayer, node = replayer_and_node(log, store)
        log.append(node.url, "t", "d", CID, "c", "upsert", b'{"ids":["a"]}')
        posted: list[str] = []

        async def request(method: str, path: str, **kw: Any) -> Any:
            posted.append(path)
            await anyio.sleep(0.05)
            return {}

        node.transport.request = request  # type: ignore[method-assign]
        # More waiters than anyio's 40 worker threads: none may hold a thread while waiting.
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(60):
                    tg.start_soon(lambda: replayer.replay(node, wait=True))
        assert posted == ["/c/upsert"] and log.count(node.url) == 0
        store.close()


def test_a_cancelled_waiter_leaves_the_replay_lock_free(path: Path) -> None:
    with HintLog(path) as log:
        store = SqliteNodeStore(path)
        replayer, node = replayer_and_node(log, store)
        held = threading.Event()
        release = threading.Event()

        def hold() -> None:
            with node.replay_lock:
                held.set()
                release.wait(5)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(5)

        async def waiter() -> None:
            await asyncio.wait_for(replayer.replay(node, wait=True), timeout=0.2)

        with pytest.raises(TimeoutError):
            asyncio.run(waiter())
        release.set()
        holder.join(5)
        assert node.replay_lock.acquire(blocking=False), "a cancelled waiter took the lock"
        node.replay_lock.release()
        store.close()


# -- which file a topology uses ---------------------------------------------------------------

C = "http://127.0.0.1:3"


def test_a_grown_or_shrunk_topology_adopts_the_file_holding_its_nodes_hints(
    tmp_path: Path,
) -> None:
    first = claim_hint_file(tmp_path, "t", "d", [A, B])
    with HintLog(first) as log:
        log.append(B, "t", "d", CID, "c", "upsert", b"{}")
    assert claim_hint_file(tmp_path, "t", "d", [A, B, C]) == first
    # Membership grew to C: a topology of C alone (A and B removed) still finds it.
    assert claim_hint_file(tmp_path, "t", "d", [C]) == first
    assert claim_hint_file(tmp_path, "t", "d", [A, B]) == first
    with HintLog(first) as log:
        assert log.nodes() == {B: 1}
    # Another tenant, database or set of nodes is another cluster: its own file.
    assert claim_hint_file(tmp_path, "t", "other", [A, B]) != first
    assert claim_hint_file(tmp_path, "t", "d", ["http://127.0.0.1:9"]) != first
    assert len(list(tmp_path.glob("*.sqlite3"))) == 3


def test_a_file_written_before_membership_was_recorded_is_adopted_by_its_nodes(
    tmp_path: Path,
) -> None:
    old = tmp_path / "0123456789abcdef.sqlite3"
    with HintLog(old) as log:
        log.append(B, "t", "d", CID, "c", "upsert", b"{}")
    conn = sqlite3.connect(old)
    conn.executescript("DROP TABLE members; DROP TABLE cluster;")
    conn.close()
    assert claim_hint_file(tmp_path, "t", "other-db", [A, B]) != old
    assert claim_hint_file(tmp_path, "t", "d", [A, B, C]) == old


def test_two_files_holding_the_clusters_nodes_are_refused_not_guessed(tmp_path: Path) -> None:
    claim_hint_file(tmp_path, "t", "d", [A])
    claim_hint_file(tmp_path, "t", "d", [B])
    with pytest.raises(ConfigurationError, match="hints_dir"):
        claim_hint_file(tmp_path, "t", "d", [A, B])


def test_processes_starting_at_once_on_different_topologies_share_one_file(
    tmp_path: Path,
) -> None:
    chosen: list[Path] = []
    sets = ([A], [A, B], [A, B, C], [B, C])
    threads = [
        threading.Thread(
            target=lambda nodes=sets[i % 4]: chosen.append(
                claim_hint_file(tmp_path, "t", "d", nodes)
            )
        )
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(chosen)) == 1 and len(chosen) == 8
    assert len(list(tmp_path.glob("*.sqlite3"))) == 1


def _open_and_close(path: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("SELECT COUNT(*) FROM hints").fetchone()
    conn.close()


def test_opening_the_file_again_keeps_this_processes_locks(tmp_path: Path) -> None:
    """A second open in a process that has the file open (the node-state store does so) must
    not drop the first connection's locks: another process closing its connection would then
    take itself for the last one and reset the WAL under the first (a corrupt file)."""
    import multiprocessing

    from sharded_chroma._hintdb import connect

    path = tmp_path / "hints.sqlite3"
    with HintLog(path) as log:
        log.append(A, "t", "d", CID, "c", "upsert", b"{}")
        connect(path, migrate=False).close()
        wal = path.with_name(path.name + "-wal")
        assert wal.exists()
        other = multiprocessing.get_context("spawn").Process(
            target=_open_and_close, args=(str(path),)
        )
        other.start()
        other.join(60)
        assert other.exitcode == 0
        assert wal.exists(), "another process reset the WAL this one still uses"
        log.append(A, "t", "d", CID, "c", "upsert", b"{}")
        assert log.count() == 2


def _hold_write_lock(path: Path, seconds: float, started: threading.Event) -> None:
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        holder.execute("BEGIN IMMEDIATE")
        started.set()
        threading.Event().wait(seconds)
        holder.execute("COMMIT")
    finally:
        holder.close()


def test_opening_waits_for_another_writer_on_a_file_not_yet_in_wal_mode(tmp_path: Path) -> None:
    """SQLite fails the switch to WAL at once, without its busy handler, while another
    connection holds the write lock of a file still in rollback mode: two processes starting
    on a new file hit it. The open must wait for the lock, not fail."""
    from sharded_chroma._hintdb import connect

    path = tmp_path / "hints.db"
    plain = sqlite3.connect(path, isolation_level=None)
    plain.execute("CREATE TABLE filler (x)")
    plain.close()
    started = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(path, 0.3, started))
    holder.start()
    try:
        assert started.wait(5)
        conn = connect(path, migrate=True)
    finally:
        holder.join()
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
