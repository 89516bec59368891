"""Field, composite and time policies against real servers: placement read back from each
server directly, pruning seen in per-node request counters, results compared with one plain
Chroma server holding the same records, moves, errors, and retention by dropping buckets."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

import sharded_chroma
from sharded_chroma import (
    CompositePolicy,
    ConfigurationError,
    FieldPolicy,
    RoutingError,
    TimePolicy,
)
from tests._nodes import official

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("official_pools")]

DAY = 86400
T0 = 1_764_115_200  # 2025-11-26T00:00:00Z
BASE = "/api/v2/tenants/default_tenant/databases"
REGIONS = ["eu", "us", "ap", "de", "xx"]


def field_policy() -> FieldPolicy:
    return FieldPolicy(
        field="region",
        partitions={"eu": ("s0",), "us": ("s1", "s2"), "ap": ("s2",)},
        values={"de": "eu"},
        default="us",
    )


def time_policy() -> TimePolicy:
    return TimePolicy(field="ts", granularity="day", hot="s2", buckets={"2025-11-26": "s0"})


async def held(url: str, database: str = "default_database") -> dict[str, set[str]]:
    """Ids per physical collection name on one server, read with plain HTTP."""
    out: dict[str, set[str]] = {}
    async with httpx.AsyncClient(base_url=url) as http:
        listed = await http.get(f"{BASE}/{database}/collections")
        if listed.status_code == 404:
            return out
        for col in listed.json():
            got = await http.post(
                f"{BASE}/{database}/collections/{col['id']}/get", json={"include": []}
            )
            out[col["name"]] = set(got.json()["ids"])
    return out


def record(i: int, rng: random.Random) -> tuple[str, list[float], dict[str, Any]]:
    meta = {
        "region": rng.choice(REGIONS),
        "topic": rng.randrange(4),
        "ts": T0 + rng.randrange(-2 * DAY, 3 * DAY),
        "user": f"u{rng.randrange(6)}",
    }
    return f"r{i:04d}", [rng.random() for _ in range(8)], meta


async def fill(col: Any, n: int, seed: int = 7) -> list[tuple[str, list[float], dict[str, Any]]]:
    rng = random.Random(seed)
    recs = [record(i, rng) for i in range(n)]
    for start in range(0, n, 100):
        chunk = recs[start : start + 100]
        await col.add(
            ids=[r[0] for r in chunk],
            embeddings=[r[1] for r in chunk],
            metadatas=[r[2] for r in chunk],
            documents=[f"doc {r[0]}" for r in chunk],
        )
    return recs


async def test_field_policy_places_records_on_the_named_shards(
    sharded: Any, shard_urls: list[str]
) -> None:
    policy = field_policy()
    col = await sharded.create_collection("regions", embedding_function=None, policy=policy)
    recs = await fill(col, 120)
    names = ["s0", "s1", "s2"]
    for name, url in zip(names, shard_urls, strict=True):
        expected = {r[0] for r in recs if policy.place(r[0], r[2]).shard == name}
        assert (await held(url)).get("regions", set()) == expected, name
    assert {policy.place(r[0], r[2]).shard for r in recs} == set(names)
    assert await col.count() == 120
    assert (await sharded.get_collection("regions")).metadata is None
    assert await col.get_policy() == policy


async def test_time_policy_keeps_each_bucket_in_its_own_hidden_collection(
    sharded: Any, shard_urls: list[str]
) -> None:
    col = await sharded.create_collection("events", embedding_function=None, policy=time_policy())
    recs = await fill(col, 100)
    days = {r[0]: (r[2]["ts"] - T0) // DAY for r in recs}
    on_s0 = await held(shard_urls[0], "default_database.sc-parts")
    on_s2 = await held(shard_urls[2], "default_database.sc-parts")
    assert on_s0 == {f"{col.id}-2025-11-26": {i for i, d in days.items() if d == 0}}
    assert set(on_s2) == {
        f"{col.id}-{label}" for label in ("2025-11-24", "2025-11-25", "2025-11-27", "2025-11-28")
    }
    assert set().union(*on_s2.values()) == {i for i, d in days.items() if d != 0}
    assert await held(shard_urls[1], "default_database.sc-parts") == {}
    # The buckets are invisible as collections; the root holds no records.
    assert [c.name for c in await sharded.list_collections()] == ["events"]
    assert await sharded.count_collections() == 1
    assert all(not ids for ids in (await held(shard_urls[2])).values())
    assert await col.count() == 100


def _delta(before: dict[str, int], sharded: Any) -> dict[str, int]:
    return {u: s.requests - before[u] for u, s in sharded.node_stats().items()}


async def test_pruned_reads_reach_only_the_shards_they_must(
    sharded: Any, shard_urls: list[str]
) -> None:
    col = await sharded.create_collection("pruned", embedding_function=None, policy=field_policy())
    await fill(col, 60)
    await col.get(limit=1)  # physical ids are learnt once per node; keep that out of the counts
    cases = [
        ({"region": "eu"}, {0}),
        ({"region": {"$in": ["de", "ap"]}}, {0, 2}),
        ({"$and": [{"region": "eu"}, {"topic": 1}]}, {0}),
        ({"$or": [{"region": "eu"}, {"region": "ap"}]}, {0, 2}),
        ({"region": {"$nin": ["eu", "de"]}}, {1, 2}),
        ({"topic": 1}, {0, 1, 2}),
    ]
    for where, shards in cases:
        before = {u: s.requests for u, s in sharded.node_stats().items()}
        res = await col.query(
            query_embeddings=[[0.5] * 8], n_results=5, where=where, on_shard_error="partial"
        )
        asked = {i for i, u in enumerate(shard_urls) if _delta(before, sharded)[u] > 0}
        assert asked == shards, where
        cov = res["coverage"]
        assert set(cov.skipped) == {f"s{i}" for i in range(3)} - {f"s{i}" for i in shards}
        before = {u: s.requests for u, s in sharded.node_stats().items()}
        await col.get(where=where)
        asked = {i for i, u in enumerate(shard_urls) if _delta(before, sharded)[u] > 0}
        assert asked == shards, where
    # Without a default partition, a value no record can have asks nobody and finds nothing.
    strict = FieldPolicy(field="region", partitions={"eu": ("s0",), "us": ("s1",)})
    other = await sharded.create_collection("strict", embedding_function=None, policy=strict)
    await other.add(ids=["a"], embeddings=[[0.1] * 8], metadatas=[{"region": "eu"}])
    before = {u: s.requests for u, s in sharded.node_stats().items()}
    nothing = await other.get(where={"region": "zz"}, on_shard_error="partial")
    assert nothing["ids"] == [] and set(nothing["coverage"].skipped) == {"s0", "s1", "s2"}
    assert set(_delta(before, sharded).values()) == {0}


async def test_time_ranges_prune_buckets(sharded: Any, shard_urls: list[str]) -> None:
    col = await sharded.create_collection("ranged", embedding_function=None, policy=time_policy())
    recs = await fill(col, 80)
    await col.get(limit=1)
    before = {u: s.requests for u, s in sharded.node_stats().items()}
    where = {"$and": [{"ts": {"$gte": T0}}, {"ts": {"$lt": T0 + DAY}}]}
    got = await col.get(where=where, include=[])
    assert set(got["ids"]) == {r[0] for r in recs if T0 <= r[2]["ts"] < T0 + DAY}
    delta = _delta(before, sharded)
    # Day 0 is mapped to s0, and the hot shard may hold any unmapped day: s1 is never asked.
    assert delta[shard_urls[1]] == 0 and delta[shard_urls[0]] > 0


def random_where(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    if depth < 2 and rng.random() < 0.35:
        op = rng.choice(["$and", "$or"])
        return {op: [random_where(rng, depth + 1) for _ in range(rng.randint(2, 3))]}
    kind = rng.random()
    if kind < 0.3:
        return {"region": rng.choice(REGIONS)}
    if kind < 0.45:
        return {"region": {rng.choice(["$in", "$nin"]): rng.sample(REGIONS, rng.randint(1, 3))}}
    if kind < 0.55:
        return {"region": {"$ne": rng.choice(REGIONS)}}
    if kind < 0.75:
        op = rng.choice(["$gt", "$gte", "$lt", "$lte"])
        return {"ts": {op: T0 + rng.randrange(-2 * DAY, 3 * DAY)}}
    if kind < 0.85:
        return {"user": rng.choice(["u0", "u1", "u2"])}
    return {"topic": {rng.choice(["$eq", "$ne", "$gt"]): rng.randrange(4)}}


@pytest.mark.parametrize("kind", ["field", "composite", "time"])
async def test_random_filters_match_one_plain_server(
    sharded: Any, oracle_url: str, kind: str
) -> None:
    policy: Any = {
        "field": field_policy(),
        "composite": CompositePolicy(
            field="region",
            partitions={"eu": ("s0",), "us": ("s1", "s2"), "ap": ("s2",)},
            values={"de": "eu"},
            default="us",
            hash_key="user",
        ),
        "time": time_policy(),
    }[kind]
    col = await sharded.create_collection("diff", embedding_function=None, policy=policy)
    plain = await (await official(oracle_url)).create_collection("diff", embedding_function=None)
    await fill(col, 150, seed=11)
    await fill(plain, 150, seed=11)
    rng = random.Random(kind)
    for _ in range(40):
        where = random_where(rng)
        expected = await plain.get(where=where, include=["metadatas"])
        got = await col.get(where=where, include=["metadatas"])
        assert got["ids"] == expected["ids"], where
        assert got["metadatas"] == expected["metadatas"], where
        q = [rng.random() for _ in range(8)]
        e = await plain.query(query_embeddings=[q], n_results=5, where=where, include=[])
        g = await col.query(query_embeddings=[q], n_results=5, where=where, include=[])
        assert g["ids"] == e["ids"], where


async def test_routing_value_changes_move_records(
    sharded: Any, oracle_url: str, shard_urls: list[str]
) -> None:
    policy = field_policy()
    col = await sharded.create_collection("moves", embedding_function=None, policy=policy)
    plain = await (await official(oracle_url)).create_collection("moves", embedding_function=None)
    for c in (col, plain):
        await c.add(
            ids=["a", "b", "c"],
            embeddings=[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
            metadatas=[{"region": "eu", "k": 1}, {"region": "ap"}, {"region": "eu"}],
            documents=["da", "db", "dc"],
        )
        # upsert moves a (eu -> ap); update moves b (ap -> eu) keeping its document; c's
        # update does not touch the routing field and stays.
        await c.upsert(ids=["a"], embeddings=[[2.0, 0.0]], metadatas=[{"region": "ap"}])
        await c.update(ids=["b", "c"], metadatas=[{"region": "de", "k": 2}, {"k": 3}])
    full = ["embeddings", "metadatas", "documents"]
    got, expected = await col.get(include=full), await plain.get(include=full)
    # A moved record goes to the end of get() order (one server keeps its place).
    assert expected["ids"] == ["a", "b", "c"]
    assert got["ids"] == ["c", "a", "b"]

    def by_id(res: Any) -> dict[str, Any]:
        return {
            rid: (res["metadatas"][n], res["documents"][n], list(res["embeddings"][n]))
            for n, rid in enumerate(res["ids"])
        }

    assert by_id(got) == by_id(expected)
    assert (await held(shard_urls[0]))["moves"] == {"b", "c"}
    assert (await held(shard_urls[2]))["moves"] == {"a"}
    assert await col.count() == 3
    # A move by update costs: where is it (each shard), read it once, write it, ask for
    # deletes under way (see ops._tombstones), delete it.
    before = {u: s.requests for u, s in sharded.node_stats().items()}
    await col.update(ids=["c"], metadatas=[{"region": "ap"}])
    assert sum(_delta(before, sharded).values()) == 3 + 1 + 1 + 1 + 1
    assert (await held(shard_urls[2]))["moves"] == {"a", "c"}


async def test_moves_between_time_buckets(sharded: Any, shard_urls: list[str]) -> None:
    col = await sharded.create_collection("tmoves", embedding_function=None, policy=time_policy())
    await col.add(ids=["e"], embeddings=[[1.0, 2.0]], metadatas=[{"ts": T0 + 10}])
    await col.update(ids=["e"], metadatas=[{"ts": "2025-11-28T01:00:00Z"}])
    assert await held(shard_urls[0], "default_database.sc-parts") == {f"{col.id}-2025-11-26": set()}
    assert (await held(shard_urls[2], "default_database.sc-parts")) == {
        f"{col.id}-2025-11-28": {"e"}
    }
    got = await col.get(ids=["e"], include=["metadatas", "embeddings"])
    assert got["metadatas"] == [{"ts": "2025-11-28T01:00:00Z"}]
    assert list(got["embeddings"][0]) == [1.0, 2.0]


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"topic": 1}, "no value for the routing field 'region'"),
        ({"region": 3.5}, "string or integer"),
        ({"region": True}, "string or integer"),
        ({"region": "zz"}, "'zz' is not a known value"),
    ],
)
async def test_bad_routing_values_write_nothing(
    sharded: Any, shard_urls: list[str], metadata: dict[str, Any], message: str
) -> None:
    strict = FieldPolicy(field="region", partitions={"eu": ("s0",), "us": ("s1",)})
    col = await sharded.create_collection("bad", embedding_function=None, policy=strict)
    with pytest.raises(RoutingError, match=message):
        await col.add(
            ids=["ok", "bad"],
            embeddings=[[0.1, 0.2], [0.3, 0.4]],
            metadatas=[{"region": "eu"}, metadata],
        )
    assert await col.count() == 0
    await col.add(ids=["ok"], embeddings=[[0.1, 0.2]], metadatas=[{"region": "eu"}])
    with pytest.raises(RoutingError, match=message):
        await col.update(ids=["ok"], metadatas=[{**metadata, "region": metadata.get("region")}])
    assert (await col.get(include=["metadatas"]))["metadatas"] == [{"region": "eu"}]


@pytest.mark.parametrize("ts", ["yesterday", True, float("nan"), [1, 2], "2025-13-01"])
async def test_bad_time_values_write_nothing(sharded: Any, ts: Any) -> None:
    col = await sharded.create_collection("badtime", embedding_function=None, policy=time_policy())
    with pytest.raises(RoutingError, match="the time field 'ts'"):
        await col.add(
            ids=["ok", "bad"], embeddings=[[0.1], [0.2]], metadatas=[{"ts": T0}, {"ts": ts}]
        )
    assert await col.count() == 0


async def test_policy_is_the_clusters(sharded: Any, shard_urls: list[str]) -> None:
    await sharded.create_collection("owned", embedding_function=None, policy=field_policy())
    other = await sharded_chroma.AsyncHttpClient(shards=shard_urls)
    try:
        col = await other.get_collection("owned", embedding_function=None)
        assert await col.get_policy() == field_policy()
        await col.add(ids=["x"], embeddings=[[0.0]], metadatas=[{"region": "ap"}])
        assert (await held(shard_urls[2]))["owned"] == {"x"}
        with pytest.raises(ConfigurationError, match="exists with policy"):
            await other.get_or_create_collection(
                "owned", embedding_function=None, policy=time_policy()
            )
        same = await other.get_or_create_collection(
            "owned", embedding_function=None, policy=field_policy()
        )
        assert same.id == col.id
    finally:
        await other.aclose()
    with pytest.raises(ConfigurationError, match="unknown shard"):
        await sharded.create_collection(
            "nowhere",
            embedding_function=None,
            policy=FieldPolicy(field="r", partitions={"a": ("s9",)}),
        )


async def test_drop_partitions_deletes_whole_buckets(sharded: Any, shard_urls: list[str]) -> None:
    col = await sharded.create_collection("retained", embedding_function=None, policy=time_policy())
    recs = await fill(col, 90)
    cutoff = "2025-11-26T12:00:00Z"  # inside day 0: that bucket is kept whole
    planned = await col.drop_partitions(cutoff, dry_run=True)
    assert planned == [("s2", "2025-11-24"), ("s2", "2025-11-25")]
    assert await col.count() == 90
    assert await col.drop_partitions(cutoff) == planned
    kept = {r[0] for r in recs if r[2]["ts"] >= T0}
    assert set((await col.get(include=[]))["ids"]) == kept
    assert await col.count() == len(kept)
    names = set(await held(shard_urls[2], "default_database.sc-parts"))
    assert names == {f"{col.id}-2025-11-27", f"{col.id}-2025-11-28"}
    assert await col.drop_partitions(cutoff) == []
    plain = await sharded.create_collection("plain", embedding_function=None)
    with pytest.raises(ValueError, match="only a time policy"):
        await plain.drop_partitions(cutoff)


async def test_delete_by_filter_and_id_under_a_field_policy(sharded: Any) -> None:
    col = await sharded.create_collection("dels", embedding_function=None, policy=field_policy())
    recs = await fill(col, 60)
    await col.delete(where={"region": "eu"})
    await col.delete(ids=[recs[0][0], recs[1][0]])
    left = {r[0] for r in recs[2:] if r[2]["region"] != "eu"}
    assert set((await col.get(include=[]))["ids"]) == left


async def test_delete_collection_removes_its_buckets(sharded: Any, shard_urls: list[str]) -> None:
    col = await sharded.create_collection("gone", embedding_function=None, policy=time_policy())
    keep = await sharded.create_collection("kept", embedding_function=None, policy=time_policy())
    await fill(col, 30)
    await fill(keep, 10)
    await sharded.delete_collection("gone")
    for url in shard_urls:
        names = set(await held(url, "default_database.sc-parts"))
        assert not any(n.startswith(str(col.id)) for n in names), url
    assert await keep.count() == 10
    again = await sharded.create_collection("gone", embedding_function=None, policy=time_policy())
    assert await again.count() == 0


async def test_a_bucket_dropped_by_another_client_is_made_again(
    sharded: Any, shard_urls: list[str]
) -> None:
    col = await sharded.create_collection("shared", embedding_function=None, policy=time_policy())
    await col.add(ids=["a"], embeddings=[[0.1, 0.2]], metadatas=[{"ts": T0 - DAY}])
    other = await sharded_chroma.AsyncHttpClient(shards=shard_urls)
    try:
        theirs = await other.get_collection("shared", embedding_function=None)
        assert await theirs.drop_partitions(T0) == [("s2", "2025-11-25")]
    finally:
        await other.aclose()
    # This client still knows the dropped bucket's physical ids.
    assert await col.count() == 0
    assert (await col.get())["ids"] == []
    await col.add(ids=["b"], embeddings=[[0.3, 0.4]], metadatas=[{"ts": T0 - DAY + 5}])
    assert (await col.get())["ids"] == ["b"]
    res = await col.query(query_embeddings=[[0.3, 0.4]], n_results=3, include=[])
    assert res["ids"] == [["b"]]
    # Dropped and made again by the other client: this one's ids for it are stale.
    other = await sharded_chroma.AsyncHttpClient(shards=shard_urls)
    try:
        theirs = await other.get_collection("shared", embedding_function=None)
        await theirs.drop_partitions(T0)
        await theirs.add(ids=["c"], embeddings=[[0.5, 0.6]], metadatas=[{"ts": T0 - DAY}])
    finally:
        await other.aclose()
    assert await col.count() == 1
    assert (await col.get())["ids"] == ["c"]


async def test_configuration_changes_reach_the_buckets(sharded: Any, shard_urls: list[str]) -> None:
    col = await sharded.create_collection(
        "tuned",
        embedding_function=None,
        policy=time_policy(),
        configuration={"hnsw": {"space": "cosine", "ef_search": 50}},
    )
    await col.add(ids=["a"], embeddings=[[0.1, 0.2]], metadatas=[{"ts": T0}])
    await col.modify(configuration={"hnsw": {"ef_search": 77}})
    await col.add(ids=["b"], embeddings=[[0.1, 0.3]], metadatas=[{"ts": T0 + 3 * DAY}])
    async with httpx.AsyncClient(base_url=shard_urls[0]) as http:
        listed = (await http.get(f"{BASE}/default_database.sc-parts/collections")).json()
    async with httpx.AsyncClient(base_url=shard_urls[2]) as http:
        listed += (await http.get(f"{BASE}/default_database.sc-parts/collections")).json()
    hnsw = {c["name"]: c["configuration_json"]["hnsw"] for c in listed}
    assert len(hnsw) == 2
    assert all(h["ef_search"] == 77 and h["space"] == "cosine" for h in hnsw.values()), hnsw


async def test_policies_from_a_topology_file(tmp_path: Any, shard_urls: list[str]) -> None:
    path = tmp_path / "cluster.toml"
    shards = "\n".join(
        f'[[shards]]\nname = "s{i}"\nprimary = "{url}"\n' for i, url in enumerate(shard_urls)
    )
    path.write_text(
        shards
        + """
