"""Compare sharded_chroma's client with chromadb's official async client on local servers.

Run from the repository root: ``python benchmarks/bench_client.py`` (about 7-12 minutes on two
cores) or ``python benchmarks/bench_client.py --quick`` (a smoke run under a minute).

The script starts its own Chroma servers on loopback in a temporary directory, loads
deterministic clustered vectors, and measures against the same servers in one run:

A. one server: official ``chromadb.AsyncHttpClient`` vs ``sharded_chroma.AsyncHttpClient``
   with one shard: sequential query latency, concurrent query throughput, client CPU per query
   and add throughput;
B. ``--shards`` servers: the sharded client vs a hand-rolled fan-out over one official client
   per server (asyncio.gather, then a top-k merge in Python): throughput and client CPU;
C. recall@10 of each against exact brute-force neighbours;
D. ``--shards`` shards vs one server holding everything, both driven by sharded_chroma (the
   1-shard collection from A vs the sharded collection from B): query latency, throughput,
   client CPU, add throughput into fresh collections, and recall@10 side by side.

Client CPU is ``time.process_time()`` of this process; the servers are separate processes, so
it counts only the client's work. Each measurement is repeated ``--rounds`` times with the
clients' order alternating, and the median is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import heapq
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Lets the script run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _machine
import chromadb
import numpy as np
from _data import Dataset, add_all, exact_top_k, make_dataset, recall_at_k
from _stats import closed_loop, percentile
from chromadb.config import Settings

import sharded_chroma
from sharded_chroma._local_cluster import LocalCluster

K = 10
ADD_BATCH = 1000
CONFIGURATION: Any = {"hnsw": {"space": "l2"}}

QueryFn = Callable[[np.ndarray], Awaitable[list[str]]]


# -- measurement --------------------------------------------------------------------------


@dataclasses.dataclass
class Sequential:
    p50_ms: float
    p99_ms: float
    cpu_ms: float
    answers: list[list[str]]


@dataclasses.dataclass
class Series:
    """Per-round values of one metric for one client; ``median`` is what gets reported."""

    values: list[float] = dataclasses.field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


async def run_sequential(query: QueryFn, queries: np.ndarray) -> Sequential:
    """One query at a time; wall-clock latency per query and client CPU for the whole run."""
    latencies: list[float] = []
    answers: list[list[str]] = []
    cpu0 = time.process_time()
    for i in range(len(queries)):
        t0 = time.perf_counter()
        ids = await query(queries[i : i + 1])
        latencies.append(time.perf_counter() - t0)
        answers.append(ids)
    cpu = time.process_time() - cpu0
    return Sequential(
        p50_ms=percentile(latencies, 50) * 1e3,
        p99_ms=percentile(latencies, 99) * 1e3,
        cpu_ms=cpu / len(queries) * 1e3,
        answers=answers,
    )


async def run_concurrent(query: QueryFn, queries: np.ndarray, total: int, workers: int) -> float:
    """``total`` queries by ``workers`` tasks each issuing its next query when one returns;
    returns queries per second of wall-clock time."""
    n = len(queries)
    return await closed_loop(lambda i: query(queries[i % n : i % n + 1]), total, workers)


# -- clients ------------------------------------------------------------------------------


async def official_client(url: str) -> Any:
    parts = urlsplit(url)
    return await chromadb.AsyncHttpClient(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 8000,
        # Telemetry would try to reach the internet from a background thread.
        settings=Settings(anonymized_telemetry=False),
    )


async def close_official_clients() -> None:
    """chromadb 1.5's AsyncFastAPI keeps one httpx client per event loop in a class-level dict
    shared by every instance and offers no public close; close them before the loop ends."""
    from chromadb.api.async_fastapi import AsyncFastAPI

    while AsyncFastAPI._clients:
        _, client = AsyncFastAPI._clients.popitem()
        with contextlib.suppress(Exception):
            await client.aclose()


def single_query(collection: Any) -> QueryFn:
    async def query(q: np.ndarray) -> list[str]:
        result = await collection.query(query_embeddings=q, n_results=K)
        return list(result["ids"][0])

    return query


def fanout_query(collections: Sequence[Any]) -> QueryFn:
    """The hand-rolled baseline: the same query to every shard, then the top K by distance."""

    async def query(q: np.ndarray) -> list[str]:
        results = await asyncio.gather(
            *(c.query(query_embeddings=q, n_results=K) for c in collections)
        )
        rows: list[tuple[float, str, Any, Any]] = []
        for r in results:
            rows.extend(
                zip(
                    r["distances"][0],
                    r["ids"][0],
                    r["metadatas"][0],
                    r["documents"][0],
                    strict=True,
                )
            )
        top = heapq.nsmallest(K, rows, key=itemgetter(0))
        return [row[1] for row in top]

    return query


# -- benchmark ------------------------------------------------------------------------------


@dataclasses.dataclass
class Pair:
    """One client's series per metric."""

    p50: Series = dataclasses.field(default_factory=Series)
    p99: Series = dataclasses.field(default_factory=Series)
    cpu: Series = dataclasses.field(default_factory=Series)
    qps: Series = dataclasses.field(default_factory=Series)
    add: Series = dataclasses.field(default_factory=Series)
    answers: list[list[str]] = dataclasses.field(default_factory=list)


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


