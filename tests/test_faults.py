"""Faults against real Chroma servers: shards killed by pid, partial results, partial writes,
and where records physically land (checked with the official client, one server at a time).

Every test that kills a server restarts it before it ends: the servers are shared by the session.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings

import sharded_chroma
from sharded_chroma import (
    Coverage,
    NodeUnavailableError,
    PartialWriteError,
    ShardedClient,
    ShardFailureError,
)
from sharded_chroma._routing import SlotTable
from sharded_chroma.testing import LocalChromaServer
from tests._servers import crash

pytestmark = pytest.mark.anyio

NAMES = ("s0", "s1", "s2")
DIM = 8
TABLE = SlotTable.uniform(3)


@contextlib.contextmanager
def killed(server: LocalChromaServer) -> Iterator[None]:
    """SIGKILL ``server`` (a crash, by its pid) for the duration of the block, then restart it."""
    crash(server)
    try:
        yield
    finally:
        server.restart()


def _vectors(n: int, seed: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.random.default_rng(seed).random((n, DIM), dtype=np.float32)


async def _official(url: str) -> Any:
    parts = urlsplit(url)
    return await chromadb.AsyncHttpClient(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 8000,
        settings=Settings(anonymized_telemetry=False),
    )


async def _stored_ids(urls: Sequence[str], collection: str) -> list[list[str]]:
    """The ids each server physically holds for ``collection``, read with the official client."""
    out = []
    for url in urls:
        client = await _official(url)
        col = await client.get_collection(collection)
        out.append(list((await col.get(include=[]))["ids"]))
    return out


async def _client(urls: Sequence[str], **options: Any) -> ShardedClient:
    return await sharded_chroma.AsyncHttpClient(shards=list(urls), **options)


def _owner(key: str) -> str:
    return NAMES[TABLE.shard_for_key(key)]


# -- reads with a dead shard ------------------------------------------------------------------


async def test_dead_shard_reads_raise_or_return_partial_results(
    shard_urls: list[str], cluster_servers: list[LocalChromaServer]
) -> None:
    n = 150
    ids = [f"rec-{i}" for i in range(n)]
    emb = _vectors(n, seed=1)
    metas = [{"i": i, "parity": i % 2} for i in range(n)]
    docs = [f"document {i}" for i in range(n)]
    queries = _vectors(5, seed=2)
    client = await _client(shard_urls)
    try:
        col = await client.create_collection("faults-read", embedding_function=None)
        await col.add(ids=ids, embeddings=emb, metadatas=metas, documents=docs)
        stored = await _stored_ids(shard_urls, "faults-read")
        victim_index = 1
        dead, dead_url = NAMES[victim_index], shard_urls[victim_index]
        live_ids = {i for k, held in enumerate(stored) if k != victim_index for i in held}
        assert set(stored[victim_index]) and live_ids
        live_pos = [p for p, i in enumerate(ids) if i in live_ids]

        with killed(cluster_servers[victim_index]):
            # Default: one error naming exactly the dead shard and its node.
            with pytest.raises(ShardFailureError) as info:
                await col.query(query_embeddings=queries, n_results=10)
            err = info.value
            assert set(err.failures) == {dead}
            assert err.operation == "query"
            assert dead_url in str(err)
            assert repr(dead) in str(err)
            node_err = err.failures[dead]
            assert isinstance(node_err, NodeUnavailableError)
            assert err.__cause__ is node_err
            assert (node_err.shard, node_err.node) == (dead, dead_url)
            assert len(node_err.attempts) > 1, "an idempotent read is retried"
            assert node_err.__cause__ is not None, "the last attempt's exception is chained"
            assert isinstance(node_err, sharded_chroma.ShardedChromaError)

            with pytest.raises(ShardFailureError) as get_info:
                await col.get()
            assert set(get_info.value.failures) == {dead}
            with pytest.raises(ShardFailureError):
                await col.count()

            # Partial query: the exact top-k of the surviving records.
            res = await col.query(
                query_embeddings=queries,
                n_results=10,
                include=["distances", "metadatas", "documents"],
                on_shard_error="partial",
            )
            cov = res["coverage"]  # type: ignore[typeddict-item]
            assert isinstance(cov, Coverage)
            assert cov.asked == NAMES
            assert cov.answered == tuple(s for s in NAMES if s != dead)
            assert set(cov.failed) == {dead}
            assert dead_url in cov.failed[dead]
            assert not cov.complete
            live_emb = emb[live_pos]
            for q, row_ids, row_dist, row_meta, row_docs in zip(
                queries,
                res["ids"],
                res["distances"] or [],
                res["metadatas"] or [],
                res["documents"] or [],
                strict=True,
            ):
                d = ((live_emb - q) ** 2).sum(axis=1)  # Chroma's default space is squared l2
                best = np.argsort(d, kind="stable")[:10]
                assert row_ids == [ids[live_pos[b]] for b in best]
                np.testing.assert_allclose(row_dist, d[best], rtol=1e-4, atol=1e-5)
                assert row_meta == [metas[int(i.split("-")[1])] for i in row_ids]
                assert row_docs == [docs[int(i.split("-")[1])] for i in row_ids]

            # Partial get: the surviving records, in insertion order, with clean metadata.
            got = await col.get(on_shard_error="partial")
            assert got["ids"] == [ids[p] for p in live_pos]
            assert got["metadatas"] == [metas[p] for p in live_pos]
            assert got["documents"] == [docs[p] for p in live_pos]
            gcov = got["coverage"]  # type: ignore[typeddict-item]
            assert (gcov.asked, gcov.answered, set(gcov.failed)) == (
                NAMES,
                cov.answered,
                {dead},
            )
            limited = await col.get(limit=7, offset=3, on_shard_error="partial")
            assert limited["ids"] == got["ids"][3:10]

            # get by id asks only the owners: ids on live shards need no dead shard.
            some_live = [ids[p] for p in live_pos[:5]]
            assert (await col.get(ids=some_live))["ids"] == some_live
            one_dead = stored[victim_index][0]
            partial = await col.get(ids=[*some_live, one_dead], on_shard_error="partial")
            assert partial["ids"] == some_live
            pcov = partial["coverage"]  # type: ignore[typeddict-item]
            assert set(pcov.failed) == {dead}
            assert dead in pcov.asked

        # Back up: the same client answers completely again.
        res = await col.query(query_embeddings=queries, n_results=3, on_shard_error="partial")
        assert res["coverage"].complete  # type: ignore[typeddict-item]
        assert await col.count() == n
    finally:
        await client.aclose()


# -- writes with a dead shard -----------------------------------------------------------------


async def test_write_spanning_dead_shard_is_partial_then_repeatable(
    shard_urls: list[str], cluster_servers: list[LocalChromaServer]
) -> None:
    n = 60
    ids = [f"w-{i}" for i in range(n)]
    emb = _vectors(n, seed=3)
    metas = [{"i": i} for i in range(n)]
    victim_index = 2
    dead = NAMES[victim_index]
    routed_dead = [i for i in ids if _owner(i) == dead]
    assert routed_dead and len(routed_dead) < n
    client = await _client(shard_urls)
    try:
        col = await client.create_collection("faults-write", embedding_function=None)
        # Cache every shard's pre-flight facts first, so the failure below comes from the
        # write request itself (a cold client's pre-flight read to the dead node is retried).
        await client.get_max_batch_size()
        with killed(cluster_servers[victim_index]):
            with pytest.raises(PartialWriteError) as info:
                await col.add(ids=ids, embeddings=emb, metadatas=metas)
            err = info.value
            assert isinstance(err, ShardFailureError)
            assert err.operation == "add"
            assert set(err.failures) == {dead}
            assert err.unwritten_ids == {dead: routed_dead}
            assert shard_urls[victim_index] in str(err)
            assert f"{len(routed_dead)} id(s)" in str(err)
            node_err = err.failures[dead]
            assert isinstance(node_err, NodeUnavailableError)
            assert err.__cause__ is node_err
            assert node_err.__cause__ is not None
            assert node_err.node == shard_urls[victim_index]
            assert len(node_err.attempts) == 1, "a non-idempotent write is not retried"

            # The live shards hold exactly what was routed to them.
            live_urls = [u for k, u in enumerate(shard_urls) if k != victim_index]
            stored = await _stored_ids(live_urls, "faults-write")
            for url, held in zip(live_urls, stored, strict=True):
                name = NAMES[shard_urls.index(url)]
                assert sorted(held) == sorted(i for i in ids if _owner(i) == name)
            got = await col.get(on_shard_error="partial")
            assert got["ids"] == [i for i in ids if i not in set(routed_dead)]

            # update and delete by id are partial writes in the same way.
            new_metas = [{"i": -k} for k in range(n)]
            with pytest.raises(PartialWriteError) as upd:
                await col.update(ids=ids, metadatas=new_metas)
            assert upd.value.operation == "update"
            assert upd.value.unwritten_ids == {dead: routed_dead}
            got = await col.get(on_shard_error="partial")
            assert got["metadatas"] == [
                new_metas[k] for k, i in enumerate(ids) if i not in set(routed_dead)
            ]
            live_one = next(i for i in ids if _owner(i) != dead)
            with pytest.raises(PartialWriteError) as rm:
                await col.delete(ids=[live_one, routed_dead[0]])
            assert rm.value.operation == "delete"
            assert rm.value.unwritten_ids == {dead: [routed_dead[0]]}
            assert (await col.get(ids=[live_one]))["ids"] == []

        # After the restart, repeating the same write as an upsert completes it.
        await col.upsert(ids=ids, embeddings=emb, metadatas=metas)
        assert await col.count() == n
        got = await col.get(include=["embeddings", "metadatas"])
        assert sorted(got["ids"]) == sorted(ids)
        assert len(got["ids"]) == n
        by_id = {i: k for k, i in enumerate(got["ids"])}
        for k, i in enumerate(ids):
            np.testing.assert_allclose(got["embeddings"][by_id[i]], emb[k], rtol=1e-6)
            assert got["metadatas"][by_id[i]] == metas[k]
        stored = await _stored_ids(shard_urls, "faults-write")
        for name, held in zip(NAMES, stored, strict=True):
            assert sorted(held) == sorted(i for i in ids if _owner(i) == name)
        # And once more: still idempotent.
        await col.upsert(ids=ids, embeddings=emb, metadatas=metas)
        assert await col.count() == n
    finally:
        await client.aclose()


async def test_upsert_spanning_dead_shard_writes_live_shards(
    shard_urls: list[str], cluster_servers: list[LocalChromaServer]
) -> None:
    ids = [f"u-{i}" for i in range(40)]
    emb = _vectors(40, seed=4)
    victim_index = 0
    dead = NAMES[victim_index]
    client = await _client(shard_urls)
    try:
        col = await client.create_collection("faults-upsert", embedding_function=None)
        await client.get_max_batch_size()
        with killed(cluster_servers[victim_index]):
            with pytest.raises(PartialWriteError) as info:
                await col.upsert(ids=ids, embeddings=emb)
            assert info.value.unwritten_ids == {dead: [i for i in ids if _owner(i) == dead]}
            got = await col.get(on_shard_error="partial")
            assert sorted(got["ids"]) == sorted(i for i in ids if _owner(i) != dead)
    finally:
        await client.aclose()


async def test_cold_client_writes_to_live_shards_during_outage(
    shard_urls: list[str], cluster_servers: list[LocalChromaServer]
) -> None:
    victim_index = 1
    dead = NAMES[victim_index]
    live_ids = [i for i in (f"c-{k}" for k in range(60)) if _owner(i) != dead][:10]
    client = await _client(shard_urls)
    try:
        col = await client.create_collection("faults-cold", embedding_function=None)
        with killed(cluster_servers[victim_index]):
            await col.add(ids=live_ids, embeddings=_vectors(len(live_ids), seed=5))
            got = await col.get(on_shard_error="partial")
            assert sorted(got["ids"]) == sorted(live_ids)
    finally:
        await client.aclose()


# -- placement --------------------------------------------------------------------------------


async def test_records_live_on_exactly_the_routed_shard(shard_urls: list[str]) -> None:
    n = 300
    ids = [f"doc-{i}" for i in range(n)]
    client = await _client(shard_urls)
    try:
        col = await client.create_collection("placement", embedding_function=None)
        await col.add(ids=ids, embeddings=_vectors(n, seed=6))
        assert await col.count() == n
        stored = await _stored_ids(shard_urls, "placement")
        holders: dict[str, list[str]] = {}
        for name, held in zip(NAMES, stored, strict=True):
            assert len(held) == len(set(held))
            for i in held:
                holders.setdefault(i, []).append(name)
        assert sorted(holders) == sorted(ids)
        for i in ids:
            assert holders[i] == [_owner(i)], i
        assert all(stored), "300 ids reach every shard"

        # A read by id goes to the owning shard only.
        url_of = dict(zip(NAMES, shard_urls, strict=True))
        for target in ids[:5]:
            before = {u: s.requests for u, s in client.node_stats().items()}
            got = await col.get(ids=[target])
            assert got["ids"] == [target]
            after = {u: s.requests for u, s in client.node_stats().items()}
            grew = {u for u in shard_urls if after[u] > before[u]}
            assert grew == {url_of[_owner(target)]}, target
            assert after[url_of[_owner(target)]] == before[url_of[_owner(target)]] + 1

        # Two ids on two different shards: exactly those two shards are asked.
        a = ids[0]
        b = next(i for i in ids if _owner(i) != _owner(a))
        before = {u: s.requests for u, s in client.node_stats().items()}
        got = await col.get(ids=[a, b])
        assert sorted(got["ids"]) == sorted([a, b])
        after = {u: s.requests for u, s in client.node_stats().items()}
        assert {u for u in shard_urls if after[u] > before[u]} == {
            url_of[_owner(a)],
            url_of[_owner(b)],
        }
    finally:
        await client.aclose()


async def test_routing_key_places_records_by_metadata_field(shard_urls: list[str]) -> None:
    tenants = [f"tenant-{k}" for k in range(8)]
    n = 80
    ids = [f"t-{i}" for i in range(n)]
    metas = [{"tenant": tenants[i % len(tenants)], "i": i} for i in range(n)]
    client = await _client(shard_urls, routing_key="tenant")
    try:
        assert client.topology.routing_key == "tenant"
        col = await client.create_collection("by-tenant", embedding_function=None)
        await col.add(ids=ids, embeddings=_vectors(n, seed=7), metadatas=metas)
        assert await col.count() == n
        stored = await _stored_ids(shard_urls, "by-tenant")
        where = {i: name for name, held in zip(NAMES, stored, strict=True) for i in held}
        assert sorted(where) == sorted(ids)
        assert sum(len(h) for h in stored) == n
        shard_of_tenant: dict[str, set[str]] = {}
        for i, meta in zip(ids, metas, strict=True):
            shard_of_tenant.setdefault(str(meta["tenant"]), set()).add(where[i])
        for tenant, shards in shard_of_tenant.items():
            assert shards == {_owner(tenant)}, tenant  # hash of the value, not of the id
        assert len({s for v in shard_of_tenant.values() for s in v}) > 1

        # A record without the routing field is refused and nothing of its batch is written.
        bad_metas: list[Any] = [{"tenant": "tenant-0"}, {"other": 1}, {"tenant": "tenant-1"}]
        with pytest.raises(ValueError, match="tenant"):
            await col.add(
                ids=["x0", "x1", "x2"], embeddings=_vectors(3, seed=8), metadatas=bad_metas
            )
        with pytest.raises(ValueError, match="tenant"):
            await col.add(ids=["y0"], embeddings=_vectors(1, seed=9))
        with pytest.raises(ValueError, match="tenant"):
            await col.upsert(
                ids=["z0", "z1"], embeddings=_vectors(2, seed=10), metadatas=[{"tenant": "a"}, None]
            )
        assert await col.count() == n
        assert [len(h) for h in await _stored_ids(shard_urls, "by-tenant")] == [
            len(h) for h in stored
        ]
        assert (await col.get(ids=["x0", "x2", "y0", "z0"]))["ids"] == []
    finally:
        await client.aclose()
