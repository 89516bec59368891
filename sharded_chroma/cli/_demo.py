"""`sharded-chroma demo`: a local 3-shard cluster, a sample corpus, queries, counts, timings."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from .._client import AsyncHttpClient, ShardedClient
from .._local_cluster import LocalCluster
from ._corpus import batches, query_vectors
from ._progress import Progress
from ._status_view import render_status

__all__ = ["run_demo"]

COLLECTION = "demo"


def run_demo(*, shards: int, records: int, dim: int, out: Any) -> None:
    with tempfile.TemporaryDirectory(prefix="sharded-chroma-demo-") as tmp:
        out(f"starting {shards} local Chroma servers (loopback, free ports) ...")
        started = time.perf_counter()
        with LocalCluster(shards, Path(tmp)) as cluster:
            out(f"  up in {time.perf_counter() - started:.1f} s: {', '.join(cluster.urls)}")
            anyio.run(_demo, cluster.urls, records, dim, out)
        out("servers stopped; demo data removed.")


async def _demo(urls: list[str], records: int, dim: int, out: Any) -> None:
    async with await AsyncHttpClient(shards=urls) as client:
        col = await client.get_or_create_collection(
            COLLECTION, embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
        )
        batch = min(await client.get_max_batch_size(), 2500)
        progress = Progress("ingest", records)
        for b in batches(records, dim, batch):
            await col.add(
                ids=b.ids,
                embeddings=b.embeddings,
                documents=b.documents,
                metadatas=b.metadatas,  # type: ignore[arg-type]
            )
            progress.advance(len(b.ids))
        progress.finish()
        took = progress.elapsed
        out(f"\ningested {records:,} records in {took:.1f} s ({records / took:,.0f} records/s)")
        out(f"collection count (summed over shards): {await col.count():,}\n")
        await _queries(client, col, dim, out)
        out("\nper-shard view (sharded-chroma status):")
        out(render_status(await client.status()))


async def _queries(client: ShardedClient, col: Any, dim: int, out: Any) -> None:
    probes = query_vectors(50, dim)
    timings = []
    for q in probes:
        started = time.perf_counter()
        await col.query(query_embeddings=[q], n_results=10)
        timings.append((time.perf_counter() - started) * 1000)
    out(
        f"50 queries, each fanned out to {len(client.topology.shards)} shards and merged: "
        f"median {statistics.median(timings):.1f} ms, max {max(timings):.1f} ms"
    )
    hits = await col.query(query_embeddings=probes[:2], n_results=3)
    for qi, (ids, dists, docs) in enumerate(
        zip(hits["ids"], hits["distances"] or [], hits["documents"] or [], strict=True)
    ):
        out(f"  query {qi}:")
        for rid, dist, doc in zip(ids, dists, docs, strict=True):
            out(f"    {rid}  {dist:.4f}  {doc}")
    eu = await col.query(
        query_embeddings=probes[:1], n_results=3, where={"region": "eu"}, include=["metadatas"]
    )
    regions = [m["region"] for m in (eu["metadatas"] or [[]])[0] if m]
    out(f"  where region=eu -> {eu['ids'][0]} (regions {regions})")
    page = await col.get(limit=5, offset=1000, include=[])
    out(f"  get(limit=5, offset=1000), global insertion order: {page['ids']}")