async def measure_queries(
    clients: dict[str, QueryFn], pairs: dict[str, Pair], data: Dataset, args: argparse.Namespace
) -> None:
    """Warm up every client, then ``rounds`` rounds of sequential + concurrent phases, the
    clients' order reversed every other round so drift on a shared machine hits both alike."""
    names = list(clients)
    for name in names:
        await run_concurrent(clients[name], data.queries, args.warmup, min(4, args.concurrency))
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            seq = await run_sequential(clients[name], data.queries)
            pair = pairs[name]
            pair.p50.values.append(seq.p50_ms)
            pair.p99.values.append(seq.p99_ms)
            pair.cpu.values.append(seq.cpu_ms)
            if not pair.answers:
                pair.answers = seq.answers
            qps = await run_concurrent(
                clients[name], data.queries, args.throughput_queries, args.concurrency
            )
            pair.qps.values.append(qps)
            log(
                f"  round {rnd + 1}/{args.rounds} {name:>9}: p50 {seq.p50_ms:7.2f} ms  "
                f"p99 {seq.p99_ms:7.2f} ms  cpu {seq.cpu_ms:6.3f} ms/q  {qps:7.1f} q/s"
            )


async def part_a(url: str, data: Dataset, args: argparse.Namespace) -> dict[str, Pair]:
    log(f"A. one server {url}: official chromadb client vs sharded_chroma (1 shard)")
    official = await official_client(url)
    sharded = await sharded_chroma.AsyncHttpClient(shards=[url])
    pairs = {"official": Pair(), "sharded": Pair()}
    collections: dict[str, Any] = {}
    try:
        makers = {"official": official, "sharded": sharded}
        for rnd in range(args.add_rounds):
            order = list(makers) if rnd % 2 == 0 else list(makers)[::-1]
            for name in order:
                client = makers[name]
                coll_name = f"bench_a_{name}_{rnd}"
                coll = await client.create_collection(
                    coll_name, configuration=CONFIGURATION, embedding_function=None
                )
                rate = await add_all(coll, data, ADD_BATCH)
                pairs[name].add.values.append(rate)
                log(f"  add round {rnd + 1}/{args.add_rounds} {name:>9}: {rate:8.0f} records/s")
                if rnd == 0:
                    collections[name] = coll
                else:
                    await client.delete_collection(coll_name)
        clients = {name: single_query(coll) for name, coll in collections.items()}
        await measure_queries(clients, pairs, data, args)
    finally:
        await sharded.aclose()
    return pairs


async def part_b(urls: list[str], data: Dataset, args: argparse.Namespace) -> dict[str, Pair]:
    log(f"B. {len(urls)} servers: sharded_chroma vs hand-rolled fan-out over official clients")
    sharded = await sharded_chroma.AsyncHttpClient(shards=urls)
    pairs = {"fan-out": Pair(), "sharded": Pair()}
    try:
        coll = await sharded.create_collection(
            "bench_b", configuration=CONFIGURATION, embedding_function=None
        )
        rate = await add_all(coll, data, ADD_BATCH)
        pairs["sharded"].add.values.append(rate)
        log(f"  loaded {len(data)} records over {len(urls)} shards: {rate:.0f} records/s")
        # One physical collection of the same name lives on every shard; the baseline reads
        # those directly, so both clients query exactly the same indexes.
        officials = [await official_client(u) for u in urls]
        per_shard = [await c.get_collection("bench_b", embedding_function=None) for c in officials]
        counts = [await c.count() for c in per_shard]
        log(f"  records per shard: {counts}")
        clients = {"fan-out": fanout_query(per_shard), "sharded": single_query(coll)}
        await measure_queries(clients, pairs, data, args)
    finally:
        await sharded.aclose()
    return pairs


