"""Helpers of the rebalancing tests: topologies with a control store, writer processes that
also query, and the checks every migration test makes afterwards."""

from __future__ import annotations

import asyncio
import pickle
import random
import time
from pathlib import Path
from typing import Any

import sharded_chroma
from tests._history import Op
from tests.test_concurrent_writes import NAME, REPAIR_AFTER, Log, one_call, pool_of, raw_parts

__all__ = [
    "gathered_with_reads",
    "owners_of",
    "query_checker",
    "topology_for",
    "writer_process",
]


def topology_for(urls: list[str], control: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Shards s0, s1, ... on ``urls`` with a control store (``control`` is its table)."""
    return {
        "shards": [{"name": f"s{i}", "primary": u} for i, u in enumerate(urls)],
        "repair_after": REPAIR_AFTER,
        "control": {"lease_ttl": 4.0, "ack_timeout": 60.0, **control},
        **extra,
    }


async def query_checker(col: Any, until: float, seed: str, stop: Any) -> list[str]:
    """Queries and full gets until ``until`` or ``stop`` (read load on every phase). A result
    holding one id twice is reported, though the merge drops repeated ids, so this guards the
    merge rather than the marks: those are checked by ``count()`` in the kill tests and by
    ``test_rebalance_review``."""
    rng = random.Random(seed)
    found: list[str] = []
    while time.monotonic() < until and not stop.is_set():
        vector = [rng.random() for _ in range(3)]
        try:
            got = await col.query(query_embeddings=[vector], n_results=10)
            ids = got["ids"][0]
            if len(ids) != len(set(ids)):
                found.append(f"query returned a duplicate id: {sorted(ids)}")
            listed = (await col.get(include=[]))["ids"]
            if len(listed) != len(set(listed)):
                found.append(f"get() returned {len(listed) - len(set(listed))} duplicate ids")
        except Exception:  # a failed read is allowed; it is not a wrong one
            pass
        await asyncio.sleep(0.05)
    return found


async def _write_until(
    col: Any, name: str, pool: list[str], stop: Any, cap: float, log: Log
) -> None:
    rng = random.Random(name)
    n = 0
    while not stop.is_set() and time.monotonic() < cap:
        await one_call(col, rng, f"{name}-{n}", pool, log)
        n += 1


def writer_process(
    topology: dict[str, Any], prefix: str, ids: int, seconds: float, out: str, gate: Any, stop: Any
) -> None:
    """A spawned process: writers and a query checker on its own client until ``stop`` is set
    (at most ``seconds``), then its history (and the duplicate reports) pickled to ``out``."""

    async def run() -> tuple[Log, list[str]]:
        client = await sharded_chroma.AsyncHttpClient(
            topology=sharded_chroma.Topology.build(topology)
        )
        col = await client.get_collection(NAME, embedding_function=None)
        await asyncio.to_thread(gate.wait, 120)
        cap = time.monotonic() + seconds
        log = Log()
        pool = pool_of(ids)
        results = await asyncio.gather(
            *(_write_until(col, f"{prefix}{t}", pool, stop, cap, log) for t in range(3)),
            query_checker(col, cap, prefix, stop),
        )
        dupes = results[-1]
        await client.aclose()
        return log, dupes

    log, dupes = asyncio.run(run())
    Path(out).write_bytes(pickle.dumps((log.ops, log.errors, dupes)))


def gathered_with_reads(outs: list[Path]) -> tuple[list[Op], list[str], list[str]]:
    ops: list[Op] = []
    errors: list[str] = []
    dupes: list[str] = []
    for out in outs:
        got_ops, got_errors, got_dupes = pickle.loads(out.read_bytes())
        ops += got_ops
        errors += got_errors
        dupes += got_dupes
    return ops, errors, dupes


async def owners_of(urls: list[str], cluster_id: str) -> dict[str, list[str]]:
    """Shard name -> the ids its root collection holds (raw, every copy)."""
    parts = await raw_parts(urls, cluster_id)
    out: dict[str, list[str]] = {}
    for key, ids in parts.items():
        out.setdefault(key.split(":", 1)[0], []).extend(ids)
    return out
