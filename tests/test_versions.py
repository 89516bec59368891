"""Record versions across parts, against real servers: an id met in two parts (another process
racing, a move caught half-way) reads as its newest copy, and the older copy is removed."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

import sharded_chroma
from sharded_chroma import FieldPolicy
from tests._nodes import drop_official_http_pools, node_records, official

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("official_pools")]

REGIONS = FieldPolicy(field="region", partitions={"eu": ["s0"], "us": ["s1"], "ap": ["s2"]})


async def plant(url: str, name: str, rid: str, meta: dict[str, Any], doc: str) -> None:
    """Write one record straight into a node, hidden keys and all, as another process
    caught between its two steps would have left it."""
    col = await (await official(url)).get_collection(name, embedding_function=None)
    await col.add(ids=[rid], embeddings=[[9.0, 9.0, 9.0]], metadatas=[meta], documents=[doc])
    await drop_official_http_pools()


async def stored_meta(url: str, name: str, rid: str) -> dict[str, Any] | None:
    held = await node_records(url, name)
    await drop_official_http_pools()
    return held[rid][1] if rid in held else None


@pytest.fixture
async def regional(shard_urls: list[str]) -> Any:
    # Repair at once: these tests plant the older copy themselves, no move is under way.
    topology = sharded_chroma.Topology.from_urls(shard_urls, repair_after=0)
    client = await sharded_chroma.AsyncHttpClient(topology=topology)
    col = await client.create_collection("versions", embedding_function=None, policy=REGIONS)
    await col.add(
        ids=["x", "y"],
        embeddings=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
        metadatas=[{"region": "eu", "n": 1}, {"region": "us"}],
        documents=["x-eu", "y"],
    )
    try:
        yield col
    finally:
        await client.aclose()


async def test_an_older_copy_elsewhere_is_ignored_and_removed(
    regional: Any, shard_urls: list[str]
) -> None:
    live = await stored_meta(shard_urls[0], "versions", "x")
    assert live is not None and live["_sc_ver"] > 0
    older = {"region": "ap", "_sc_seq": 1, "_sc_ver": live["_sc_ver"] - 1}
    await plant(shard_urls[2], "versions", "x", older, "x-ap-old")
    assert await regional.count() == 3  # counts are per part: the copy is there

    got = await regional.get(ids=["x"], include=["documents", "metadatas"])
    assert got["ids"] == ["x"] and got["documents"] == ["x-eu"]
    assert got["metadatas"] == [{"region": "eu", "n": 1}]
    # The read removed the older copy; the newer one stays where it was.
    assert await stored_meta(shard_urls[2], "versions", "x") is None
    assert await stored_meta(shard_urls[0], "versions", "x") is not None
    assert await regional.count() == 2


async def test_a_newer_copy_elsewhere_wins(regional: Any, shard_urls: list[str]) -> None:
    live = await stored_meta(shard_urls[0], "versions", "x")
    assert live is not None
    newer = {"region": "ap", "_sc_seq": live["_sc_seq"] + 5, "_sc_ver": live["_sc_ver"] + 5}
    await plant(shard_urls[2], "versions", "x", newer, "x-ap-new")
    whole = await regional.get(include=["documents"])
    assert sorted(whole["ids"]) == ["x", "y"]
    assert dict(zip(whole["ids"], whole["documents"] or [], strict=True))["x"] == "x-ap-new"
    assert await stored_meta(shard_urls[0], "versions", "x") is None
    assert await stored_meta(shard_urls[2], "versions", "x") is not None


async def test_query_returns_one_row_per_id_the_newest(
    regional: Any, shard_urls: list[str]
) -> None:
    live = await stored_meta(shard_urls[0], "versions", "x")
    assert live is not None
    older = {"region": "ap", "_sc_seq": 1, "_sc_ver": live["_sc_ver"] - 1}
    await plant(shard_urls[2], "versions", "x", older, "x-ap-old")
    hits = await regional.query(query_embeddings=[[9.0, 9.0, 9.0]], n_results=5)
    assert sorted(hits["ids"][0]) == ["x", "y"]
    docs = dict(zip(hits["ids"][0], (hits["documents"] or [[]])[0], strict=True))
    assert docs["x"] == "x-eu"
    assert await stored_meta(shard_urls[2], "versions", "x") is None


async def test_scan_yields_each_id_once(regional: Any, shard_urls: list[str]) -> None:
    live = await stored_meta(shard_urls[0], "versions", "x")
    assert live is not None
    older = {"region": "ap", "_sc_seq": 1, "_sc_ver": live["_sc_ver"] - 1}
    await plant(shard_urls[2], "versions", "x", older, "x-ap-old")
    seen = [i async for page in regional.scan(batch_size=1) for i in page["ids"]]
    assert sorted(seen) == ["x", "y"]


async def test_removal_relies_on_ids_and_where_as_one_condition(
    regional: Any, shard_urls: list[str]
) -> None:
    """Read repair removes an older copy with `ids + where _sc_ver == seen`: Chroma must treat
    that as one condition, so a copy that moved on since the read is left alone."""
    live = await stored_meta(shard_urls[0], "versions", "x")
    assert live is not None
    col = await (await official(shard_urls[2])).get_collection("versions", embedding_function=None)
    await col.add(
        ids=["x"],
        embeddings=[[9.0, 9.0, 9.0]],
        metadatas=[{"region": "ap", "_sc_seq": 1, "_sc_ver": live["_sc_ver"] + 10}],
    )
    # A delete conditioned on an old version leaves the copy that moved on alone.
    await col.delete(ids=["x"], where={"_sc_ver": live["_sc_ver"] - 1})
    assert await stored_meta(shard_urls[2], "versions", "x") is not None


async def test_a_young_newer_copy_leaves_the_older_one_for_later(
    regional: Any, shard_urls: list[str]
) -> None:
    """With the default delay a read returns the newer copy but removes nothing yet: the
    newer one may be half of a move another process is still finishing."""
    live = await stored_meta(shard_urls[0], "versions", "x")
    assert live is not None
    older = {"region": "ap", "_sc_seq": 1, "_sc_ver": live["_sc_ver"] - 1}
    await plant(shard_urls[2], "versions", "x", older, "x-ap-old")
    async with await sharded_chroma.AsyncHttpClient(shards=shard_urls) as patient:
        assert patient.topology.repair_after == 30.0
        col = await patient.get_collection("versions", embedding_function=None)
        got = await col.get(ids=["x"], include=["documents"])
        assert got["documents"] == ["x-eu"]
    assert await stored_meta(shard_urls[2], "versions", "x") is not None


async def test_deletes_leave_marks_that_go_with_their_collection(
    regional: Any, shard_urls: list[str]
) -> None:
    """A delete by id under a policy that can move records marks the ids first (a move under
    way elsewhere then knows the record was deleted); the marks are invisible and go with
    the collection."""
    await regional.delete(ids=["x"])
    assert (await regional.get())["ids"] == ["y"]
    marks = await companion(shard_urls[0])
    assert list(marks) == [f"{regional.id}-tombstones"]
    held = marks[f"{regional.id}-tombstones"]
    assert list(held) == ["x"] and held["x"]["_sc_ver"] > 0
    async with await sharded_chroma.AsyncHttpClient(shards=shard_urls) as other:
        assert [c.name for c in await other.list_collections()] == ["versions"]
        status = await other.status()
        assert all("/" not in c.name for s in status for c in s.collections)
        await other.delete_collection("versions")
    assert await companion(shard_urls[0]) == {}


async def companion(url: str) -> dict[str, dict[str, Any]]:
    """Every collection of the companion database on one node: name -> id -> metadata."""
    base = "/api/v2/tenants/default_tenant/databases/default_database.sc-parts/collections"
    out: dict[str, dict[str, Any]] = {}
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http:
        listed = await http.get(base)
        if listed.status_code == 404:
            return out
        listed.raise_for_status()
        for col in listed.json():
            got = await http.post(f"{base}/{col['id']}/get", json={"include": ["metadatas"]})
            got.raise_for_status()
            body = got.json()
            out[col["name"]] = dict(zip(body["ids"], body["metadatas"], strict=True))
    return out


async def test_delete_by_ids_and_filter_asks_once_under_hash(shard_urls: list[str]) -> None:
    """Ids that do not match the filter are not a race: no second round of requests."""
    async with await sharded_chroma.AsyncHttpClient(shards=shard_urls) as client:
        col = await client.create_collection("plain", embedding_function=None)
        ids = [f"h{i}" for i in range(12)]
        await col.add(
            ids=ids,
            embeddings=[[float(i), 0.0, 1.0] for i in range(12)],
            metadatas=[{"even": i % 2 == 0} for i in range(12)],
        )
        before = {u: s.requests for u, s in client.node_stats().items()}
        await col.delete(ids=ids, where={"even": True})
        after = {u: s.requests for u, s in client.node_stats().items()}
        assert sorted((await col.get())["ids"]) == sorted(ids[1::2])
        # One delete per shard owning some of the ids (and no look-up under hash of the id).
        assert sum(after.values()) - sum(before.values()) <= len(shard_urls)


async def test_an_upsert_racing_a_delete_brings_the_record_back_with_its_sequence(
    shard_urls: list[str],
) -> None:
    """Another process deletes the record between this upsert's look-up and its write: the
    upsert recreates it, with the sequence it was found with, so sequence-range pages see it."""
    client = await sharded_chroma.AsyncHttpClient(shards=shard_urls[:1])
    other = await sharded_chroma.AsyncHttpClient(shards=shard_urls[:1])
    try:
        col = await client.create_collection("upsert-race", embedding_function=None)
        await col.add(ids=["r"], embeddings=[[1.0, 0.0, 0.0]], documents=["v1"])
        seq = (await stored_meta(shard_urls[0], "upsert-race", "r") or {})["_sc_seq"]
        col_other = await other.get_collection("upsert-race", embedding_function=None)
        io = client._runtime.io
        looked_up = io.read

        async def read_then_race(target: Any, suffix: str, body: Any) -> Any:
            answer = await looked_up(target, suffix, body)
            if suffix == "/get" and body.get("ids") == ["r"]:
                await col_other.delete(ids=["r"])
            return answer

        io.read = read_then_race  # type: ignore[method-assign]
        await col.upsert(ids=["r"], embeddings=[[0.0, 1.0, 0.0]], documents=["v2"])
        io.read = looked_up  # type: ignore[method-assign]
        meta = await stored_meta(shard_urls[0], "upsert-race", "r")
        assert meta is not None and meta.get("_sc_seq") == seq
        pages = [p async for p in col.scan(batch_size=10)]
        assert [i for p in pages for i in p["ids"]] == ["r"]
    finally:
        await client.aclose()
        await other.aclose()