async def part_d(urls: list[str], data: Dataset, args: argparse.Namespace) -> dict[str, Pair]:
    """Sharding itself: the same sharded_chroma client code on one server holding everything
    vs on ``--shards`` servers. Queries go to the collections loaded in A and B; add throughput
    is measured on fresh collections, the two setups alternating round by round."""
    log(f"D. sharded_chroma: one server holding everything vs {len(urls)} shards")
    one = await sharded_chroma.AsyncHttpClient(shards=[urls[0]])
    many = await sharded_chroma.AsyncHttpClient(shards=urls)
    makers = {"1 server": one, f"{len(urls)} shards": many}
    slugs = {"1 server": "one", f"{len(urls)} shards": "many"}
    pairs = {name: Pair() for name in makers}
    try:
        for rnd in range(args.add_rounds):
            order = list(makers) if rnd % 2 == 0 else list(makers)[::-1]
            for name in order:
                client = makers[name]
                coll_name = f"bench_d_{slugs[name]}_{rnd}"
                coll = await client.create_collection(
                    coll_name, configuration=CONFIGURATION, embedding_function=None
                )
                rate = await add_all(coll, data, ADD_BATCH)
                pairs[name].add.values.append(rate)
                log(f"  add round {rnd + 1}/{args.add_rounds} {name:>9}: {rate:8.0f} records/s")
                await client.delete_collection(coll_name)
        colls = [
            await one.get_collection("bench_a_sharded_0", embedding_function=None),
            await many.get_collection("bench_b", embedding_function=None),
        ]
        clients = {name: single_query(c) for name, c in zip(makers, colls, strict=True)}
        await measure_queries(clients, pairs, data, args)
    finally:
        await one.aclose()
        await many.aclose()
    return pairs


# -- report -------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    import aiohttp

    return _machine.machine_info(aiohttp=aiohttp.__version__)


def verdict(ratio: float, target: float | None, higher_is_better: bool) -> str:
    if target is None or ratio != ratio:
        return ""
    if higher_is_better:
        return f">= {target:g}x  {'met' if ratio >= target else 'MISSED'}"
    return f"<= {target:g}x  {'met' if ratio <= target else 'MISSED'}"


def table(
    title: str,
    base_name: str,
    base: Pair,
    new: Pair,
    rows: Sequence[tuple[str, str, float | None, bool]],
    new_name: str = "sharded",
) -> list[str]:
    """Rows of (label, metric attribute, target or None, higher is better)."""
    lines = [title]
    header = f"  {'metric':<36}{base_name:>11}{new_name:>11}{'ratio':>9}   target"
    lines += [header, "  " + "-" * (len(header) + 12)]
    for label, attr, target, higher in rows:
        b = getattr(base, attr).median
        n = getattr(new, attr).median
        ratio = n / b if b else float("nan")
        lines.append(
            f"  {label:<36}{b:>11.2f}{n:>11.2f}{ratio:>8.2f}x   {verdict(ratio, target, higher)}"
        )
    return lines


def report(
    info: dict[str, str],
    args: argparse.Namespace,
    a: dict[str, Pair],
    b: dict[str, Pair],
    recalls: dict[str, float],
    d: dict[str, Pair],
) -> str:
    lines = ["", "=" * 78, "Results (medians over rounds; ratio = sharded / baseline)", "=" * 78]
    lines += [f"  {k}: {v}" for k, v in info.items()]
    lines.append(
        f"  run: records={args.records} dim={args.dim} queries={args.queries} "
        f"shards={args.shards} concurrency={args.concurrency} rounds={args.rounds} "
        f"throughput_queries={args.throughput_queries} add_rounds={args.add_rounds} "
        f"n_results={K}"
    )
    lines.append("")
    lines += table(
        "A. one server: official chromadb.AsyncHttpClient vs sharded_chroma (1 shard)",
        "official",
        a["official"],
        a["sharded"],
        [
            ("query latency p50 (ms)", "p50", 0.6, False),
            ("query latency p99 (ms)", "p99", None, False),
            (f"throughput @{args.concurrency} (queries/s)", "qps", 2.0, True),
            ("client CPU per query (ms)", "cpu", 0.3, False),
            (f"add, batches of {ADD_BATCH} (records/s)", "add", 1.0, True),
        ],
    )
    lines.append("")
    lines += table(
        f"B. {args.shards} servers: hand-rolled fan-out (official clients) vs sharded_chroma",
        "fan-out",
        b["fan-out"],
        b["sharded"],
        [
            ("query latency p50 (ms)", "p50", None, False),
            ("query latency p99 (ms)", "p99", None, False),
            (f"throughput @{args.concurrency} (queries/s)", "qps", None, True),
            ("client CPU per query (ms)", "cpu", None, False),
        ],
    )
    lines.append(
        f"  sharded add over {args.shards} shards (one load): "
        f"{b['sharded'].add.median:.0f} records/s"
    )
    lines.append("")
    lines.append(f"C. recall@{K} against exact brute-force neighbours (numpy, squared L2)")
    for label, value in recalls.items():
        lines.append(f"  {label:<52}{value:>8.4f}")
    lines.append("")
    one, many = list(d)
    lines += table(
        f"D. sharded_chroma on 1 server holding everything vs {args.shards} shards "
        f"(ratio = {many} / {one})",
        one,
        d[one],
        d[many],
        [
            ("query latency p50 (ms)", "p50", None, False),
            ("query latency p99 (ms)", "p99", None, False),
            (f"throughput @{args.concurrency} (queries/s)", "qps", None, True),
            ("client CPU per query (ms)", "cpu", None, False),
            (f"add, batches of {ADD_BATCH} (records/s)", "add", None, True),
        ],
        new_name=many,
    )
    r1 = recalls["one server, sharded_chroma (1 shard)"]
    rn = recalls[f"{args.shards} shards, sharded_chroma"]
    lines.append(f"  {'recall@' + str(K) + ' (from C)':<36}{r1:>11.4f}{rn:>11.4f}{rn / r1:>8.3f}x")
    lines.append("=" * 78)
    return "\n".join(lines)


