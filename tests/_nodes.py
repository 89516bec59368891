"""Reaching one Chroma server directly with the official client, for tests that check what a
single node holds (placement, replica contents) or use one plain server as the oracle."""

from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import urlsplit

import chromadb
from chromadb.config import Settings


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
