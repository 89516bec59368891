"""Compatibility details of the sharded client, each checked against a plain Chroma server (the
oracle) where the oracle has an answer.

Several tests here are regressions for bugs found by this file (noted in their docstrings).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import numpy as np
import orjson
import pytest
from aiohttp import web
from chromadb.errors import InternalError, InvalidArgumentError, NotFoundError

import sharded_chroma
from sharded_chroma import NodeConfig, NodeUnavailableError
from sharded_chroma._transport import NodeTransport
from tests._nodes import official

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("official_pools")]

DIM = 4


@pytest.fixture
async def oracle(oracle_url: str, official_pools: None) -> Any:
    return await official(oracle_url)


@pytest.fixture
async def sharded(shard_urls: list[str], connect: Any) -> AsyncIterator[Any]:
    """This suite runs through the async client and through the sync one."""
    client = await connect(shards=shard_urls)
    try:
        yield client
    finally:
        await client.aclose()


def _emb(rng: random.Random, n: int, dim: int = DIM) -> list[list[float]]:
    return [[round(rng.uniform(-1, 1), 3) for _ in range(dim)] for _ in range(n)]


async def _pair(oracle: Any, sharded: Any, name: str = "compat", **kwargs: Any) -> list[Any]:
    return [
        await c.create_collection(name, embedding_function=None, **kwargs)
        for c in (oracle, sharded)
    ]


async def _fill(cols: list[Any], n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    ids = [f"rec{i:03d}" for i in range(n)]
    embs = _emb(rng, n)
    metas = [{"cat": ("a", "b", "c")[i % 3], "n": i % 10} for i in range(n)]
    docs = [f"doc {('red', 'green')[i % 2]} {i}" for i in range(n)]
    for col in cols:
        await col.add(ids=ids, embeddings=embs, metadatas=metas, documents=docs)
    return ids


async def _outcome(call: Callable[[], Awaitable[Any]]) -> tuple[str, Any]:
    try:
        return "ok", await call()
    except Exception as exc:
        return "error", exc


def _ids_per_shard(client: sharded_chroma.ShardedClient, n_each: int, prefix: str) -> list[str]:
    """Ids chosen so that every shard owns ``n_each`` of them (under hash-of-id routing)."""
    table = client.topology.slot_table()
    n_shards = len(client.topology.shards)
    buckets: dict[int, list[str]] = {s: [] for s in range(n_shards)}
    i = 0
    while any(len(b) < n_each for b in buckets.values()):
        rid = f"{prefix}{i}"
        shard = table.shard_for_key(rid)
        if len(buckets[shard]) < n_each:
            buckets[shard].append(rid)
        i += 1
    return [rid for s in range(n_shards) for rid in buckets[s]]


# -- query ------------------------------------------------------------------------------------


QUERY_INCLUDES: list[list[str]] = [
    ["metadatas", "documents", "distances"],
    ["metadatas", "documents"],
    ["distances"],
    ["documents"],
    ["embeddings", "metadatas"],
    [],
]


async def test_query_with_empty_ids_filter_matches_oracle(oracle: Any, sharded: Any) -> None:
    cols = await _pair(oracle, sharded)
    await _fill(cols, 12)
    q = [[0.1, 0.2, 0.3, 0.4], [0.0, -1.0, 0.5, 0.2]]
    for include in QUERY_INCLUDES:
        res_o, res_s = [await c.query(query_embeddings=q, ids=[], include=include) for c in cols]
        assert res_o["ids"] == [[], []]  # guards the oracle's answer this test relies on
        assert res_s["ids"] == res_o["ids"]
        assert res_s["included"] == res_o["included"] == include
        for key in ("distances", "metadatas", "documents", "uris", "data"):
            assert res_s[key] == res_o[key], (include, key)
        if res_o["embeddings"] is None:
            assert res_s["embeddings"] is None
        else:
            assert [len(x) for x in res_s["embeddings"]] == [len(x) for x in res_o["embeddings"]]


async def test_query_shape_and_ordering(oracle: Any, sharded: Any) -> None:
    cols = await _pair(oracle, sharded)
    ids = await _fill(cols, 60)
    rng = random.Random(5)
    queries = _emb(rng, 3)
    cases = [(7, None), (15, {"cat": "b"}), (20, {"n": {"$in": [1, 2]}})]
    for include, (n_results, where) in itertools.product(QUERY_INCLUDES, cases):
        res_o, res_s = [
            await c.query(
                query_embeddings=queries, n_results=n_results, where=where, include=include
            )
            for c in cols
        ]
        expected_rows = min(n_results, len((await cols[0].get(where=where))["ids"]))
        assert expected_rows == min(n_results, 60 if where is None else 12 if "n" in where else 20)
        assert res_s["included"] == res_o["included"] == include
        assert len(res_s["ids"]) == 3
        for q in range(3):
            assert len(res_s["ids"][q]) == expected_rows
            assert set(res_s["ids"][q]) <= set(ids)
            assert res_s["ids"][q] == res_o["ids"][q]  # random vectors: no distance ties
        for key in ("distances", "metadatas", "documents", "embeddings"):
            assert (res_s[key] is None) == (key not in include), key
            assert (res_o[key] is None) == (key not in include), key
        if "distances" in include:
            for q in range(3):
                d = res_s["distances"][q]
                assert d == sorted(d)
                assert np.allclose(d, res_o["distances"][q], atol=1e-5)
        for key in ("metadatas", "documents"):
            if key in include:
                assert res_s[key] == res_o[key]
        if "embeddings" in include:
            for q in range(3):
                assert np.allclose(res_s["embeddings"][q], res_o["embeddings"][q])


async def test_query_n_results_larger_than_collection(oracle: Any, sharded: Any) -> None:
    cols = await _pair(oracle, sharded)
    await _fill(cols, 9)
    res_o, res_s = [
        await c.query(query_embeddings=[[0.0, 0.0, 0.0, 1.0]], n_results=100) for c in cols
    ]
    assert len(res_o["ids"][0]) == 9
    assert res_s["ids"] == res_o["ids"]
    assert np.allclose(res_s["distances"][0], res_o["distances"][0], atol=1e-5)


# -- totals across shards ---------------------------------------------------------------------


async def test_peek_returns_n_in_total(oracle: Any, sharded: Any) -> None:
    cols = await _pair(oracle, sharded)
    await _fill(cols, 30)
    for n in (1, 4, 10, 29, 30, 31, 100):
        res_o, res_s = [await c.peek(n) for c in cols]
        assert len(res_s["ids"]) == min(n, 30)
        assert res_s["ids"] == res_o["ids"]
        assert res_s["metadatas"] == res_o["metadatas"]
        assert res_s["documents"] == res_o["documents"]
        assert np.allclose(res_s["embeddings"], res_o["embeddings"])
    assert len((await cols[1].peek())["ids"]) == 10  # the default


async def test_peek_included_matches_oracle(oracle: Any, sharded: Any) -> None:
    cols = await _pair(oracle, sharded)
    await _fill(cols, 5)
    res_o, res_s = [await c.peek(3) for c in cols]
    assert res_o["included"] == ["metadatas", "documents", "embeddings"]
    assert res_s["included"] == res_o["included"]


async def test_delete_with_limit_deletes_n_in_total(oracle: Any, sharded: Any) -> None:
    cols = await _pair(oracle, sharded)
    await _fill(cols, 45)
    for where, limit in (({"cat": "a"}, 4), ({"n": {"$gte": 5}}, 7), ({"cat": "a"}, 100)):
        before = [await c.count() for c in cols]
        matching = len((await cols[0].get(where=where))["ids"])
        res = [await c.delete(where=where, limit=limit) for c in cols]
        assert res[1] == res[0] == {"deleted": min(limit, matching)}
        after = [await c.count() for c in cols]
        assert after[1] == after[0] == before[0] - min(limit, matching)
        assert (await cols[1].get())["ids"] == (await cols[0].get())["ids"]
    res = [await c.delete(where_document={"$contains": "green"}, limit=3) for c in cols]
    assert res[1] == res[0] == {"deleted": 3}
    assert (await cols[1].get())["ids"] == (await cols[0].get())["ids"]


# -- dimension --------------------------------------------------------------------------------


async def test_wrong_dimension_rejected_on_every_shard(oracle: Any, sharded: Any) -> None:
    cols = await _pair(oracle, sharded)
    await _fill(cols, 6)  # the first write fixes the dimension at 4
    probe_ids = _ids_per_shard(sharded, 2, "wrongdim")
    for rid in probe_ids:
        outcomes = [
            await _outcome(lambda c=c, rid=rid: c.add(ids=[rid], embeddings=[[1.0, 2.0, 3.0]]))
            for c in cols
        ]
        assert outcomes[0][0] == "error" and isinstance(outcomes[0][1], InvalidArgumentError)
        assert outcomes[1][0] == "error", f"{rid}: cluster accepted a wrong dimension"
        assert type(outcomes[1][1]) is type(outcomes[0][1])
    for emb in ([[1.0] * 5], [[1.0] * 3]):
        for op in ("upsert", "update"):
            outcomes = [
                await _outcome(
                    lambda c=c, op=op, emb=emb: getattr(c, op)(ids=["rec001"], embeddings=emb)
                )
                for c in cols
            ]
            assert outcomes[0][0] == outcomes[1][0] == "error"
            assert type(outcomes[1][1]) is type(outcomes[0][1])
    # A batch where only some records have the wrong dimension: nothing written anywhere.
    batch = _ids_per_shard(sharded, 2, "mixdim")
    embs = [[0.5] * DIM for _ in batch]
    embs[-1] = [0.5] * (DIM + 2)
    outcomes = [await _outcome(lambda c=c: c.add(ids=batch, embeddings=embs)) for c in cols]
    assert outcomes[0][0] == outcomes[1][0] == "error"
    assert isinstance(outcomes[1][1], InvalidArgumentError)
    assert [await c.count() for c in cols] == [6, 6]
    assert (await cols[1].get(include=["embeddings"]))["embeddings"].shape == (6, DIM)
    # Query with a wrong dimension.
    outcomes = [await _outcome(lambda c=c: c.query(query_embeddings=[[1.0] * 7])) for c in cols]
    assert outcomes[0][0] == outcomes[1][0] == "error"
    assert type(outcomes[1][1]) is type(outcomes[0][1])


async def test_wrong_dimension_rejected_through_handle_fetched_before_first_write(
    oracle: Any, shard_urls: list[str], connect: Any
) -> None:
    """Regression: a handle fetched before the first write once cached dimension=None, so
    shards holding no data yet accepted a wrong dimension (mixed dimensions in the cluster)."""
    writer = await connect(shards=shard_urls)
    reader = await connect(shards=shard_urls)
    try:
        o_col = await oracle.create_collection("latedim", embedding_function=None)
        w_col = await writer.create_collection("latedim", embedding_function=None)
        r_col = await reader.get_collection("latedim", embedding_function=None)
        for col in (o_col, w_col):
            await col.add(ids=["first"], embeddings=[[1.0, 2.0, 3.0, 4.0]])
        for rid in _ids_per_shard(writer, 1, "late"):
            o_out = await _outcome(lambda rid=rid: o_col.add(ids=[rid], embeddings=[[1.0] * 3]))
            r_out = await _outcome(lambda rid=rid: r_col.add(ids=[rid], embeddings=[[1.0] * 3]))
            assert o_out[0] == "error" and isinstance(o_out[1], InvalidArgumentError)
            assert r_out[0] == "error" and isinstance(r_out[1], InvalidArgumentError), rid
        assert await o_col.count() == 1
        assert await r_col.count() == 1
    finally:
        await writer.aclose()
        await reader.aclose()


# -- batch size -------------------------------------------------------------------------------


async def test_max_batch_size_matches_oracle(oracle: Any, sharded: Any) -> None:
    limit_o, limit_s = await oracle.get_max_batch_size(), await sharded.get_max_batch_size()
    assert limit_s == limit_o
    assert limit_o > 0
    cols = await _pair(oracle, sharded)
    n = limit_o + 1
    ids = [f"b{i}" for i in range(n)]
    embs = np.zeros((n, DIM), dtype=np.float32)
    outcomes = [await _outcome(lambda c=c: c.add(ids=ids, embeddings=embs)) for c in cols]
    assert outcomes[0][0] == outcomes[1][0] == "error"
    assert isinstance(outcomes[0][1], ValueError)
    assert type(outcomes[1][1]) is type(outcomes[0][1])
    assert [await c.count() for c in cols] == [0, 0]


# -- the collections catalog ------------------------------------------------------------------


async def test_collection_identity_and_catalog(
    oracle: Any, sharded: Any, shard_urls: list[str], connect: Any
) -> None:
    names = ["zeta", "alpha", "mid-one", "beta", "omega"]
    for name in names:
        for c in (oracle, sharded):
            await c.create_collection(name, embedding_function=None, metadata={"label": name})
    other = await connect(shards=shard_urls)
    try:
        for name in names:
            mine = await sharded.get_collection(name, embedding_function=None)
            theirs = await other.get_collection(name, embedding_function=None)
            assert theirs.id == mine.id
            by_id = await other.get_collection_by_id(mine.id, embedding_function=None)
            assert (by_id.name, by_id.id, by_id.metadata) == (name, mine.id, {"label": name})
        ids = {(await sharded.get_collection(n, embedding_function=None)).id for n in names}
        assert len(ids) == len(names)
        # by-id of something that does not exist
        missing = uuid.uuid4()
        outcomes = [
            await _outcome(lambda c=c: c.get_collection_by_id(missing, embedding_function=None))
            for c in (oracle, sharded)
        ]
        assert outcomes[0][0] == outcomes[1][0] == "error"
        assert type(outcomes[1][1]) is type(outcomes[0][1])
    finally:
        await other.aclose()

    assert await sharded.count_collections() == await oracle.count_collections() == len(names)
    # One server lists collections ordered by collection id (a random uuid4), so the two lists
    # cannot be compared position by position; the cluster must follow the same rule with its
    # own ids, and pages must be slices of the full list on both sides.
    full: dict[str, list[Any]] = {}
    for side, c in (("oracle", oracle), ("cluster", sharded)):
        listed = list(await c.list_collections())
        assert sorted(x.name for x in listed) == sorted(names), side
        assert [str(x.id) for x in listed] == sorted(str(x.id) for x in listed), side
        full[side] = [x.name for x in listed]
        for limit, offset in ((2, 0), (2, 2), (3, 4), (10, 1), (None, 3), (1, None), (5, 9)):
            page = [x.name for x in await c.list_collections(limit=limit, offset=offset)]
            start = offset or 0
            stop = None if limit is None else start + limit
            assert page == full[side][start:stop], (side, limit, offset)
    for col in await sharded.list_collections():
        assert col.metadata == {"label": col.name}

    assert await sharded.reset() is True
    assert await oracle.reset() is True
    assert await sharded.count_collections() == await oracle.count_collections() == 0
    assert await sharded.list_collections() == []
    for url in shard_urls:
        assert await (await official(url)).count_collections() == 0


async def test_modify_onto_existing_name_raises_oracle_error(
    oracle: Any, sharded: Any, shard_urls: list[str]
) -> None:
    """Regression: the server answers HTTP 500 InternalError ('UNIQUE constraint failed'); the
    transport once turned that into NodeUnavailableError."""
    outcomes = []
    for c in (oracle, sharded):
        await c.create_collection("taken", embedding_function=None)
        col = await c.create_collection("mover", embedding_function=None)
        outcomes.append(await _outcome(lambda col=col: col.modify(name="taken")))
        assert sorted(x.name for x in await c.list_collections()) == ["mover", "taken"]
    assert outcomes[0][0] == "error"
    assert outcomes[1][0] == "error"
    assert type(outcomes[1][1]) is type(outcomes[0][1])
    # Nothing was renamed on any shard either.
    for url in shard_urls:
        names = sorted(x.name for x in await (await official(url)).list_collections())
        assert names == ["mover", "taken"], url


async def test_modify_metadata_and_name(oracle: Any, sharded: Any, shard_urls: list[str]) -> None:
    results = []
    for c in (oracle, sharded):
        col = await c.create_collection("meta-col", embedding_function=None, metadata={"v": 1})
        await col.add(ids=["x"], embeddings=[[1.0, 0, 0, 0]], metadatas=[{"k": 1}])
        await col.modify(metadata={"v": 2, "owner": "me"})
        local = col.metadata
        fetched = (await c.get_collection("meta-col", embedding_function=None)).metadata
        await col.modify(name="meta-renamed")
        renamed = await c.get_collection("meta-renamed", embedding_function=None)
        gone = await _outcome(lambda c=c: c.get_collection("meta-col", embedding_function=None))
        listed = {x.name: x.metadata for x in await c.list_collections()}
        rec = await renamed.get(include=["metadatas"])
        results.append((local, fetched, renamed.metadata, gone[0], listed, rec["metadatas"]))
    assert results[0][1] == {"v": 2, "owner": "me"}
    assert results[1] == results[0]
    # The shards agree on the new name.
    for url in shard_urls:
        assert [x.name for x in await (await official(url)).list_collections()] == ["meta-renamed"]


async def test_reserved_keys_never_visible(sharded: Any) -> None:
    col = await sharded.create_collection("hidden", embedding_function=None)
    assert col.metadata is None
    col2 = await sharded.create_collection("hidden2", embedding_function=None, metadata={"a": 1})
    assert col2.metadata == {"a": 1}
    ids = [f"h{i}" for i in range(12)]
    metas: list[Any] = [{"m": i} if i % 2 else None for i in range(12)]
    await col.add(ids=ids, embeddings=_emb(random.Random(1), 12), metadatas=metas)
    await col.upsert(ids=["h0", "h1", "new"], embeddings=_emb(random.Random(2), 3))
    await col.update(ids=["h3"], metadatas=[{"m": None}])
    expected = [*metas, None]
    expected[3] = None
    full = await col.get()
    assert full["metadatas"] == expected
    assert (await col.peek(20))["metadatas"] == expected
    q = await col.query(query_embeddings=[[0.0] * DIM], n_results=20, include=["metadatas"])
    by_id = dict(zip(full["ids"], expected, strict=True))
    assert dict(zip(q["ids"][0], q["metadatas"][0], strict=True)) == by_id
    scanned: list[Any] = []
    async for page in col.scan(batch_size=5):
        scanned += page["metadatas"]
    assert scanned == expected
    for c in [col, col2, *(await sharded.list_collections())]:
        assert not any(k.startswith("_sc_") for k in (c.metadata or {}))
    fetched = await sharded.get_collection("hidden2", embedding_function=None)
    assert fetched.metadata == {"a": 1}
    assert (await sharded.get_collection_by_id(col2.id, embedding_function=None)).metadata == {
        "a": 1
    }


# -- missing and deleted collections ----------------------------------------------------------


async def test_missing_collection_errors_match_oracle(oracle: Any, sharded: Any) -> None:
    outcomes = [
        await _outcome(lambda c=c: c.get_collection("nope", embedding_function=None))
        for c in (oracle, sharded)
    ]
    assert outcomes[0][0] == outcomes[1][0] == "error"
    assert isinstance(outcomes[0][1], NotFoundError)
    assert type(outcomes[1][1]) is type(outcomes[0][1])
    assert str(outcomes[1][1]) == str(outcomes[0][1])
    outcomes = [await _outcome(lambda c=c: c.delete_collection("nope")) for c in (oracle, sharded)]
    assert outcomes[0][0] == outcomes[1][0] == "error"
    assert type(outcomes[1][1]) is type(outcomes[0][1])


# Chroma's trace ids are 32 hex digits (all zeros unless the server exports OpenTelemetry).
TRACE_ID = re.compile(r"[0-9a-f]{32}")


async def _dup(client: Any) -> None:
    await client.create_collection("twice", embedding_function=None)
    await client.create_collection("twice", embedding_function=None)


SERVER_ERRORS: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "get-missing": lambda c: c.get_collection("nope", embedding_function=None),
    "delete-missing": lambda c: c.delete_collection("nope"),
    "create-existing": _dup,
    "get-by-id-not-a-uuid": lambda c: c.get_collection_by_id("nope", embedding_function=None),
    "bad-name": lambda c: c.create_collection("x", embedding_function=None),
    "bad-list-limit": lambda c: c.list_collections(limit=-1),
}


@pytest.mark.parametrize("case", sorted(SERVER_ERRORS))
async def test_server_errors_carry_the_trace_id(oracle: Any, sharded: Any, case: str) -> None:
    """Errors built from a server's answer carry its ``chroma-trace-id`` header as
    ``trace_id``, as the official client's do (regression: the cluster's had none)."""
    expected, got = [await _outcome(lambda c=c: SERVER_ERRORS[case](c)) for c in (oracle, sharded)]
    assert expected[0] == got[0] == "error"
    assert type(got[1]) is type(expected[1])
    assert expected[1].trace_id is not None and TRACE_ID.fullmatch(expected[1].trace_id)
    assert got[1].trace_id is not None and TRACE_ID.fullmatch(got[1].trace_id), repr(got[1])


@contextlib.asynccontextmanager
async def _stub_server(handler: Callable[[web.Request], Awaitable[web.Response]]) -> Any:
    """One loopback HTTP server answering every request with ``handler``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        await web.SockSite(runner, sock).start()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()
        sock.close()


