"""The FastAPI example, driven through httpx's ASGI transport against real Chroma servers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest

import sharded_chroma

fastapi = pytest.importorskip("fastapi")
from examples.fastapi_service.app import create_app  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture
async def service(shard_urls: list[str]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(sharded_chroma.Topology.from_urls(shard_urls))
    # The ASGI transport does not run the lifespan, so enter it explicitly.
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
            yield http


async def test_ingest_search_read(service: httpx.AsyncClient, shard_urls: list[str]) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(60, 8)).astype(np.float32)
    articles = [
        {
            "id": f"a{i}",
            "text": f"article {i}",
            "embedding": v.tolist(),
            "region": "eu" if i % 2 else "us",
        }
        for i, v in enumerate(vectors)
    ]
    resp = await service.post("/articles", json=articles)
    assert resp.status_code == 201, resp.text
    assert resp.json() == {"upserted": 60}
    assert (await service.get("/stats")).json() == {"articles": 60}

    hits = (await service.post("/search", json={"embedding": vectors[7].tolist(), "k": 3})).json()
    assert hits[0]["id"] == "a7"
    assert len(hits) == 3
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)

    eu = (
        await service.post(
            "/search", json={"embedding": vectors[8].tolist(), "k": 5, "region": "eu"}
        )
    ).json()
    assert len(eu) == 5 and all(h["region"] == "eu" for h in eu)
    # Brute force over the eu records (cosine distance) gives the same ids.
    eu_idx = [i for i in range(60) if i % 2]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    dist = 1 - unit[eu_idx] @ unit[8]
    expected = [f"a{eu_idx[j]}" for j in np.argsort(dist)[:5]]
    assert [h["id"] for h in eu] == expected

    assert (await service.get("/articles/a5")).json() == {"id": "a5", "text": "article 5"}
    assert (await service.get("/articles/nope")).status_code == 404
    assert (await service.post("/search", json={"embedding": [], "k": 3})).status_code == 422

    # The records really are spread over the shards.
    async with await sharded_chroma.AsyncHttpClient(shards=shard_urls) as client:
        counts = [s.records for s in await client.status()]
    assert sum(counts) == 60 and all(c > 0 for c in counts)
