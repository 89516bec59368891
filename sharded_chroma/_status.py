"""Cluster status: per shard health, version, latency, record counts and a memory estimate."""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import numpy as np
from chromadb.errors import NotFoundError

from ._errors import NodeUnavailableError
from ._nodeconfig import redact_url as _redact
from ._nodestate import NodeState
from ._transport import NodeTransport, iter_collections
from .catalog._layouts import parts_database
from .catalog._state import BUCKET_META as _BUCKET_META
from .catalog._state import GENERATION_META as _GENERATION_META
from .catalog._state import ID_META as _ID_META
from .catalog._state import PARENT_META as _PARENT_META

if TYPE_CHECKING:
    from ._node import Node
    from .cluster._cluster import Cluster

__all__ = ["CollectionStatus", "ShardStatus", "cluster_status", "estimate_server_memory"]

# Chroma 1.5.9 server RSS model, fitted by benchmarks/bench_server_memory.py on this project's
# machine (2026-11-26; within 17% of measured RSS for 10,000 to 80,000 records at 128 and 384
# dimensions): an idle server, a small cost per collection holding records, a fixed cost per
# record (ids, metadata, index links) and the vectors with HNSW overhead. Empty collections
# cost next to nothing. The common "records x dimension x 4" rule underestimated those servers
# by 2.7x to 29x.
IDLE_BYTES = 117 * 2**20
PER_COLLECTION_BYTES = 5 * 2**20
PER_RECORD_BYTES = 659
VECTOR_OVERHEAD = 1.43


def estimate_server_memory(collections: dict[str, tuple[int, int | None]]) -> int:
    """Estimated resident memory of one server holding ``{name: (records, dimension)}``."""
    total = float(IDLE_BYTES)
    for records, dim in collections.values():
        if records:
            total += PER_COLLECTION_BYTES + PER_RECORD_BYTES * records
            total += VECTOR_OVERHEAD * records * (dim or 0) * 4
    return int(total)


@dataclass(frozen=True)
class CollectionStatus:
    name: str
    records: int
    dimension: int | None


@dataclass(frozen=True)
class ShardStatus:
    """One shard's primary node as seen by one status call."""

    shard: str
    url: str
    healthy: bool
    role: str = "primary"
    stale: bool = False
    """Behind: the node missed writes that are not replayed yet, or lost some (needs repair);
    it serves no reads until then."""
    pending_hints: int = 0
    version: str | None = None
    latency_ms: float | None = None
    error: str | None = None
    collections: tuple[CollectionStatus, ...] = field(default_factory=tuple)
    needs_repair: bool = False
    """It lost writes nobody will replay (a full log, an expired or refused hint): only a
    repair (``sharded-chroma repair``) brings them back. As the host's durable node state says,
    whichever process found it."""
    repair_reason: str | None = None
    """Why it needs repair (the first cause recorded), with any credentials in URLs masked."""
    quarantined_hints: int = 0
    """Hints the node kept refusing, set aside until a repair."""
    latency_p99_ms: float | None = None
    """``latency_ms`` is the median of the heartbeat probes; this their 99th percentile."""
    probes: int = 0
    probe_errors: int = 0
    """Heartbeat probes that failed, of ``probes`` (a node down fails them all)."""

    @property
    def error_rate(self) -> float:
        return self.probe_errors / self.probes if self.probes else 0.0

    @property
    def records(self) -> int:
        return sum(c.records for c in self.collections)

    @property
    def estimated_memory_bytes(self) -> int:
        return estimate_server_memory({c.name: (c.records, c.dimension) for c in self.collections})


