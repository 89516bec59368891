"""``status()`` shows every node's durable state: behind (stale) with its pending hints, needs
repair with the reason, hints quarantined; as the host's hint-log file says, whichever process
wrote it, and in the ``sharded-chroma status`` table, never with a secret in it.

Two clients on one ``hints_dir`` stand for two processes (each opens the hint-log file with
its own SQLite connections, as a process does); the CLI runs as a real separate process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

import sharded_chroma
from sharded_chroma import ShardedClient, Topology
from sharded_chroma._antirepair import repair
from sharded_chroma._status import ShardStatus
from sharded_chroma.cli._status_view import render_status
from sharded_chroma.testing import LocalChromaServer, LocalCluster
from tests._proxy import FaultProxy
from tests._replicated import client_for, emb, queue_refused_hint
from tests._servers import all_running, own_cluster

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hunter2-not-for-logs"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with own_cluster(2, tmp_path_factory.mktemp("status-state-cluster")) as c:
        yield c


@pytest.fixture
def servers(cluster: LocalCluster) -> list[LocalChromaServer]:
    return all_running(cluster)


def pair_data(primary: str, replica: str, hints: Path) -> dict[str, Any]:
    # No background replay: what the hint log holds stays there until a test replays it.
    return {
        "shards": [{"name": "s0", "primary": primary, "replicas": [replica]}],
        "replication": {
            "hints_dir": str(hints),
            "node_retry_after": 0.1,
            "replay_in_background": False,
        },
    }


async def status_of(client: ShardedClient) -> dict[str, ShardStatus]:
    return {s.url: s for s in await client.status()}


def row_of(table: str, url: str) -> tuple[str, list[str]]:
    """The table row of node ``url`` and the indented lines under it."""
    lines = table.splitlines()
    at = next(i for i, line in enumerate(lines) if url in line.split())
    under = []
    for line in lines[at + 1 :]:
        if not line.startswith(" "):
            break
        under.append(line.strip())
    return lines[at], under


async def cli_status(topology_file: Path) -> str:
    """``sharded-chroma status`` in its own process; its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await anyio.run_process(
        [sys.executable, "-m", "sharded_chroma.cli", "status", "--topology", str(topology_file)],
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return proc.stdout.decode()


def write_toml(path: Path, primary: str, replica: str, hints: Path) -> Path:
    path.write_text(
        f'[[shards]]\nname = "s0"\nprimary = "{primary}"\nreplicas = ["{replica}"]\n\n'
        f"[replication]\nhints_dir = {orjson.dumps(str(hints)).decode()}\n"
        "replay_in_background = false\n",
        encoding="utf-8",
    )
    return path


async def test_a_copy_that_missed_writes_shows_stale_in_a_later_clients_status(
    servers: list[LocalChromaServer], tmp_path: Path
) -> None:
    with FaultProxy(servers[1].host, servers[1].port) as proxy:
        topology = Topology.build(pair_data(servers[0].url, proxy.url, tmp_path))
        async with client_for(topology) as writer:
            col = await writer.create_collection("behind", embedding_function=None)
            await col.add(ids=["a"], embeddings=emb(1))
            proxy.cut()
            with sharded_chroma.options(write_concern="one"):
                await col.upsert(ids=["b"], embeddings=emb(2))
                await col.upsert(ids=["c"], embeddings=emb(3))
            mine = await status_of(writer)
            assert mine[proxy.url].stale and mine[proxy.url].pending_hints == 2
        # A client opened afterwards, on the same hint log, knows from the file alone.
        async with client_for(topology) as later:
            down = (await status_of(later))[proxy.url]
            assert not down.healthy and down.stale and down.pending_hints == 2
            assert not down.needs_repair and down.repair_reason is None
            proxy.restore()
            got = await status_of(later)
            copy, primary = got[proxy.url], got[servers[0].url]
            assert copy.healthy and copy.stale and copy.pending_hints == 2
            assert not copy.needs_repair and copy.quarantined_hints == 0
            assert not primary.stale and primary.pending_hints == 0 and not primary.needs_repair
            row, under = row_of(render_status(tuple(got.values())), proxy.url)
            assert "stale, 2 hints" in row
            assert not any(line.startswith(("needs repair", "1 hints")) for line in under)
            assert await later.replay_hints() == 2
            caught_up = (await status_of(later))[proxy.url]
            assert not caught_up.stale and caught_up.pending_hints == 0


async def test_a_copy_marked_for_repair_shows_it_everywhere_until_a_repair(
    servers: list[LocalChromaServer], tmp_path: Path
) -> None:
    primary = servers[0].url
    replica = servers[1].url
    hints = tmp_path / "hints"
    topology = Topology.build(pair_data(primary, replica, hints))
    toml = write_toml(tmp_path / "cluster.toml", primary, replica, hints)
    # The reason quotes an error that carried credentials in a URL: status must not show them.
    reason = f"missed upsert not kept: refused by http://admin:{SECRET}@10.0.0.9:8000/api/v2"
    async with client_for(topology) as marker:
        col = await marker.create_collection("marked", embedding_function=None)
        await col.add(ids=["a", "b"], embeddings=emb(1) * 2)
        await anyio.to_thread.run_sync(
            marker._runtime.cluster.node_states.mark_needs_repair, replica, reason
        )
    async with client_for(topology) as other:
        got = await status_of(other)
        copy = got[replica]
        assert copy.healthy and copy.needs_repair and copy.stale and copy.pending_hints == 0
        assert copy.repair_reason is not None
        assert copy.repair_reason.startswith("missed upsert not kept: refused by http://***@")
        assert SECRET not in copy.repair_reason
        assert not got[primary].needs_repair and got[primary].repair_reason is None
        table = render_status(tuple(got.values()))
        row, under = row_of(table, replica)
        assert "needs repair" in row
        assert under[0].startswith("needs repair: missed upsert not kept")
        assert SECRET not in table
        cli = await cli_status(toml)
        row, under = row_of(cli, replica)
        assert "needs repair" in row and under[0].startswith("needs repair: missed upsert")
        assert SECRET not in cli
        report = await repair(other)
        assert report.clean, report
        after = (await status_of(other))[replica]
        assert not after.needs_repair and after.repair_reason is None and not after.stale
    async with client_for(topology) as third:
        after = (await status_of(third))[replica]
        assert not after.needs_repair and not after.stale and after.quarantined_hints == 0
    cli = await cli_status(toml)
    row, under = row_of(cli, replica)
    assert "current" in row and not any(line.startswith("needs repair") for line in under)


async def test_a_hint_the_copy_refused_shows_quarantined_until_a_repair(
    servers: list[LocalChromaServer], tmp_path: Path
) -> None:
    with FaultProxy(servers[1].host, servers[1].port) as proxy:
        topology = Topology.build(pair_data(servers[0].url, proxy.url, tmp_path))
        async with client_for(topology) as writer:
            col = await writer.create_collection("refused", embedding_function=None)
            await col.add(ids=["a"], embeddings=emb(1))
            proxy.cut()
            with sharded_chroma.options(write_concern="one"):
                await col.upsert(ids=["b"], embeddings=emb(2))
            queue_refused_hint(writer, proxy.url)
            proxy.restore()
            assert await writer.replay_hints() == 2
        async with client_for(topology) as other:
            got = await status_of(other)
            copy = got[proxy.url]
            assert copy.needs_repair and copy.stale and copy.pending_hints == 0
            assert copy.quarantined_hints == 1
            assert copy.repair_reason is not None and "refused" in copy.repair_reason
            row, under = row_of(render_status(tuple(got.values())), proxy.url)
            assert "needs repair" in row
            assert under[0].startswith("needs repair: hint ")
            assert "1 hints quarantined" in under[1]
            await repair(other)
            after = (await status_of(other))[proxy.url]
            assert not after.needs_repair and after.quarantined_hints == 0 and not after.stale
            row, under = row_of(render_status(await other.status()), proxy.url)
            assert "current" in row and not any("quarantined" in line for line in under)