async def test_trace_id_is_the_answers_header() -> None:
    """Each error gets its own answer's header (a tracing server sends one per request), and
    an answer without the header, or with an empty one, leaves ``trace_id`` unset."""
    answers = iter([f"{n:032x}" for n in (0xABC, 0xDEF)] + [None, ""])

    async def handler(request: web.Request) -> web.Response:
        trace = next(answers)
        headers = {} if trace is None else {"chroma-trace-id": trace}
        body = orjson.dumps({"error": "NotFoundError", "message": "Collection [x] does not exist"})
        return web.Response(status=404, body=body, headers=headers)

    async with _stub_server(handler) as url:
        transport = NodeTransport(NodeConfig(url=url), "s0")
        try:
            seen = []
            for _ in range(4):
                with pytest.raises(NotFoundError) as raised:
                    await transport.request("GET", "/tenants/t/databases/d/collections/x")
                assert str(raised.value) == "Collection [x] does not exist"
                seen.append(raised.value.trace_id)
        finally:
            await transport.aclose()
    assert seen == [f"{0xABC:032x}", f"{0xDEF:032x}", None, None]


async def test_trace_id_of_failures_that_are_not_chroma_answers() -> None:
    """A non-Chroma error answer names the trace id in its text, as the official client's
    message does; a Chroma error under an overload status keeps it on the chained cause."""
    replies = iter(
        [
            (404, b"", "1" * 32),
            (503, orjson.dumps({"error": "InternalError", "message": "busy"}), "2" * 32),
        ]
    )

    async def handler(request: web.Request) -> web.Response:
        status, body, trace = next(replies)
        return web.Response(status=status, body=body, headers={"chroma-trace-id": trace})

    async with _stub_server(handler) as url:
        transport = NodeTransport(NodeConfig(url=url), "s0")
        try:
            with pytest.raises(NodeUnavailableError) as raised:
                await transport.request("GET", "/nowhere")
            assert raised.value.attempts == (f"_HTTPFailure: HTTP 404:  (trace ID: {'1' * 32})",)
            with pytest.raises(NodeUnavailableError) as raised:
                await transport.request("GET", "/busy")
            cause = raised.value.__cause__
            assert isinstance(cause, InternalError) and cause.trace_id == "2" * 32
        finally:
            await transport.aclose()


