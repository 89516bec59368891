"""Measure what replica sets buy: read throughput, tail latency with hedging, write cost.

Run from the repository root: ``python benchmarks/bench_replicas.py`` (about 3-6 minutes on two
cores) or ``python benchmarks/bench_replicas.py --quick`` (a smoke run under a minute).

The script starts three Chroma servers on loopback in a temporary directory (the hint log lives
there too), loads deterministic clustered vectors into one shard made of a primary and two
replicas, and measures, each against a baseline taken in the same run on the same servers:

1. read throughput at ``--concurrency`` concurrent queries with ``read_selection``
   ``round_robin`` and ``latency`` against ``primary_only`` (same three copies, same data);
2. read latency p50/p99 with one replica behind a ``FaultProxy`` that adds a heavy-tailed
   delay (``pareto_delay``), hedging on (``--hedge-after``, ``--hedge-budget``) against off,
   both with ``round_robin``, plus the extra node requests hedging cost;
3. add throughput (batches of ``--batch``) with ``write_concern="all"`` over three copies
   against one node on its own (a one-shard topology without replicas on server 0).

Every measurement is repeated ``--rounds`` times with the configurations' order reversed every
other round; the tables show medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Lets the script run from a checkout without installing the package; the fault proxy is the
# test suite's (tests/_proxy.py), which needs nothing beyond the standard library.
_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_ROOT / "benchmarks"))
sys.path.insert(0, str(_ROOT / "tests"))

import _machine  # noqa: E402
import numpy as np  # noqa: E402
from _data import Dataset, add_all, make_dataset  # noqa: E402
from _proxy import FaultProxy, pareto_delay  # noqa: E402
from _stats import alternate, log, med, percentile  # noqa: E402

import sharded_chroma  # noqa: E402
from sharded_chroma.testing import LocalCluster  # noqa: E402

K = 10
CONFIGURATION: Any = {"hnsw": {"space": "l2"}}
COLLECTION = "replicas_bench"


# -- topologies and clients ------------------------------------------------------------------


def replica_topology(
    primary: str, replicas: Sequence[str], hints_dir: Path, **replication: Any
) -> sharded_chroma.Topology:
    return sharded_chroma.Topology.build(
        {
            "shards": [{"name": "s0", "primary": primary, "replicas": list(replicas)}],
            "replication": {"hints_dir": str(hints_dir), **replication},
        }
    )


async def open_client(topology: sharded_chroma.Topology) -> Any:
    return await sharded_chroma.AsyncHttpClient(topology=topology)


def total_requests(client: Any) -> int:
    return sum(s.requests for s in client.node_stats().values())


async def query_one(collection: Any, q: np.ndarray) -> None:
    await collection.query(query_embeddings=q, n_results=K)


async def throughput(collection: Any, queries: np.ndarray, total: int, workers: int) -> float:
    """``total`` queries by ``workers`` tasks, each sending its next when one returns; q/s."""
    position = 0

    async def worker() -> None:
        nonlocal position
        while position < total:
            i = position % len(queries)
            position += 1
            await query_one(collection, queries[i : i + 1])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return total / (time.perf_counter() - t0)


async def sequential(collection: Any, queries: np.ndarray) -> list[float]:
    """One query at a time; wall-clock seconds per query."""
    latencies = []
    for i in range(len(queries)):
        t0 = time.perf_counter()
        await query_one(collection, queries[i : i + 1])
        latencies.append(time.perf_counter() - t0)
    return latencies


async def warm_up(collection: Any, queries: np.ndarray, n: int) -> None:
    for i in range(min(n, len(queries))):
        await query_one(collection, queries[i : i + 1])


# -- parts -----------------------------------------------------------------------------------


async def part_reads(
    urls: list[str], data: Dataset, hints: Path, args: argparse.Namespace
) -> dict[str, list[float]]:
    """1. Concurrent read throughput by read_selection over the same three copies."""
    names = ["primary_only", "round_robin", "latency"]
    clients = {
        n: await open_client(replica_topology(urls[0], urls[1:], hints, read_selection=n))
        for n in names
    }
    out: dict[str, list[float]] = {n: [] for n in names}
    try:
        cols = {
            n: await c.get_collection(COLLECTION, embedding_function=None)
            for n, c in clients.items()
        }
        for n in names:
            await warm_up(cols[n], data.queries, args.warmup)
        for r in range(args.rounds):
            for n in alternate(names, r):
                qps = await throughput(
                    cols[n], data.queries, args.throughput_queries, args.concurrency
                )
                out[n].append(qps)
                log(f"  reads round {r + 1}: {n:<13} {qps:8.1f} q/s")
    finally:
        for c in clients.values():
            await c.aclose()
    return out


async def part_hedging(
    cluster: LocalCluster, data: Dataset, hints: Path, args: argparse.Namespace
) -> dict[str, dict[str, list[float]]]:
    """2. Latency with one replica slowed by a heavy-tailed delay, hedging on vs off."""
    servers = cluster.servers
    out: dict[str, dict[str, list[float]]] = {
        n: {"p50": [], "p99": [], "extra": []} for n in ("off", "on")
    }
    jitter = pareto_delay(args.slow_scale, args.slow_alpha, args.slow_cap)
    with FaultProxy(servers[2].host, servers[2].port) as proxy:
        primary, replicas = servers[0].url, [servers[1].url, proxy.url]
        configs = {
            "off": {"read_selection": "round_robin"},
            "on": {
                "read_selection": "round_robin",
                "hedge_after": args.hedge_after,
                "hedge_budget": args.hedge_budget,
            },
        }
        clients = {
            n: await open_client(replica_topology(primary, replicas, hints, **cfg))
            for n, cfg in configs.items()
        }
        try:
            cols = {
                n: await c.get_collection(COLLECTION, embedding_function=None)
                for n, c in clients.items()
            }
            for n in configs:
                await warm_up(cols[n], data.queries, args.warmup)
            queries = data.queries[: args.latency_queries]
            for r in range(args.rounds):
                for n in alternate(list(configs), r):
                    # Re-seeded per measurement: both configurations meet the same delays.
                    proxy.set_latency(0.0, jitter=jitter, seed=1000 + r)
                    before = total_requests(clients[n])
                    lat = await sequential(cols[n], queries)
                    sent = total_requests(clients[n]) - before
                    proxy.set_latency(0.0)
                    p50, p99 = percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3
                    extra = (sent - len(queries)) / len(queries)
                    out[n]["p50"].append(p50)
                    out[n]["p99"].append(p99)
                    out[n]["extra"].append(extra)
                    log(
                        f"  hedging round {r + 1}: {n:<3} p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  "
                        f"extra requests {extra:.3f}"
                    )
        finally:
            for c in clients.values():
                await c.aclose()
    return out


async def part_writes(
    urls: list[str], data: Dataset, hints: Path, args: argparse.Namespace
) -> dict[str, list[float]]:
    """3. Add throughput: write_concern all over three copies vs one node alone."""
    clients = {
        "single": await open_client(replica_topology(urls[0], [], hints)),
        "all x3": await open_client(
            replica_topology(urls[0], urls[1:], hints, write_concern="all")
        ),
    }
    out: dict[str, list[float]] = {n: [] for n in clients}
    try:
        for r in range(args.add_rounds):
            for n in alternate(list(clients), r):
                name = f"replicas_write_{r}_{'single' if n == 'single' else 'all'}"
                client = clients[n]
                col = await client.create_collection(
                    name, configuration=CONFIGURATION, embedding_function=None
                )
                rate = await add_all(col, data, args.batch)
                await client.delete_collection(name)
                out[n].append(rate)
                log(f"  writes round {r + 1}: {n:<7} {rate:8.0f} records/s")
    finally:
        for c in clients.values():
            await c.aclose()
    return out


# -- report ----------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    return _machine.machine_info()


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(
    info: dict[str, str],
    args: argparse.Namespace,
    reads: dict[str, list[float]],
    hedge: dict[str, dict[str, list[float]]],
    writes: dict[str, list[float]],
) -> str:
    lines = ["", "=" * 78, "Results (medians over rounds)", "=" * 78]
    lines += [f"  {k}: {v}" for k, v in info.items()]
    with contextlib.suppress(OSError):
        lines.append("  load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    lines.append(
        f"  run: records={args.records} dim={args.dim} queries={args.queries} "
        f"rounds={args.rounds} concurrency={args.concurrency} "
        f"throughput_queries={args.throughput_queries} latency_queries={args.latency_queries} "
        f"add_rounds={args.add_rounds} batch={args.batch} n_results={K}"
    )
    base = med(reads["primary_only"])
    lines += [
        "",
        f"1. read throughput, concurrency {args.concurrency}, 1 primary + 2 replicas "
        "(ratio = / primary_only)",
        f"  {'read_selection':<24}{'q/s':>10}{'ratio':>9}",
    ]
    for n in ("primary_only", "round_robin", "latency"):
        v = med(reads[n])
        lines.append(f"  {n:<24}{v:>10.1f}{v / base:>8.2f}x")

    off, on = hedge["off"], hedge["on"]
    p99_ratio = med(off["p99"]) / med(on["p99"])
    extra_on = med(on["extra"])
    lines += [
        "",
        f"2. sequential reads, round_robin, one replica slowed by pareto_delay(scale="
        f"{args.slow_scale}, alpha={args.slow_alpha}, cap={args.slow_cap}); hedge_after="
        f"{args.hedge_after}, hedge_budget={args.hedge_budget}",
        f"  {'hedging':<24}{'p50 ms':>10}{'p99 ms':>10}{'extra req':>11}",
    ]
    for n, d in (("off", off), ("on", on)):
        lines.append(
            f"  {n:<24}{med(d['p50']):>10.1f}{med(d['p99']):>10.1f}{med(d['extra']):>11.3f}"
        )
    lines.append(
        f"  p99 off/on {p99_ratio:.2f}x (target >= 3x: {verdict(p99_ratio >= 3)}); "
        f"extra requests {extra_on:.3f} (target <= 0.10: {verdict(extra_on <= 0.10)})"
    )

    single, rep = med(writes["single"]), med(writes["all x3"])
    lines += [
        "",
        f"3. add throughput, batches of {args.batch} (ratio = / single node)",
        f"  {'setup':<24}{'records/s':>10}{'ratio':>9}",
        f"  {'single node':<24}{single:>10.0f}{1.0:>8.2f}x",
        f"  {'write_concern=all, 3':<24}{rep:>10.0f}{rep / single:>8.2f}x",
    ]
    return "\n".join(lines)


# -- driver ----------------------------------------------------------------------------------


async def run(cluster: LocalCluster, data: Dataset, hints: Path, args: argparse.Namespace) -> str:
    info = machine_info()
    urls = cluster.urls
    log(f"loading {len(data)} records into 1 primary + 2 replicas")
    loader = await open_client(replica_topology(urls[0], urls[1:], hints, write_concern="all"))
    try:
        col = await loader.create_collection(
            COLLECTION, configuration=CONFIGURATION, embedding_function=None
        )
        await add_all(col, data, args.batch)
    finally:
        await loader.aclose()
    log("1. read throughput by read_selection")
    reads = await part_reads(urls, data, hints, args)
    log("2. tail latency with a slowed replica, hedging off vs on")
    hedge = await part_hedging(cluster, data, hints, args)
    log("3. write throughput, concern all over 3 copies vs one node")
    writes = await part_writes(urls, data, hints, args)
    return report(info, args, reads, hedge, writes)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    p.add_argument("--records", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=400, help="held-out queries")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--throughput-queries", type=int, default=None, help="default 3 x --queries")
    p.add_argument("--latency-queries", type=int, default=None, help="default --queries")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--add-rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--hedge-after", type=float, default=0.02)
    p.add_argument("--hedge-budget", type=float, default=0.1)
    p.add_argument("--slow-scale", type=float, default=0.003, help="pareto_delay scale (s)")
    p.add_argument("--slow-alpha", type=float, default=1.0, help="pareto_delay alpha")
    p.add_argument("--slow-cap", type=float, default=1.0, help="pareto_delay cap (s)")
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.dim, args.queries = 2000, 64, 100
        args.rounds, args.add_rounds, args.warmup = 1, 1, 5
    if args.throughput_queries is None:
        args.throughput_queries = 3 * args.queries
    if args.latency_queries is None:
        args.latency_queries = args.queries
    args.latency_queries = min(args.latency_queries, args.queries)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    data = make_dataset(args.records, args.dim, args.queries)
    log(f"dataset: {args.records} x {args.dim} float32, {args.queries} held-out queries")
    with tempfile.TemporaryDirectory(prefix="bench_replicas_") as tmp:
        cluster = LocalCluster(3, Path(tmp) / "servers")
        hints = Path(tmp) / "hints"
        log("starting 3 local chroma servers")
        # LocalCluster.start stops whatever it started if a server fails; the with-block
        # stops every server when the benchmark ends, on error or Ctrl-C too.
        with cluster:
            log(f"servers: {', '.join(cluster.urls)}")
            text = asyncio.run(run(cluster, data, hints, args))
    print(text)
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
