"""Reaching one Chroma server directly with the official client, for tests that check what a
single node holds (placement, replica contents) or use one plain server as the oracle."""

from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import urlsplit

import chromadb
import numpy as np
from chromadb.config import Settings

from sharded_chroma.catalog._state import RESERVED_PREFIX

Record = tuple[Any, Any, tuple[float, ...]]
"""What a node holds for one id: (document, raw metadata, vector as float32 values)."""


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


async def official(url: str) -> Any:
    """chromadb's own AsyncHttpClient on one node (telemetry off)."""
    return await chromadb.AsyncHttpClient(
        host=urlsplit(url).hostname or "127.0.0.1",
        port=port_of(url),
        settings=Settings(anonymized_telemetry=False),
    )


async def drop_official_http_pools() -> None:
    """chromadb's AsyncFastAPI keeps one httpx client per event loop *hash* in a class-level
    dict; a later test's loop can reuse a dead loop's hash and get a client bound to it. Close
    and forget them around each test that uses the official client."""
    from chromadb.api.async_fastapi import AsyncFastAPI

    while AsyncFastAPI._clients:
        _, pool = AsyncFastAPI._clients.popitem()
        # A pool bound to a loop that is gone cannot be closed; dropping it is enough.
        with contextlib.suppress(Exception):
            await pool.aclose()


async def node_records(url: str, collection: str) -> dict[str, Record]:
    """Everything one server holds for ``collection``: id -> (document, raw metadata, vector)."""
    client = await official(url)
    col = await client.get_collection(collection, embedding_function=None)
    got = await col.get(include=["documents", "metadatas", "embeddings"])
    embeddings = got["embeddings"]
    assert embeddings is not None
    return {
        i: (d, dict(m or {}), tuple(float(x) for x in np.asarray(e, dtype=np.float32)))
        for i, d, m, e in zip(
            got["ids"], got["documents"] or [], got["metadatas"] or [], embeddings, strict=True
        )
    }


def clean(records: dict[str, Record]) -> dict[str, Record]:
    """Records as a user sees them: reserved metadata keys removed."""
    return {
        i: (d, {k: v for k, v in m.items() if not k.startswith(RESERVED_PREFIX)}, e)
        for i, (d, m, e) in records.items()
    }
