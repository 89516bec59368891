"""Quickstart: a local 3-shard cluster of real Chroma servers, driven through sharded_chroma.

Starts three `chroma run` servers on free loopback ports in a temporary folder, writes a
deterministic sample corpus through the sharded client, runs a few queries and filtered reads,
prints per-shard counts and timings, then stops the servers it started.

    python examples/quickstart.py [--records 20000] [--dim 64]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import chromadb
import numpy as np

import sharded_chroma
from sharded_chroma.testing import LocalCluster

TOPICS = ["databases", "networks", "compilers", "graphics", "security", "storage"]
REGIONS = ["eu", "us", "ap"]


def corpus(n: int, dim: int, seed: int = 7) -> tuple[list[str], np.ndarray, list[str], list[dict]]:
    """Clustered vectors: each topic has a centre; a record is its topic's centre plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(TOPICS), dim)).astype(np.float32)
    topic = rng.integers(0, len(TOPICS), size=n)
    vectors = centres[topic] + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)
    ids = [f"doc-{i:06d}" for i in range(n)]
    docs = [f"note {i} about {TOPICS[t]}" for i, t in enumerate(topic)]
    metas = [
        {"topic": TOPICS[t], "region": REGIONS[i % len(REGIONS)], "year": 2000 + i % 25}
        for i, t in enumerate(topic)
    ]
    return ids, vectors, docs, metas


async def run(urls: list[str], n: int, dim: int) -> None:
    ids, vectors, docs, metas = corpus(n, dim)
    async with await sharded_chroma.AsyncHttpClient(shards=urls) as client:
        print(f"cluster: {len(urls)} shards, Chroma {await client.get_version()}")
        col = await client.get_or_create_collection(
            "quickstart", embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
        )
        batch = await client.get_max_batch_size()
        started = time.perf_counter()
        for i in range(0, n, batch):
            await col.add(
                ids=ids[i : i + batch],
                embeddings=vectors[i : i + batch],
                documents=docs[i : i + batch],
                metadatas=metas[i : i + batch],  # type: ignore[arg-type]
            )
        took = time.perf_counter() - started
        print(f"ingested {await col.count()} records in {took:.1f} s ({n / took:,.0f} records/s)")

        for url in urls:
            direct = await chromadb.AsyncHttpClient(
                host=url.split("//")[1].split(":")[0], port=int(url.rsplit(":", 1)[1])
            )
            shard_col = await direct.get_collection("quickstart", embedding_function=None)
            print(f"  {url}: {await shard_col.count()} records")

        probe = vectors[[3, 500, 1234 % n]]
        started = time.perf_counter()
        hits = await col.query(query_embeddings=probe, n_results=3)
        took = (time.perf_counter() - started) * 1000
        print(f"\n3 queries fanned out to {len(urls)} shards and merged in {took:.1f} ms:")
        for q, (row_ids, dists, row_docs) in enumerate(
            zip(hits["ids"], hits["distances"] or [], hits["documents"] or [], strict=True)
        ):
            print(f"  query {q}:")
            for rid, dist, doc in zip(row_ids, dists, row_docs, strict=True):
                print(f"    {rid}  distance={dist:.4f}  {doc!r}")

        eu = await col.query(
            query_embeddings=probe[:1], n_results=3, where={"region": "eu"}, include=["metadatas"]
        )
        print("\nfiltered to region=eu:", [m["region"] for m in (eu["metadatas"] or [[]])[0] if m])
        page = await col.get(limit=5, offset=10, include=[])
        print("get(limit=5, offset=10) in insertion order:", page["ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--shards", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sharded-chroma-") as tmp:
        print(f"starting {args.shards} local Chroma servers ...")
        with LocalCluster(args.shards, Path(tmp)) as cluster:
            asyncio.run(run(cluster.urls, args.records, args.dim))
        print("\nservers stopped.")


if __name__ == "__main__":
    main()
