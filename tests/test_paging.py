"""Large get()s are read from each shard in pages (a Chroma server refuses one get matching more
than 32,766 records); the page size is shrunk here so a small collection spans many pages."""

from __future__ import annotations

import pytest

import sharded_chroma
from sharded_chroma.ops import _partio

pytestmark = pytest.mark.anyio


async def test_paged_shard_reads_give_the_same_get(
    shard_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await sharded_chroma.AsyncHttpClient(shards=shard_urls) as client:
        col = await client.create_collection("paging", embedding_function=None)
        ids = [f"p{i:03d}" for i in range(120)]
        await col.add(
            ids=ids,
            embeddings=[[float(i), 1.0] for i in range(120)],
            documents=[f"doc {i}" for i in range(120)],
        )
        whole = await col.get(include=["documents", "embeddings"])
        window = await col.get(limit=33, offset=41, include=["documents"])
        assert whole["ids"] == ids

        monkeypatch.setattr(_partio, "GET_PAGE", 7)
        before = sum(s.requests for s in client.node_stats().values())
        paged = await col.get(include=["documents", "embeddings"])
        requests = sum(s.requests for s in client.node_stats().values()) - before
        assert requests >= 120 // 7, "the shards were not read in pages"
        assert paged["ids"] == whole["ids"]
        assert paged["documents"] == whole["documents"]
        assert (paged["embeddings"] == whole["embeddings"]).all()
        assert (await col.get(limit=33, offset=41, include=["documents"])) == window
        assert (await col.get(limit=5))["ids"] == ids[:5]
