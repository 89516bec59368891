"""One client shared by threads, each running its own event loop (the usual sync wrapper)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import sharded_chroma


def test_client_shared_between_threads_with_their_own_loops(shard_urls: list[str]) -> None:
    client = asyncio.run(sharded_chroma.AsyncHttpClient(shards=shard_urls))
    col = asyncio.run(client.create_collection("threads", embedding_function=None))
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        async def job() -> None:
            for k in range(5):
                ids = [f"t{t}-{k}-{i}" for i in range(6)]
                await col.add(
                    ids=ids, embeddings=[[float(t), float(k), float(i)] for i in range(6)]
                )
                got = await col.get(ids=ids, include=[])
                assert sorted(got["ids"]) == sorted(ids)

        try:
            asyncio.run(job())
        except BaseException as exc:  # reported below with every thread's failure
            with lock:
                errors.append(exc)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(worker, range(8)))
    assert not errors, errors[:3]

    async def check() -> tuple[int, list[str]]:
        return await col.count(), (await col.get(include=[]))["ids"]

    count, ids = asyncio.run(check())
    assert count == 8 * 5 * 6 == len(set(ids))
    asyncio.run(client.aclose())