def _operations(col: Any) -> dict[str, Callable[[], Awaitable[Any]]]:
    return {
        "add": lambda: col.add(ids=["n1"], embeddings=[[1.0, 2.0, 3.0, 4.0]]),
        "get": lambda: col.get(),
        "get_ids": lambda: col.get(ids=["d1"]),
        "query": lambda: col.query(query_embeddings=[[1.0, 2.0, 3.0, 4.0]]),
        "count": lambda: col.count(),
        "peek": lambda: col.peek(),
        "delete": lambda: col.delete(ids=["d1"]),
        "delete_where": lambda: col.delete(where={"k": 1}),
        "upsert": lambda: col.upsert(ids=["d1"], embeddings=[[1.0, 2.0, 3.0, 4.0]]),
        "update": lambda: col.update(ids=["d1"], embeddings=[[1.0, 2.0, 3.0, 4.0]]),
        "modify": lambda: col.modify(metadata={"a": 1}),
    }


@pytest.mark.parametrize("deleter", ["same-client", "other-client"])
async def test_operations_on_deleted_collection(
    oracle: Any, sharded: Any, shard_urls: list[str], deleter: str, connect: Any
) -> None:
    cols = await _pair(oracle, sharded, "doomed")
    for col in cols:
        await col.add(ids=["d1", "d2"], embeddings=[[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    other = await connect(shards=shard_urls)
    try:
        await oracle.delete_collection("doomed")
        await (sharded if deleter == "same-client" else other).delete_collection("doomed")
    finally:
        await other.aclose()
    ops_o, ops_s = _operations(cols[0]), _operations(cols[1])
    for name in ops_o:
        out_o, out_s = await _outcome(ops_o[name]), await _outcome(ops_s[name])
        assert out_o[0] == "error" and isinstance(out_o[1], NotFoundError), name
        assert out_s[0] == "error", f"{name}: cluster answered {out_s[1]!r}"
        assert type(out_s[1]) is type(out_o[1]), f"{name}: {out_s[1]!r}"
    # Nothing was recreated by the failed writes.
    assert await sharded.count_collections() == 0
    for url in shard_urls:
        assert await (await official(url)).count_collections() == 0


# -- concurrency ------------------------------------------------------------------------------


async def test_concurrent_get_or_create_makes_one_collection(
    sharded: Any, shard_urls: list[str]
) -> None:
    got: list[Any] = []

    async def one() -> None:
        got.append(await sharded.get_or_create_collection("racy", embedding_function=None))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one)
    assert len(got) == 50
    assert len({c.id for c in got}) == 1
    assert [c.name for c in await sharded.list_collections()] == ["racy"]
    assert await sharded.count_collections() == 1
    for url in shard_urls:
        shard = await official(url)
        assert [c.name for c in await shard.list_collections()] == ["racy"], url
    # And the collection works: a write through one handle is visible through another.
    await got[0].add(ids=["z1", "z2", "z3"], embeddings=[[1.0, 0, 0, 0]] * 3)
    assert await got[-1].count() == 3


async def test_concurrent_tasks_share_one_client(sharded: Any) -> None:
    col = await sharded.create_collection("shared", embedding_function=None)
    rng = random.Random(9)
    batches = {t: [f"t{t:02d}-{j}" for j in range(6)] for t in range(20)}
    embs = {t: _emb(rng, 6) for t in batches}

    async def worker(t: int) -> None:
        ids = batches[t]
        await col.add(ids=ids, embeddings=embs[t], metadatas=[{"task": t}] * len(ids))
        got = await col.get(ids=ids, include=["metadatas", "embeddings"])
        assert sorted(got["ids"]) == sorted(ids)
        assert all(m == {"task": t} for m in got["metadatas"])
        res = await col.query(query_embeddings=[embs[t][0]], n_results=1, where={"task": t})
        assert res["ids"][0] == [ids[0]]

    async with anyio.create_task_group() as tg:
        for t in batches:
            tg.start_soon(worker, t)
    everything = await col.get(include=["metadatas"])
    assert sorted(everything["ids"]) == sorted(i for ids in batches.values() for i in ids)
    assert await col.count() == 120
    # As on one server, each add() call's records come back together and in their order.
    for ids in batches.values():
        start = everything["ids"].index(ids[0])
        assert everything["ids"][start : start + len(ids)] == ids
    # Pages are slices of the full list, even after concurrent writers.
    for limit, offset in ((7, 0), (13, 50), (40, 100), (5, 118)):
        page = await col.get(limit=limit, offset=offset, include=[])
        assert page["ids"] == everything["ids"][offset : offset + limit]


async def test_get_order_is_a_serial_order_under_concurrent_writes(
    sharded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: with the hidden sequence reserved before the shard requests and shards
    storing records in arrival order, a batch whose request to one shard was slower than a
    later batch's came back split and out of its own order (merge_get trusts shard order)."""
    col = await sharded.create_collection("serial", embedding_function=None)
    first = _ids_per_shard(sharded, 2, "first")
    second = _ids_per_shard(sharded, 2, "second")
    slow_shard = sharded.topology.shards[1].name
    real_request = NodeTransport.request
    second_started = anyio.Event()
    delayed: list[str] = []

    async def slow_request(self: NodeTransport, method: str, path: str, **kwargs: Any) -> Any:
        body = kwargs.get("body")
        if body is None and kwargs.get("content") is not None:
            body = json.loads(kwargs["content"])  # writes may come serialised already
        ids = set(body.get("ids") or ()) if isinstance(body, dict) else set()
        if self.shard == slow_shard and path.endswith("/add") and ids & set(first):
            # The first batch reaches this shard only after the second batch was written.
            delayed.append(path)
            await second_started.wait()
            await anyio.sleep(0.3)
        return await real_request(self, method, path, **kwargs)

    # The lowest layer, so the test does not depend on how the layers above reach it.
    monkeypatch.setattr(NodeTransport, "request", slow_request)

    async def write_first() -> None:
        await col.add(ids=first, embeddings=[[1.0] * DIM] * len(first))

    async def write_second() -> None:
        await anyio.sleep(0.05)  # after the first batch has taken its sequence numbers
        second_started.set()
        await col.add(ids=second, embeddings=[[2.0] * DIM] * len(second))

    async with anyio.create_task_group() as tg:
        tg.start_soon(write_first)
        tg.start_soon(write_second)
    assert delayed, "the delay was never applied; the test would prove nothing"
    got = (await col.get(include=[]))["ids"]
    assert sorted(got) == sorted(first + second)
    # One server runs the two adds one after the other: each batch whole and in its order.
    assert got in (first + second, second + first), got


# -- bad input --------------------------------------------------------------------------------

NAN = float("nan")

BAD_WRITES: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "length-mismatch": lambda c: c.add(ids=["x1", "x2"], embeddings=[[1.0] * DIM]),
    "metadata-length-mismatch": lambda c: c.add(
        ids=["x1", "x2"], embeddings=[[1.0] * DIM] * 2, metadatas=[{"a": 1}]
    ),
    "duplicate-ids": lambda c: c.add(ids=["x1", "x2", "x1"], embeddings=[[1.0] * DIM] * 3),
    "duplicate-ids-upsert": lambda c: c.upsert(
        ids=["rec001", "rec001"], embeddings=[[1.0] * 4] * 2
    ),
    "nan-single": lambda c: c.add(ids=["x1"], embeddings=[[NAN, 0.0, 0.0, 0.0]]),
    "nested-metadata": lambda c: c.add(
        ids=["x1"], embeddings=[[1.0] * DIM], metadatas=[{"a": {"b": 1}}]
    ),
    "empty-metadata": lambda c: c.add(ids=["x1"], embeddings=[[1.0] * DIM], metadatas=[{}]),
    "non-string-id": lambda c: c.add(ids=[7], embeddings=[[1.0] * DIM]),
    "empty-id-list": lambda c: c.add(ids=[], embeddings=[]),
    "update-nested-metadata": lambda c: c.update(ids=["rec001"], metadatas=[{"a": {"b": 1}}]),
    "malformed-where-delete": lambda c: c.delete(where={"$bad": 1}),
    "delete-limit-without-filter": lambda c: c.delete(limit=2),
}
BAD_READS: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "malformed-where-get": lambda c: c.get(where={"$bad": 1}),
    "malformed-where-query": lambda c: c.query(query_embeddings=[[1.0] * DIM], where={"$bad": 1}),
    "malformed-where-document": lambda c: c.get(where_document={"$nope": "x"}),
    "negative-limit": lambda c: c.get(limit=-1),
    "zero-n-results": lambda c: c.query(query_embeddings=[[1.0] * DIM], n_results=0),
    "nan-query": lambda c: c.query(query_embeddings=[[NAN, 0.0, 0.0, 0.0]]),
}


async def test_bad_input_raises_like_oracle_and_writes_nothing(oracle: Any, sharded: Any) -> None:
    cols = await _pair(oracle, sharded)
    await _fill(cols, 9)
    before = [await c.get(include=["embeddings", "metadatas", "documents"]) for c in cols]
    for case, call in {**BAD_WRITES, **BAD_READS}.items():
        out_o, out_s = [await _outcome(lambda c=c, call=call: call(c)) for c in cols]
        assert out_o[0] == "error", f"the oracle accepted {case}"
        assert out_s[0] == "error", f"the cluster accepted {case}: {out_s[1]!r}"
        assert type(out_s[1]) is type(out_o[1]), f"{case}: {out_s[1]!r} vs oracle {out_o[1]!r}"
        after = [await c.get(include=["embeddings", "metadatas", "documents"]) for c in cols]
        for b, a in zip(before, after, strict=True):
            assert a["ids"] == b["ids"], case
            assert a["metadatas"] == b["metadatas"], case
            assert a["documents"] == b["documents"], case
            assert np.array_equal(a["embeddings"], b["embeddings"]), case


@pytest.mark.parametrize("op", ["add", "upsert"])
async def test_non_finite_embedding_in_multi_shard_batch_writes_nothing(
    oracle: Any, sharded: Any, op: str
) -> None:
    """Regression: only the shard receiving the NaN/inf rejected it; the other shards stored
    their part and the call raised PartialWriteError."""
    cols = await _pair(oracle, sharded)
    await _fill(cols, 6)
    ids = ["rec000", "rec001", *_ids_per_shard(sharded, 2, "fresh")]
    embs = [[0.25] * DIM for _ in ids]
    embs[-1] = [float("inf"), 0.0, 0.0, 0.0]
    embs[-3] = [NAN, 0.0, 0.0, 0.0]
    before = [await c.get(include=["embeddings"]) for c in cols]
    out_o, out_s = [
        await _outcome(lambda c=c: getattr(c, op)(ids=ids, embeddings=embs)) for c in cols
    ]
    assert out_o[0] == "error" and isinstance(out_o[1], InvalidArgumentError)
    after_o = await cols[0].get(include=["embeddings"])
    assert after_o["ids"] == before[0]["ids"]
    assert np.array_equal(after_o["embeddings"], before[0]["embeddings"])
    after_s = await cols[1].get(include=["embeddings"])
    assert after_s["ids"] == before[1]["ids"], "the cluster stored part of a rejected batch"
    assert np.array_equal(after_s["embeddings"], before[1]["embeddings"])
    assert out_s[0] == "error"
    assert type(out_s[1]) is type(out_o[1]), repr(out_s[1])


async def test_negative_offset_raises_like_oracle(oracle: Any, sharded: Any) -> None:
    """Regression: the cluster added offset to limit and sent offset=None to the shards, so
    merge_get raised ValueError where one server answers HTTP 400 (chromadb.errors.ChromaError)."""
    cols = await _pair(oracle, sharded)
    await _fill(cols, 9)
    for kwargs in ({"offset": -1}, {"limit": 3, "offset": -2}, {"limit": -1, "offset": 2}):
        out_o, out_s = [await _outcome(lambda c=c, k=kwargs: c.get(**k)) for c in cols]
        assert out_o[0] == out_s[0] == "error", kwargs
        assert type(out_s[1]) is type(out_o[1]), f"{kwargs}: {out_s[1]!r} vs {out_o[1]!r}"


# -- lifecycle --------------------------------------------------------------------------------


async def test_client_calls_after_close_raise_client_closed(
    shard_urls: list[str], connect: Any
) -> None:
    client = await connect(shards=shard_urls)
    await client.create_collection("closing", embedding_function=None)
    await client.aclose()
    await client.aclose()  # idempotent
    calls: list[Callable[[], Awaitable[Any]]] = [
        client.heartbeat,
        client.list_collections,
        client.count_collections,
        client.get_max_batch_size,
        lambda: client.get_collection("closing", embedding_function=None),
        lambda: client.create_collection("other", embedding_function=None),
        lambda: client.get_or_create_collection("closing", embedding_function=None),
        lambda: client.delete_collection("closing"),
    ]
    for call in calls:
        with pytest.raises(sharded_chroma.ClientClosedError):
            await call()


async def test_collection_calls_after_close_raise_client_closed(
    shard_urls: list[str], connect: Any
) -> None:
    """Regression: these once raised ShardFailureError/PartialWriteError wrapping one
    ClientClosedError per shard."""
    client = await connect(shards=shard_urls)
    col = await client.create_collection("closing", embedding_function=None)
    await col.add(ids=["a", "b", "c"], embeddings=[[1.0] * DIM] * 3)
    await client.aclose()
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "count": col.count,
        "get": col.get,
        "query": lambda: col.query(query_embeddings=[[1.0] * DIM]),
        "add": lambda: col.add(ids=["d", "e", "f", "g"], embeddings=[[1.0] * DIM] * 4),
        "delete": lambda: col.delete(ids=["a", "b", "c"]),
        "peek": col.peek,
    }
    wrong = {}
    for name, call in calls.items():
        outcome = await _outcome(call)
        if not isinstance(outcome[1], sharded_chroma.ClientClosedError):
            wrong[name] = outcome[1]
    assert not wrong, wrong


