"""Rebuild: a collection copied into a fresh generation of physical collections with new index
parameters and swapped in, against real Chroma servers and a real control store, with writer
processes and tasks on the same ids throughout; judged by the history checker afterwards."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

import sharded_chroma
from sharded_chroma import ConfigurationError, HashPolicy
from sharded_chroma.rebalance import plan_hash
from tests._rebalancing import topology_for
from tests.test_concurrent_writes import (
    NAME,
    POLICIES,
    Log,
    assert_busy,
    raw_parts,
    skip_unless_slow,
)
from tests.test_rebalance import control_table, final_checks, preload, run_migration_under_writers

pytestmark = pytest.mark.anyio

IDS = 90
BASE = "/api/v2/tenants/default_tenant/databases"
PARTS_DB = "default_database.sc-parts"


def sqlite_topology(urls: list[str], tmp_path: Path, name: str = "c.db") -> dict[str, Any]:
    return topology_for(urls, {"backend": "sqlite", "path": str(tmp_path / name)})


async def client_of(topology: dict[str, Any]) -> Any:
    return await sharded_chroma.AsyncHttpClient(topology=sharded_chroma.Topology.build(topology))


async def generations_on(url: str, cluster_id: str) -> dict[int, dict[str, Any]]:
    """A server's generation collections of the collection (number -> raw model), read with
    plain HTTP."""
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http:
        listed = await http.get(f"{BASE}/{PARTS_DB}/collections")
        if listed.status_code == 404:
            return {}
        listed.raise_for_status()
        out = {}
        for col in listed.json():
            meta = col.get("metadata") or {}
            if meta.get("_sc_parent") == cluster_id and meta.get("_sc_gen"):
                out[int(meta["_sc_gen"])] = col
        return out


def root_ids(parts: dict[str, list[str]]) -> list[str]:
    return [rid for key, ids in parts.items() if key.endswith(f"/{NAME}") for rid in ids]


def gen_ids(parts: dict[str, list[str]], generation: int) -> list[str]:
    return [rid for key, ids in parts.items() if key.endswith(f"-gen{generation}") for rid in ids]


async def test_a_rebuild_swaps_in_a_new_generation_with_the_new_parameters(
    shard_urls: list[str], tmp_path: Path
) -> None:
    topology = sqlite_topology(shard_urls, tmp_path)
    async with await client_of(topology) as client:
        col = await client.create_collection(NAME, embedding_function=None, policy=HashPolicy())
        await preload(col, Log(), IDS)
        before = await col.get(include=["metadatas", "documents", "embeddings"])
        probe = [[0.3, 0.2, 0.3]]
        nearest = await col.query(query_embeddings=probe, n_results=7)

        report = await client.rebuild(NAME, {"max_neighbors": 24, "ef_construction": 150})
        assert report.steps[-1] == "done", report
        assert report.copied == IDS

        current = await client.partition_map(NAME)
        assert (current.phase, current.generation) == ("stable", 1)
        after = await col.get(include=["metadatas", "documents", "embeddings"])
        assert after["ids"] == before["ids"]
        assert after["metadatas"] == before["metadatas"]
        assert after["documents"] == before["documents"]
        assert [list(e) for e in after["embeddings"]] == [list(e) for e in before["embeddings"]]
        again = await col.query(query_embeddings=probe, n_results=7)
        assert again["ids"] == nearest["ids"]
        assert await col.count() == IDS

        parts = await raw_parts(shard_urls, str(col.id))
        assert root_ids(parts) == [], "the root collections were not emptied"
        assert sorted(gen_ids(parts, 1)) == sorted(before["ids"])
        for url in shard_urls:
            hnsw = (await generations_on(url, str(col.id)))[1]["configuration_json"]["hnsw"]
            assert (hnsw["max_neighbors"], hnsw["ef_construction"]) == (24, 150)

        # The configuration users see is the new generation's (a fresh lookup, as another
        # process would make).
        async with await client_of(topology) as other:
            hnsw = (await other.get_collection(NAME, embedding_function=None)).configuration_json
            assert (hnsw["hnsw"]["max_neighbors"], hnsw["hnsw"]["ef_construction"]) == (24, 150)
        shown = [c for shard in await client.status() for c in shard.collections]
        assert sum(c.records for c in shown if c.name == f"{NAME}/gen1") == IDS
        assert sum(c.records for c in shown if c.name == NAME) == 0

        # Writes after the swap go to the new generation.
        await col.upsert(ids=["late"], embeddings=[[0.5, 0.5, 0.5]], metadatas=[{"w": "late"}])
        assert "late" in gen_ids(await raw_parts(shard_urls, str(col.id)), 1)
        assert await col.count() == IDS + 1


@pytest.mark.parametrize(
    ("hnsw", "says"),
    [
        ({"max_neighbours": 24}, "unknown hnsw parameter"),
        ({"max_neighbors": 0}, "positive int"),
        ({"ef_construction": 1.5}, "positive int"),
        ({"space": "cosine"}, "distance space"),
        ({"resize_factor": 0.5}, "at least 1"),
    ],
)
async def test_bad_parameters_are_refused_before_anything_is_written(
    shard_urls: list[str], tmp_path: Path, hnsw: dict[str, Any], says: str
) -> None:
    topology = sqlite_topology(shard_urls, tmp_path)
    async with await client_of(topology) as client:
        col = await client.create_collection(NAME, embedding_function=None, policy=HashPolicy())
        await preload(col, Log(), 12)
        with pytest.raises(ConfigurationError, match=says):
            await client.rebuild(NAME, hnsw)
        assert (await client.partition_map(NAME)).epoch == 0
        assert await client._live().rebalancing.migration(NAME) is None
        for url in shard_urls:
            assert await generations_on(url, str(col.id)) == {}


async def test_a_time_placed_collection_is_refused(shard_urls: list[str], tmp_path: Path) -> None:
    topology = sqlite_topology(shard_urls, tmp_path)
    async with await client_of(topology) as client:
        col = await client.create_collection(NAME, embedding_function=None, policy=POLICIES["time"])
        await preload(col, Log(), 12)
        with pytest.raises(ConfigurationError, match="time buckets"):
            await client.rebuild(NAME, {"max_neighbors": 24})
        assert await client._live().rebalancing.migration(NAME) is None


@pytest.mark.parametrize(
    ("kind", "backend"),
    # Under the field policy this is the long form: it failed once in three CI runs on the
    # known two-process windows of the design notes (an acknowledged upsert lost).
    [pytest.param("field", "sqlite", marks=pytest.mark.slow), ("hash", "etcd")],
)
def test_rebuild_under_two_writer_processes(
    shard_urls: list[str],
    tmp_path: Path,
    kind: str,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    """Two processes add, upsert (changing routing values under the field policy), update,
    delete, get and query the same ids while the collection is rebuilt: the history checker
    passes afterwards, every record is in the new generation only, where the policy puts it."""
    if kind == "field":
        skip_unless_slow(request.config)
    topology = topology_for(shard_urls, control_table(backend, tmp_path, request))

    async def rebuild(client: Any, goal: Any) -> Any:
        return await client.rebuild(NAME, {"max_neighbors": 20}, batch=25)

    report, goal, ops, errors, dupes = run_migration_under_writers(
        shard_urls, topology, tmp_path, POLICIES[kind], lambda p: p, 120.0, act=rebuild
    )
    assert report.steps[-1] == "done", report
    assert report.copied > 0
    assert not dupes, dupes[:5]
    assert_busy(ops, errors)
    final_checks(shard_urls, topology, goal, ops, errors)

    async def layout() -> tuple[dict[str, list[str]], int]:
        async with await client_of(topology) as client:
            col = await client.get_collection(NAME, embedding_function=None)
            generation = (await client.partition_map(NAME)).generation
            return await raw_parts(shard_urls, str(col.id)), generation

    parts, generation = asyncio.run(layout())
    assert generation == 1
    assert root_ids(parts) == [], "records left in the root collections"
    assert gen_ids(parts, 1), "nothing in the new generation"


async def test_rebuilt_twice_then_grown_and_opened_after_losing_the_map(
    shard_urls: list[str], oracle_url: str, tmp_path: Path
) -> None:
    """A second rebuild drops the first one's generation; a migration afterwards moves records
    within the serving generation (made on the new shard with its configuration); and a
    control store that lost the map opens the collection at the generation its root names."""
    urls = [*shard_urls, oracle_url]
    topology = sqlite_topology(urls, tmp_path)
    three = HashPolicy(shards=("s0", "s1", "s2"))
    async with await client_of(topology) as client:
        col = await client.create_collection(NAME, embedding_function=None, policy=three)
        await preload(col, Log(), IDS)
        before = await col.get(include=["metadatas", "documents"])
        await client.rebuild(NAME, {"max_neighbors": 24})
        await client.rebuild(NAME, {"ef_search": 40})
        assert (await client.partition_map(NAME)).generation == 2
        cid = str(col.id)
        for url in shard_urls:
            gens = await generations_on(url, cid)
            assert set(gens) == {2}, f"{url} holds generations {sorted(gens)}"
            hnsw = gens[2]["configuration_json"]["hnsw"]
            assert (hnsw["max_neighbors"], hnsw["ef_search"]) == (24, 40)

        goal = plan_hash(three, shards=["s0", "s1", "s2", "s3"]).goal
        report = await client.rebalance(NAME, goal, batch=25)
        assert report.steps[-1] == "done" and report.copied > 0
        current = await client.partition_map(NAME)
        assert (current.generation, current.policy) == (2, goal)
        assert set(await generations_on(oracle_url, cid)) == {2}
        parts = await raw_parts(urls, cid)
        assert root_ids(parts) == []
        on_s3 = [rid for key, ids in parts.items() if key.startswith("s3:") for rid in ids]
        assert on_s3 and all(goal.place(rid, None).shard == "s3" for rid in on_s3)
        after = await col.get(include=["metadatas", "documents"])
        assert (after["ids"], after["metadatas"]) == (before["ids"], before["metadatas"])

    # Another control store (the first one lost): the stored policy and generation decide.
    fresh = sqlite_topology(urls, tmp_path, "other.db")
    async with await client_of(fresh) as client:
        col = await client.get_collection(NAME, embedding_function=None)
        current = await client.partition_map(NAME)
        assert (current.epoch, current.generation, current.policy) == (0, 2, goal)
        assert (await col.get(include=[]))["ids"] == before["ids"]
        assert await col.count() == IDS
