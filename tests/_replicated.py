"""Helpers for tests of a shard with copies: a client's lifetime, a node by URL, small vectors,
and a missed write its copy can never take."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import orjson

import sharded_chroma
from sharded_chroma import ShardedClient, Topology
from sharded_chroma._node import Node

DIM = 3


@contextlib.asynccontextmanager
async def client_for(topology: Topology) -> AsyncIterator[ShardedClient]:
    client = await sharded_chroma.AsyncHttpClient(topology=topology)
    try:
        yield client
    finally:
        await client.aclose()


def node_of(client: ShardedClient, url: str) -> Node:
    return next(n for n in client._runtime.cluster.all_nodes() if n.url == url)


def emb(x: float) -> list[list[float]]:
    """One vector of ``DIM`` equal values, as a one-record embeddings list."""
    return [[x] * DIM]


def queue_refused_hint(client: ShardedClient, url: str) -> None:
    """Queue, after ``url``'s first pending hint, a write that copy will always refuse (a
    vector of the wrong dimension), as the server's own error would make one."""
    log = client._runtime.cluster.hints
    assert log is not None
    good = log.pending(url)[0]
    bad = orjson.loads(good.body)
    bad["ids"], bad["embeddings"] = ["z"], [[1.0] * (DIM + 2)]
    log.append(
        url, good.tenant, good.database, good.collection_id, good.collection_name, "upsert",
        orjson.dumps(bad),
    )  # fmt: skip