async def run(urls: list[str], data: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    """Run every part and print the report; returns the raw numbers."""
    info = machine_info()
    try:
        a = await part_a(urls[0], data, args)
        b = await part_b(urls, data, args)
        d = await part_d(urls, data, args)
    finally:
        await close_official_clients()

    log("C. recall against exact neighbours")
    truth_rows = exact_top_k(data.vectors, data.queries, K)
    truth = [[data.ids[i] for i in row] for row in truth_rows]
    recalls = {
        "one server, official client": recall_at_k(a["official"].answers, truth, K),
        "one server, sharded_chroma (1 shard)": recall_at_k(a["sharded"].answers, truth, K),
        f"{args.shards} shards, sharded_chroma": recall_at_k(b["sharded"].answers, truth, K),
        f"{args.shards} shards, hand-rolled fan-out": recall_at_k(b["fan-out"].answers, truth, K),
    }
    text = report(info, args, a, b, recalls, d)
    print(text, flush=True)
    return {
        "machine": info,
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "A": {n: {k: v.values for k, v in _series(p).items()} for n, p in a.items()},
        "B": {n: {k: v.values for k, v in _series(p).items()} for n, p in b.items()},
        "D": {n: {k: v.values for k, v in _series(p).items()} for n, p in d.items()},
        "recall": recalls,
    }


def _series(pair: Pair) -> dict[str, Series]:
    return {f.name: getattr(pair, f.name) for f in dataclasses.fields(pair) if f.name != "answers"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--records", type=int, default=20000, help="records loaded (default 20000)")
    p.add_argument("--dim", type=int, default=384, help="vector dimension (default 384)")
    p.add_argument("--queries", type=int, default=200, help="held-out queries (default 200)")
    p.add_argument("--shards", type=int, default=3, help="servers for parts B and D (default 3)")
    p.add_argument(
        "--concurrency", type=int, default=32, help="queries in flight for throughput (32)"
    )
    p.add_argument("--rounds", type=int, default=3, help="query rounds per client (default 3)")
    p.add_argument(
        "--throughput-queries",
        type=int,
        default=None,
        help="queries per throughput measurement (default 2 x --queries)",
    )
    p.add_argument(
        "--add-rounds",
        type=int,
        default=3,
        help="fresh-collection loads per client in A and per setup in D (default 3)",
    )
    p.add_argument("--warmup", type=int, default=None, help="warm-up queries per client")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (well under a minute)")
    p.add_argument("--json", metavar="PATH", help="also write the raw per-round numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.dim, args.queries = 2000, 64, 40
        args.rounds, args.add_rounds = 1, 1
        args.concurrency = min(args.concurrency, 8)
    if args.throughput_queries is None:
        args.throughput_queries = 2 * args.queries
    if args.warmup is None:
        args.warmup = min(args.queries, 20)
    for name in ("records", "dim", "queries", "shards", "concurrency", "rounds", "add_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    data = make_dataset(args.records, args.dim, args.queries)
    log(f"dataset: {args.records} x {args.dim} float32, {args.queries} held-out queries")
    with tempfile.TemporaryDirectory(prefix="bench_client_") as tmp:
        cluster = LocalCluster(args.shards, Path(tmp))
        log(f"starting {args.shards} local chroma server(s)")
        # LocalCluster.start stops whatever it started if a server fails; the with-block
        # stops every server when the benchmark ends, on error or Ctrl-C too.
        with cluster:
            log(f"servers: {', '.join(cluster.urls)}")
            raw = asyncio.run(run(cluster.urls, data, args))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
