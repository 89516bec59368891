"""Paging that depends neither on which copy answers nor on deletes meanwhile (DESIGN section 7):
scan() and paged get()s read each part by ranges of the hidden sequence, never by offset.

Copies are made to store the same records in different orders by rewriting one copy directly
(delete and add again, which Chroma appends at the end), and parts whose stored order is not
their sequence order are set up directly with the official client.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import sharded_chroma
from sharded_chroma import ShardedClient, Topology
from sharded_chroma.catalog._state import SEQ_KEY, VERSION_KEY
from sharded_chroma.ops import _partio
from sharded_chroma.testing import LocalChromaServer
from tests._nodes import official
from tests._proxy import FaultProxy

pytestmark = pytest.mark.anyio

BASE_SEQ = 1_700_000_000_000_000


def _vectors(n: int) -> list[list[float]]:
    return [[float(i), 1.0] for i in range(n)]


async def _scan_ids(col: Any, batch_size: int, **kw: Any) -> list[str]:
    out: list[str] = []
    async for page in col.scan(batch_size=batch_size, **kw):
        assert len(page["ids"]) <= batch_size
        out.extend(page["ids"])
    return out


async def _raw(url: str, name: str) -> Any:
    return await (await official(url)).get_collection(name, embedding_function=None)


async def _store_reversed(url: str, name: str) -> list[str]:
    """Make one copy store its records in reverse: read them raw (hidden keys and all), delete
    them and add them again last-first. Returns the new stored order."""
    col = await _raw(url, name)
    got = await col.get(include=["embeddings", "metadatas", "documents"])
    ids = list(reversed(got["ids"]))
    row = {i: n for n, i in enumerate(got["ids"])}
    await col.delete(ids=ids)
    await col.add(
        ids=ids,
        embeddings=[list(got["embeddings"][row[i]]) for i in ids],
        metadatas=[got["metadatas"][row[i]] for i in ids],
        documents=[got["documents"][row[i]] for i in ids],
    )
    return (await col.get(include=[]))["ids"]


def _topology(urls: list[str], hints: Path) -> Topology:
    return Topology.build(
        {
            "shards": [{"name": "s0", "primary": urls[0], "replicas": urls[1:]}],
            "replication": {"hints_dir": str(hints), "node_retry_after": 0.2},
        }
    )


@contextlib.contextmanager
def _proxies(servers: list[LocalChromaServer]) -> Iterator[list[FaultProxy]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(FaultProxy(s.host, s.port)) for s in servers]


@contextlib.asynccontextmanager
async def _client(topology: Topology) -> AsyncIterator[ShardedClient]:
    client = await sharded_chroma.AsyncHttpClient(topology=topology)
    try:
        yield client
    finally:
        await client.aclose()


async def test_scan_under_concurrent_deletes_yields_every_surviving_record_once(
    sharded: ShardedClient, official_pools: None
) -> None:
    col = await sharded.create_collection("cp-deletes", embedding_function=None)
    ids = [f"d{i:03d}" for i in range(300)]
    await col.add(ids=ids, embeddings=_vectors(300))
    order = (await col.get(include=[]))["ids"]
    # Behind the scan (already yielded) and ahead of it, every page.
    doomed = set(order[::3])
    deleted: set[str] = set()
    pages_in, pages_out = anyio.create_memory_object_stream[list[str]](1)
    done_in, done_out = anyio.create_memory_object_stream[None](1)

    async def deleter() -> None:
        async with pages_out, done_in:
            async for page in pages_out:
                seen = {i for i in page if i in doomed and i not in deleted}
                ahead = [i for i in order if i in doomed and i not in deleted and i not in page]
                batch = sorted(seen | set(ahead[:6]))
                if batch:
                    await col.delete(ids=batch)
                    deleted.update(batch)
                await done_in.send(None)

    got: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(deleter)
        async with pages_in, done_out:
            async for page in col.scan(batch_size=20, include=[]):
                got.extend(page["ids"])
                await pages_in.send(list(page["ids"]))
                await done_out.receive()
    assert deleted, "the deleter never ran"
    assert len(got) == len(set(got)), "a record was yielded twice"
    survivors = [i for i in order if i not in deleted]
    assert [i for i in got if i not in deleted] == survivors
    assert (await col.get(include=[]))["ids"] == survivors


async def test_scan_fails_over_between_pages_to_a_copy_stored_in_another_order(
    cluster_servers: list[LocalChromaServer], tmp_path: Path, official_pools: None
) -> None:
    servers = cluster_servers[:2]
    with _proxies(servers) as proxies:
        topology = _topology([p.url for p in proxies], tmp_path / "hints")
        async with _client(topology) as client:
            col = await client.create_collection("cp-failover", embedding_function=None)
            ids = [f"f{i:03d}" for i in range(120)]
            await col.add(ids=ids, embeddings=_vectors(120))
            stored = await _store_reversed(servers[1].url, "cp-failover")
            assert stored == list(reversed(ids))

            got: list[str] = []
            pages = 0
            before = {u: s.requests for u, s in client.node_stats().items()}
            async for page in col.scan(batch_size=10, include=["embeddings"]):
                got.extend(page["ids"])
                pages += 1
                if pages == 3:
                    # Cut the copy that served the scan so far: the rest comes from the other.
                    stats = client.node_stats()
                    served = max(proxies, key=lambda p: stats[p.url].requests - before[p.url])
                    served.cut()
            for p in proxies:
                p.restore()
            assert len(got) == len(set(got)), "a record was yielded twice"
            assert got == ids, "records were skipped or reordered across the failover"


async def test_scan_and_get_of_a_part_stored_out_of_sequence_order(
    shard_urls: list[str], official_pools: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await sharded_chroma.AsyncHttpClient(shards=shard_urls[:1]) as client:
        col = await client.create_collection("cp-order", embedding_function=None)
        # Stored order: a block of high values, then low ones, then a few interleaved, as two
        # processes (or a move) can leave a part; first a few records written around the
        # library, without any sequence.
        seqs = [*range(100, 160), *range(0, 60), *[200, 65, 300, 66, 170]]
        n = len(seqs)
        ids = [f"o{i:03d}" for i in range(n)]
        raw = await _raw(shard_urls[0], "cp-order")
        bare = ["zz-b", "zz-a"]
        await raw.add(ids=bare, embeddings=_vectors(2), metadatas=[{"k": 1}, {"k": 2}])
        await raw.add(
            ids=ids,
            embeddings=_vectors(n),
            metadatas=[{SEQ_KEY: BASE_SEQ + s, VERSION_KEY: BASE_SEQ + s, "k": 1} for s in seqs],
            documents=[f"doc {s}" for s in seqs],
        )
        expected = [i for _, i in sorted(zip(seqs, ids, strict=True))] + sorted(bare)
        for batch in (7, 50, 1000):
            assert await _scan_ids(col, batch) == expected, batch
        scanned = await _scan_ids(col, 9, where={"k": 1}, include=["documents"])
        assert scanned == [i for i in expected if i != "zz-a"]

        whole = await col.get(include=["documents"])
        assert whole["ids"] == expected
        monkeypatch.setattr(_partio, "GET_PAGE", 8)
        paged = await col.get(include=["documents"])
        assert paged == whole
        for limit, offset in [(5, 0), (10, 55), (30, 40), (7, n - 3), (100, 0)]:
            window = await col.get(limit=limit, offset=offset, include=["documents"])
            assert window["ids"] == expected[offset : offset + limit], (limit, offset)
            assert window["documents"] == whole["documents"][offset : offset + limit]


async def test_get_windows_match_the_whole_get_whichever_copy_answers(
    cluster_servers: list[LocalChromaServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    servers = cluster_servers[:2]
    topology = _topology([s.url for s in servers], tmp_path / "hints")
    async with _client(topology) as client:
        col = await client.create_collection("cp-windows", embedding_function=None)
        ids = [f"w{i:03d}" for i in range(90)]
        await col.add(ids=ids, embeddings=_vectors(90), documents=[f"d{i}" for i in ids])
        await _store_reversed(servers[1].url, "cp-windows")
        monkeypatch.setattr(_partio, "GET_PAGE", 16)
        # Round-robin reads: consecutive gets (and pages) alternate between the two copies.
        for _ in range(2):
            whole = await col.get(include=["documents"])
            assert whole["ids"] == ids
            for limit, offset in [(10, 0), (10, 5), (25, 30), (40, 70), (3, 89)]:
                window = await col.get(limit=limit, offset=offset, include=["documents"])
                assert window["ids"] == ids[offset : offset + limit], (limit, offset)
                assert window["documents"] == whole["documents"][offset : offset + limit]