async def _collections(
    transport: NodeTransport, tenant: str, database: str
) -> list[CollectionStatus]:
    """Every collection on a node with its count; a time bucket (a physical collection in the
    companion database) is listed as ``<collection>/<bucket>``, a rebuild's generation as
    ``<collection>/gen<n>``."""
    base = f"/tenants/{tenant}/databases/{database}/collections"
    cols = []
    names: dict[str, str] = {}
    async for item in iter_collections(transport, base):
        meta = item.get("metadata") or {}
        names[str(meta.get(_ID_META, item["id"]))] = str(item["name"])
        count = await transport.request("GET", f"{base}/{item['id']}/count")
        cols.append(CollectionStatus(str(item["name"]), int(count), item.get("dimension")))
    parts = f"/tenants/{tenant}/databases/{parts_database(database)}/collections"
    buckets = []
    with contextlib.suppress(NotFoundError):  # no time bucket was ever made on this node
        buckets = [item async for item in iter_collections(transport, parts)]
    for item in buckets:
        meta = item.get("metadata") or {}
        label = meta.get(_BUCKET_META) or (
            f"gen{meta[_GENERATION_META]}" if meta.get(_GENERATION_META) else None
        )
        if not label:
            continue  # bookkeeping (a collection's delete marks), not a part of records
        parent = names.get(str(meta.get(_PARENT_META)), f"(deleted {meta.get(_PARENT_META)})")
        count = await transport.request("GET", f"{parts}/{item['id']}/count")
        name = f"{parent}/{label}"
        cols.append(CollectionStatus(name, int(count), item.get("dimension")))
    return cols


# Any user:password part of a URL inside free text (an error a server or library gave).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _masked(text: str | None) -> str | None:
    """``text`` with every URL in it passed through the topology's redaction."""
    return None if text is None else _URL_IN_TEXT.sub(lambda m: _redact(m.group(0)), text)


async def shard_status(
    shard: str,
    transport: NodeTransport,
    tenant: str,
    database: str,
    deadline: float,
    *,
    role: str = "primary",
    stale: bool = False,
    pending_hints: int = 0,
    state: NodeState | None = None,
    probes: int = 1,
) -> ShardStatus:
    """Ask one node for its health (``probes`` heartbeats: their median and 99th percentile
    latency and how many failed), version and per-collection counts; never raises for an
    unreachable node (that is what status is for). ``state`` is the node's durable state
    (needs repair, quarantined hints), read by the caller."""
    known = state or NodeState()
    reason = _masked(known.reason) if known.needs_repair else None
    latencies: list[float] = []
    errors = 0
    try:
        # The first probe says whether the node is up at all; each later one gets the whole
        # deadline too, and one that fails or times out is counted, not fatal.
        with anyio.fail_after(deadline):
            started = time.perf_counter()
            await transport.request("GET", "/heartbeat")
            latencies.append((time.perf_counter() - started) * 1000)
        for _ in range(max(1, probes) - 1):
            started = time.perf_counter()
            try:
                with anyio.fail_after(deadline):
                    await transport.request("GET", "/heartbeat")
            except (NodeUnavailableError, TimeoutError):
                errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)
        with anyio.fail_after(deadline):
            version = await transport.request("GET", "/version")
            cols = await _collections(transport, tenant, database)
    except Exception as exc:  # reported, not raised: a status view must show dead nodes
        return ShardStatus(
            shard,
            transport.url,
            False,
            role,
            stale,
            pending_hints,
            error=_masked(f"{type(exc).__name__}: {exc}"),
            needs_repair=known.needs_repair,
            repair_reason=reason,
            quarantined_hints=known.quarantined,
            probes=max(1, probes),
            probe_errors=max(1, errors),
        )
    return ShardStatus(
        shard,
        transport.url,
        True,
        role,
        stale,
        pending_hints,
        version=str(version),
        latency_ms=float(np.percentile(latencies, 50)),
        collections=tuple(cols),
        needs_repair=known.needs_repair,
        repair_reason=reason,
        quarantined_hints=known.quarantined,
        latency_p99_ms=float(np.percentile(latencies, 99)),
        probes=max(1, probes),
        probe_errors=errors,
    )


async def cluster_status(
    cluster: Cluster, tenant: str, database: str, node_deadline: float, probes: int
) -> tuple[ShardStatus, ...]:
    """Every node's status, asked concurrently, primary first within each shard; the node
    state is the host's durable one, re-read first."""
    states = cluster.node_states
    await anyio.to_thread.run_sync(states.refresh)
    out: dict[str, ShardStatus] = {}

    async def one(shard: str, node: Node) -> None:
        state = states.get(node.url)
        out[node.url] = await shard_status(
            shard,
            node.transport,
            tenant,
            database,
            node_deadline,
            role=node.role,
            stale=state.behind,
            pending_hints=state.pending,
            state=state,
            probes=probes,
        )

    async with anyio.create_task_group() as tg:
        for rs in cluster.shards.values():
            for node in rs.nodes:
                tg.start_soon(one, rs.name, node)
    return tuple(out[n.url] for n in cluster.all_nodes())