# -- scan -------------------------------------------------------------------------------------


async def test_scan_pages_concatenate_to_get(sharded: Any) -> None:
    col = await sharded.create_collection("scanned", embedding_function=None)
    rng = random.Random(3)
    ids = [f"s{i:03d}" for i in range(47)]
    rng.shuffle(ids)
    embs = _emb(rng, 47)
    metas = [{"n": i % 5} for i in range(47)]
    for start in range(0, 47, 10):
        sl = slice(start, start + 10)
        await col.add(ids=ids[sl], embeddings=embs[sl], metadatas=metas[sl])
    await col.upsert(ids=[ids[3], "late"], embeddings=_emb(rng, 2))
    await col.delete(ids=[ids[10], ids[11]])
    full = await col.get(include=["embeddings", "metadatas"])
    assert len(full["ids"]) == 46
    for k in (1, 2, 5, 16, 45, 46, 47, 1000):
        pages = [p async for p in col.scan(batch_size=k, include=["embeddings", "metadatas"])]
        assert all(0 < len(p["ids"]) <= k for p in pages), k
        assert len(pages) == -(-46 // k), k
        assert [i for p in pages for i in p["ids"]] == full["ids"], k
        assert [m for p in pages for m in p["metadatas"]] == full["metadatas"], k
        assert np.allclose(np.concatenate([p["embeddings"] for p in pages]), full["embeddings"])
    filtered = await col.get(where={"n": {"$in": [1, 3]}}, include=[])
    pages = [p async for p in col.scan(batch_size=4, where={"n": {"$in": [1, 3]}}, include=[])]
    assert [i for p in pages for i in p["ids"]] == filtered["ids"]
    assert all(len(p["ids"]) <= 4 for p in pages)
    assert all(p["metadatas"] is None for p in pages)
    with pytest.raises(ValueError):
        async for _ in col.scan(batch_size=0):
            pass