[policies.logs]
kind = "time"
field = "ts"
granularity = "month"
hot = "s1"

[policies.tenants]
kind = "field"
field = "tenant"
default = "rest"
[policies.tenants.partitions]
big = ["s0"]
rest = ["s1", "s2"]
""",
        encoding="utf-8",
    )
    topo = sharded_chroma.Topology.from_toml(path)
    async with sharded_chroma.ShardedClient(topo) as c:
        logs = await c.create_collection("logs", embedding_function=None)
        assert isinstance(await logs.get_policy(), TimePolicy)
        await logs.add(ids=["l"], embeddings=[[1.0]], metadatas=[{"ts": "2025-11-26"}])
        assert set(await held(shard_urls[1], "default_database.sc-parts")) == {f"{logs.id}-2025-11"}
        tenants = await c.create_collection("tenants", embedding_function=None)
        await tenants.add(ids=["t"], embeddings=[[1.0]], metadatas=[{"tenant": "big"}])
        assert (await held(shard_urls[0]))["tenants"] == {"t"}
        # A client whose file declares another policy for an existing collection is refused.
        other = topo.model_copy(update={"policies": {"tenants": time_policy()}})
        async with sharded_chroma.ShardedClient(other) as c2:
            with pytest.raises(ConfigurationError, match="exists with policy"):
                await c2.get_collection("tenants", embedding_function=None)


async def test_the_dimension_is_the_clusters_under_a_time_policy(
    sharded: Any, shard_urls: list[str]
) -> None:
    col = await sharded.create_collection("dims", embedding_function=None, policy=time_policy())
    await col.add(ids=["a"], embeddings=[[0.1, 0.2, 0.3]], metadatas=[{"ts": T0}])
    other = await sharded_chroma.AsyncHttpClient(shards=shard_urls)
    try:
        theirs = await other.get_collection("dims", embedding_function=None)
        # Another day lands in another (new) bucket on another shard: still refused.
        with pytest.raises(Exception, match="dimension of 3, got 2"):
            await theirs.add(ids=["b"], embeddings=[[0.1, 0.2]], metadatas=[{"ts": T0 + DAY}])
    finally:
        await other.aclose()
    assert await col.count() == 1


@pytest.mark.parametrize("kind", ["composite", "time"])
async def test_random_moves_lose_and_duplicate_nothing(
    sharded: Any, oracle_url: str, shard_urls: list[str], kind: str
) -> None:
    policy: Any = (
        CompositePolicy(
            field="region",
            partitions={"eu": ("s0",), "us": ("s1", "s2"), "ap": ("s2",)},
            values={"de": "eu"},
            default="us",
            hash_key="user",
        )
        if kind == "composite"
        else time_policy()
    )
    col = await sharded.create_collection("churn", embedding_function=None, policy=policy)
    plain = await (await official(oracle_url)).create_collection("churn", embedding_function=None)
    recs = await fill(col, 40, seed=3)
    await fill(plain, 40, seed=3)
    rng = random.Random(kind)
    for step in range(30):
        rid = rng.choice(recs)[0]
        change = {
            "region": rng.choice(REGIONS),
            "user": f"u{rng.randrange(6)}",
            "ts": T0 + rng.randrange(-2 * DAY, 3 * DAY),
        }
        meta = dict(rng.sample(sorted(change.items()), rng.randint(1, 3)))
        emb = [rng.random() for _ in range(8)]
        partial_update = rng.random() < 0.5
        full = {**(await plain.get(ids=[rid]))["metadatas"][0], **change}
        for c in (col, plain):
            if partial_update:
                # With documents, embeddings are given too: chromadb would otherwise embed
                # the documents with its default model.
                await c.update(
                    ids=[rid], metadatas=[meta], documents=[f"step {step}"], embeddings=[emb]
                )
            else:
                await c.upsert(ids=[rid], embeddings=[emb], metadatas=[full])
    want = await plain.get(include=["metadatas", "documents"])
    got = await col.get(include=["metadatas", "documents"])
    assert sorted(got["ids"]) == sorted(want["ids"])
    by_id = dict(
        zip(want["ids"], zip(want["metadatas"], want["documents"], strict=True), strict=True)
    )
    for n, rid in enumerate(got["ids"]):
        assert (got["metadatas"][n], got["documents"][n]) == by_id[rid], rid
    # Every record is held exactly once across all physical collections of all shards.
    seen: list[str] = []
    for url in shard_urls:
        for database in ("default_database", "default_database.sc-parts"):
            for name, ids in (await held(url, database)).items():
                if name == "churn" or name.startswith(str(col.id)):
                    seen.extend(ids)
    assert sorted(seen) == sorted(want["ids"])
    assert await col.count() == len(want["ids"])


async def test_scan_and_paging_over_time_buckets(sharded: Any) -> None:
    col = await sharded.create_collection("scanned", embedding_function=None, policy=time_policy())
    await fill(col, 70)
    everything = (await col.get(include=["metadatas"]))["ids"]
    assert len(everything) == 70
    scanned = [i async for page in col.scan(batch_size=8, include=[]) for i in page["ids"]]
    assert scanned == everything
    assert (await col.get(limit=9, offset=20, include=[]))["ids"] == everything[20:29]
    where = {"ts": {"$gte": T0 + 50 * DAY}}  # no bucket that late
    assert [p async for p in col.scan(batch_size=8, where=where)] == []
    assert (await col.peek(3))["ids"] == everything[:3]


async def test_bounded_time_filters_address_their_buckets_by_name(
    sharded: Any, shard_urls: list[str]
) -> None:
    col = await sharded.create_collection("direct", embedding_function=None, policy=time_policy())
    await col.add(ids=["d0"], embeddings=[[0.1, 0.2]], metadatas=[{"ts": T0 + 60}])
    day0 = {"$and": [{"ts": {"$gte": T0}}, {"ts": {"$lt": T0 + DAY}}]}
    assert (await col.get(where=day0))["ids"] == ["d0"]  # learns the bucket's physical ids
    before = {u: s.requests for u, s in sharded.node_stats().items()}
    res = await col.query(
        query_embeddings=[[0.1, 0.2]], n_results=3, where=day0, on_shard_error="partial"
    )
    assert res["ids"] == [["d0"]]
    # One request to the one shard holding that day; the hot shard is not asked.
    assert _delta(before, sharded) == {shard_urls[0]: 1, shard_urls[1]: 0, shard_urls[2]: 0}
    assert set(res["coverage"].skipped) == {"s1", "s2"}
    # A day with no bucket yet reads as empty...
    day3 = {"$and": [{"ts": {"$gte": T0 + 3 * DAY}}, {"ts": {"$lte": T0 + 3 * DAY + 10}}]}
    assert (await col.get(where=day3))["ids"] == []
    # ...until another process writes into it: then it is found by name at once.
    other = await sharded_chroma.AsyncHttpClient(shards=shard_urls)
    try:
        theirs = await other.get_collection("direct", embedding_function=None)
        await theirs.add(ids=["d3"], embeddings=[[0.3, 0.4]], metadatas=[{"ts": T0 + 3 * DAY}])
    finally:
        await other.aclose()
    assert (await col.get(where=day3))["ids"] == ["d3"]
    got = await col.query(query_embeddings=[[0.3, 0.4]], n_results=2, where=day3, include=[])
    assert got["ids"] == [["d3"]]


async def test_pruned_reads_survive_a_dead_shard_they_do_not_need(
    shard_urls: list[str], cluster_servers: Any
) -> None:
    topology = sharded_chroma.Topology.build(
        {
            "shards": [{"name": f"s{i}", "primary": u} for i, u in enumerate(shard_urls)],
            "defaults": {"timeout": 5.0, "connect_timeout": 1.0},
            "replication": {"retries": 0},
        }
    )
    async with await sharded_chroma.AsyncHttpClient(topology=topology) as c:
        regions = await c.create_collection("alive", embedding_function=None, policy=field_policy())
        events = await c.create_collection("alive-t", embedding_function=None, policy=time_policy())
        recs = await fill(regions, 60)
        await fill(events, 60)
        victim = cluster_servers[2]  # s2: "ap", half of "us", and every time bucket but day 0
        victim.kill()
        try:
            # A filter pinned to shards that answer needs nothing from s2: no error at all.
            eu = await regions.get(where={"region": "eu"}, include=[])
            assert set(eu["ids"]) == {r[0] for r in recs if r[2]["region"] == "eu"}
            day0 = {"$and": [{"ts": {"$gte": T0}}, {"ts": {"$lt": T0 + DAY}}]}
            assert len((await events.get(where=day0, include=[]))["ids"]) == sum(
                T0 <= r[2]["ts"] < T0 + DAY for r in recs
            )
            # An unpruned read names the dead shard, or answers partially with coverage.
            with pytest.raises(sharded_chroma.ShardFailureError, match="s2"):
                await regions.get(include=[])
            with pytest.raises(sharded_chroma.ShardFailureError, match="s2"):
                await events.get(include=[])
            part = await regions.get(include=[], on_shard_error="partial")
            assert set(part["coverage"].failed) == {"s2"}
            assert set(part["ids"]) == {
                r[0] for r in recs if field_policy().place(r[0], r[2]).shard != "s2"
            }
            later = await events.get(include=[], on_shard_error="partial")
            assert set(later["coverage"].failed) == {"s2"}
            assert set(later["ids"]) == {r[0] for r in recs if T0 <= r[2]["ts"] < T0 + DAY}
        finally:
            victim.restart()
