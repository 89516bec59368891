"""A move on replicated shards: a write mirrored while one copy was down is hinted for that
copy, and the migration's filter deletes (cleanup's old copies, an abort's incoming ones) must
come after it on that copy: a delete leaves no tombstone, so one replayed out of order would
leave a deleted copy there for good. The copy is behind while the hint waits, so the delete,
sent at concern `all`, fails until the hint is replayed; the migration replays it first.

Replay in the background is off, so nobody else replays the hints; without the migration's
replay the step fails (its deletes cannot be met)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import sharded_chroma
from sharded_chroma import HashPolicy
from sharded_chroma.rebalance import plan_hash
from tests._nodes import node_records
from tests._proxy import FaultProxy
from tests.test_concurrent_writes import NAME
from tests.test_rebalance_review import Stop, stop_at

pytestmark = pytest.mark.anyio

THREE = ("s0", "s1", "s2")
OLD = HashPolicy(shards=THREE)
NEW = plan_hash(OLD, weights={"s0": 1, "s1": 1, "s2": 2}).goal
IDS = [f"r{i}" for i in range(120)]
MOVING = [r for r in IDS if OLD.place(r, None).shard == "s0" and NEW.place(r, None).shard == "s2"]


def topology(urls: list[str], replica: str, on: str, tmp_path: Path) -> dict[str, Any]:
    shards: list[dict[str, Any]] = [{"name": f"s{i}", "primary": u} for i, u in enumerate(urls)]
    next(s for s in shards if s["name"] == on)["replicas"] = [replica]
    return {
        "shards": shards,
        "replication": {
            "hints_dir": str(tmp_path / "hints"),
            "replay_in_background": False,
            "node_retry_after": 0.1,
        },
        "control": {"backend": "sqlite", "path": str(tmp_path / "c.db"), "lease_ttl": 4.0},
    }


@pytest.mark.parametrize(("ending", "replicated"), [("cleanup", "s0"), ("abort", "s2")])
async def test_hints_of_a_move_land_before_its_filter_deletes(
    shard_urls: list[str], oracle_url: str, tmp_path: Path, ending: str, replicated: str
) -> None:
    assert len(MOVING) >= 5
    where = urlsplit(oracle_url)
    assert where.hostname is not None and where.port is not None
    with FaultProxy(where.hostname, where.port) as proxy:
        spec = topology(shard_urls, proxy.url, replicated, tmp_path)
        primary = shard_urls[int(replicated[1])]
        async with await sharded_chroma.AsyncHttpClient(
            topology=sharded_chroma.Topology.build(spec)
        ) as client:
            col = await client.create_collection(NAME, embedding_function=None, policy=OLD)
            await col.add(ids=IDS, embeddings=[[float(i), 1.0, 0.0] for i in range(len(IDS))])
            with pytest.raises(Stop):
                await client.rebalance(NAME, NEW, batch=20, progress=stop_at("verify"))
            assert (await client.partition_map(NAME)).phase == "dual"
            # In dual the moving records are written at both places; the replica misses it.
            proxy.cut()
            with sharded_chroma.options(write_concern="one"):
                await col.upsert(
                    ids=MOVING,
                    embeddings=[[0.5, 0.5, 0.5]] * len(MOVING),
                    documents=["while one copy was down"] * len(MOVING),
                )
            pending = await client._runtime.cluster.pending_hints()
            assert pending.get(proxy.url), pending
            proxy.restore()
            if ending == "cleanup":
                report = await client.rebalance(NAME)
                assert report.steps[-1] == "done"
            else:
                report = await client.abort_rebalance(NAME)
                assert report.steps[-1] == "aborted"
            assert await client._runtime.cluster.pending_hints() == {}
            # A replay now (what a background replayer would do late) finds nothing to bring back.
            assert await client.replay_hints() == 0
            listed = await col.get(include=["documents"])
            assert sorted(listed["ids"]) == sorted(IDS)
            moved = dict(zip(listed["ids"], listed["documents"] or [], strict=True))
            assert {moved[r] for r in MOVING} == {"while one copy was down"}
        held, expected = await node_records(proxy.url, NAME), await node_records(primary, NAME)
        assert sorted(held) == sorted(expected), (
            f"the replica of {replicated} holds {sorted(set(held) - set(expected))[:5]} its "
            f"primary does not, and misses {sorted(set(expected) - set(held))[:5]}"
        )
        assert held == expected
        final = NEW if ending == "cleanup" else OLD
        assert all(final.place(r, None).shard == replicated for r in held)
