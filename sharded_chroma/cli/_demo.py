"""`sharded-chroma demo`: a local 3-shard cluster, a sample corpus, queries, counts, timings."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from chromadb.api.types import Where

from .._client import ShardedClient
from .._factory import AsyncHttpClient
from .._policies import FieldPolicy
from ..testing import LocalCluster
from ._corpus import REGIONS, batches, query_vectors
from ._progress import Progress
from ._status_view import render_layout, render_status

__all__ = ["run_demo"]

COLLECTION = "demo"
REGIONS_COLLECTION = "demo-regions"


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
        await _ingest(col, records, dim, batch, progress)
        progress.finish()
        took = progress.elapsed
        out(f"\ningested {records:,} records in {took:.1f} s ({records / took:,.0f} records/s)")
        out(f"collection count (summed over shards): {await col.count():,}\n")
        await _queries(client, col, dim, out)
        await _regions(client, min(records, 10_000), dim, batch, out)
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


async def _ingest(
    col: Any, records: int, dim: int, batch: int, progress: Progress | None = None
) -> None:
    """Add the sample corpus's first ``records`` records, one batch at a time."""
    for b in batches(records, dim, batch):
        await col.add(
            ids=b.ids,
            embeddings=b.embeddings,
            documents=b.documents,
            metadatas=b.metadatas,
        )
        if progress is not None:
            progress.advance(len(b.ids))


async def _regions(client: ShardedClient, records: int, dim: int, batch: int, out: Any) -> None:
    """A second collection placed by region: a filter on the region asks one shard."""
    names = [s.name for s in client.topology.shards]
    policy = FieldPolicy(
        field="region", partitions={r: (names[i % len(names)],) for i, r in enumerate(REGIONS)}
    )
    col = await client.create_collection(REGIONS_COLLECTION, embedding_function=None, policy=policy)
    await _ingest(col, records, dim, batch)
    out(f"\n{records:,} records placed by region ({policy.kind} policy: region -> shard):")
    out(render_layout(await client.layout(REGIONS_COLLECTION)))
    probe = query_vectors(1, dim)
    await col.query(query_embeddings=probe, n_results=3)  # learn physical ids first
    pinned: Where = {"region": "eu"}
    for where in (pinned, None):
        before = {u: s.requests for u, s in client.node_stats().items()}
        await col.query(query_embeddings=probe, n_results=3, where=where)
        asked = sum(s.requests > before[u] for u, s in client.node_stats().items())
        out(f"  query where={where}: asked {asked} of {len(names)} shard(s)")
