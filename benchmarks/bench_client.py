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

A and B also run a floor: a bare ``aiohttp.ClientSession`` posting the same ``/query`` body
sharded_chroma sends (orjson, float32 embeddings as JSON lists) straight to the server's v2
endpoint and decoding the answer with orjson; in B one such request per shard, gathered and
merged like the hand-rolled fan-out. sharded_chroma / floor is the cost of the SDK's own layers.

``--only add`` runs part D's loads alone (no queries, no official client): with PYTHONPATH set
the package is imported from there, so two commits can be compared process by process
(``benchmarks/_ingest_ab.py`` alternates them).

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
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Lets the script run from a checkout without installing the package. A PYTHONPATH, when set,
# wins: that is how another commit's package (a git worktree) is measured with this script.
sys.path.insert(
    len(sys.path) if os.environ.get("PYTHONPATH") else 0, str(Path(__file__).resolve().parents[1])
)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _machine
import aiohttp
import chromadb
import numpy as np
import orjson
from _data import Dataset, add_all, exact_top_k, make_dataset, recall_at_k
from _stats import closed_loop, paired_ratios, percentile, spread
from chromadb.config import Settings

import sharded_chroma

# Commits before dd12755 have no sharded_chroma.testing. Look in the imported package's own
# directory: an editable install's finder would otherwise load this checkout's testing package
# into another commit's process.
if (Path(sharded_chroma.__file__).resolve().parent / "testing").is_dir():
    from sharded_chroma.testing import LocalCluster
else:
    from sharded_chroma._local_cluster import LocalCluster  # type: ignore[import-not-found,no-redef]

K = 10
ADD_BATCH = 1000
CONFIGURATION: Any = {"hnsw": {"space": "l2"}}

# The include list sharded_chroma sends for query()'s default include, sorted as it sends it.
WIRE_INCLUDE = ["distances", "documents", "metadatas"]
# Goals of sharded_chroma against the floor (issue "One write path", Benchmarks).
FLOOR_CPU_GOAL = 1.3
FLOOR_QPS_GOAL = 0.95

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


def top_k_ids(results: Sequence[Any]) -> list[str]:
    """The hand-rolled merge: every shard's rows of the first query, the K nearest by distance."""
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


def fanout_query(collections: Sequence[Any]) -> QueryFn:
    """The hand-rolled baseline: the same query to every shard, then the top K by distance."""

    async def query(q: np.ndarray) -> list[str]:
        results = await asyncio.gather(
            *(c.query(query_embeddings=q, n_results=K) for c in collections)
        )
        return top_k_ids(results)

    return query


def query_url(url: str, collection_id: Any) -> str:
    return (
        f"{url}/api/v2/tenants/default_tenant/databases/default_database"
        f"/collections/{collection_id}/query"
    )


def floor_session() -> aiohttp.ClientSession:
    """One bare session per server, with the connection settings sharded_chroma's transport
    uses (64 connections, 30 s keep-alive, JSON content type)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=30),
        headers={"Content-Type": "application/json"},
    )


async def floor_post(session: aiohttp.ClientSession, url: str, q: np.ndarray) -> Any:
    """The body sharded_chroma posts for ``query(query_embeddings=q, n_results=K)``: the same
    keys, the float32 matrix written by orjson as nested JSON lists, the answer read by orjson."""
    body = {
        "ids": None,
        "query_embeddings": q,
        "n_results": K,
        "where": None,
        "where_document": None,
        "include": WIRE_INCLUDE,
    }
    data = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    async with session.post(url, data=data) as resp:
        payload = await resp.read()
        if resp.status >= 400:
            raise RuntimeError(f"floor query: HTTP {resp.status}: {payload[:200]!r}")
    return orjson.loads(payload)


def floor_query(session: aiohttp.ClientSession, url: str) -> QueryFn:
    async def query(q: np.ndarray) -> list[str]:
        answer = await floor_post(session, url, q)
        return list(answer["ids"][0])

    return query


def floor_fanout(targets: Sequence[tuple[aiohttp.ClientSession, str]]) -> QueryFn:
    """The floor of a fan-out: one bare request per shard, gathered, merged like the baseline."""

    async def query(q: np.ndarray) -> list[str]:
        results = await asyncio.gather(*(floor_post(s, u, q) for s, u in targets))
        return top_k_ids(results)

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
    # Client CPU per record added (us): time.process_time() over the load / records.
    add_cpu: Series = dataclasses.field(default_factory=Series)
    answers: list[list[str]] = dataclasses.field(default_factory=list)


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


async def timed_add(coll: Any, data: Dataset, pair: Pair) -> float:
    """Load the whole dataset into ``coll``; records/s and client CPU per record into ``pair``."""
    cpu0 = time.process_time()
    rate = await add_all(coll, data, ADD_BATCH)
    cpu_us = (time.process_time() - cpu0) / len(data) * 1e6
    pair.add.values.append(rate)
    pair.add_cpu.values.append(cpu_us)
    return rate


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
                f"  round {rnd + 1}/{args.rounds} {name:>10}: p50 {seq.p50_ms:7.2f} ms  "
                f"p99 {seq.p99_ms:7.2f} ms  cpu {seq.cpu_ms:6.3f} ms/q  {qps:7.1f} q/s"
            )


async def part_a(url: str, data: Dataset, args: argparse.Namespace) -> dict[str, Pair]:
    log(f"A. one server {url}: official chromadb client vs sharded_chroma (1 shard) vs floor")
    official = await official_client(url)
    sharded = await sharded_chroma.AsyncHttpClient(shards=[url])
    session = floor_session()
    pairs = {"official": Pair(), "floor": Pair(), "sharded": Pair()}
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
                rate = await timed_add(coll, data, pairs[name])
                log(f"  add round {rnd + 1}/{args.add_rounds} {name:>9}: {rate:8.0f} records/s")
                if rnd == 0:
                    collections[name] = coll
                else:
                    await client.delete_collection(coll_name)
        # The floor reads the sharded client's collection: the same index the SDK queries.
        physical = await official.get_collection("bench_a_sharded_0", embedding_function=None)
        clients = {
            "official": single_query(collections["official"]),
            "floor": floor_query(session, query_url(url, physical.id)),
            "sharded": single_query(collections["sharded"]),
        }
        await measure_queries(clients, pairs, data, args)
    finally:
        await sharded.aclose()
        await session.close()
    return pairs


async def part_b(urls: list[str], data: Dataset, args: argparse.Namespace) -> dict[str, Pair]:
    log(
        f"B. {len(urls)} servers: sharded_chroma vs hand-rolled fan-out over official clients "
        "vs floor fan-out"
    )
    sharded = await sharded_chroma.AsyncHttpClient(shards=urls)
    sessions = [floor_session() for _ in urls]
    pairs = {"fan-out": Pair(), "floor": Pair(), "sharded": Pair()}
    try:
        coll = await sharded.create_collection(
            "bench_b", configuration=CONFIGURATION, embedding_function=None
        )
        rate = await timed_add(coll, data, pairs["sharded"])
        log(f"  loaded {len(data)} records over {len(urls)} shards: {rate:.0f} records/s")
        # One physical collection of the same name lives on every shard; the baselines read
        # those directly, so all clients query exactly the same indexes.
        officials = [await official_client(u) for u in urls]
        per_shard = [await c.get_collection("bench_b", embedding_function=None) for c in officials]
        counts = [await c.count() for c in per_shard]
        log(f"  records per shard: {counts}")
        floor_targets = [
            (s, query_url(u, c.id)) for s, u, c in zip(sessions, urls, per_shard, strict=True)
        ]
        clients = {
            "fan-out": fanout_query(per_shard),
            "floor": floor_fanout(floor_targets),
            "sharded": single_query(coll),
        }
        await measure_queries(clients, pairs, data, args)
    finally:
        await sharded.aclose()
        for s in sessions:
            await s.close()
    return pairs


async def part_d(
    urls: list[str], data: Dataset, args: argparse.Namespace, *, queries: bool = True
) -> dict[str, Pair]:
    """Sharding itself: the same sharded_chroma client code on one server holding everything
    vs on ``--shards`` servers. Queries go to the collections loaded in A and B; add throughput
    is measured on fresh collections, the two setups alternating round by round. Only the
    public API is used, so ``queries=False`` (``--only add``) also runs against older commits.
    """
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
                rate = await timed_add(coll, data, pairs[name])
                log(
                    f"  add round {rnd + 1}/{args.add_rounds} {name:>9}: {rate:8.0f} records/s  "
                    f"cpu {pairs[name].add_cpu.values[-1]:6.1f} us/record"
                )
                await client.delete_collection(coll_name)
        if not queries:
            return pairs
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


def package_info() -> dict[str, str]:
    """Where sharded_chroma was imported from (a PYTHONPATH worktree or this checkout) and the
    commit checked out there, with ``+dirty`` when the package differs from that commit."""
    pkg = Path(sharded_chroma.__file__).resolve().parent
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(pkg)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True)
        if head.returncode == 0:
            commit = head.stdout.decode().strip() + ("+dirty" if dirty.stdout.strip() else "")
    return {"sharded_chroma from": str(pkg), "sharded_chroma commit": commit}


def machine_info() -> dict[str, str]:
    return _machine.machine_info(aiohttp=aiohttp.__version__, **package_info())


def verdict(ratio: float, target: float | None, higher_is_better: bool) -> str:
    if target is None or ratio != ratio:
        return ""
    if higher_is_better:
        return f">= {target:g}x  {'met' if ratio >= target else 'MISSED'}"
    return f"<= {target:g}x  {'met' if ratio <= target else 'MISSED'}"


Row = tuple[str, str, float | None, bool, float | None]


def table(
    title: str,
    base_name: str,
    base: Pair,
    new: Pair,
    rows: Sequence[Row],
    new_name: str = "sharded",
    floor: Pair | None = None,
) -> list[str]:
    """Rows of (label, metric attribute, target or None, higher is better, floor goal or None).

    ``ratio`` is the ratio of medians, new / base. With a ``floor``, two more columns: new /
    floor as the median of the per-round ratios with their range, and the floor goal."""
    lines = [title]
    header = f"  {'metric':<36}{base_name:>11}"
    if floor is not None:
        header += f"{'floor':>9}"
    header += f"{new_name:>11}{'ratio':>9}   {'target':<16}"
    if floor is not None:
        header += f"{new_name + ' / floor':<27}goal"
    lines += [header, "  " + "-" * (len(header) + 12)]
    for label, attr, target, higher, floor_goal in rows:
        b = getattr(base, attr).median
        n = getattr(new, attr).median
        ratio = n / b if b else float("nan")
        line = f"  {label:<36}{b:>11.2f}"
        if floor is not None:
            line += f"{getattr(floor, attr).median:>9.2f}"
        line += f"{n:>11.2f}{ratio:>8.2f}x   {verdict(ratio, target, higher):<16}"
        if floor is not None and getattr(floor, attr).values:
            ratios = paired_ratios(getattr(new, attr).values, getattr(floor, attr).values)
            line += f"{spread(ratios):<27}{verdict(statistics.median(ratios), floor_goal, higher)}"
        lines.append(line.rstrip())
    return lines


def floor_summary(args: argparse.Namespace, a: dict[str, Pair], b: dict[str, Pair]) -> list[str]:
    """The floor ratios on their own, each as median of per-round ratios [min-max]."""
    shards = args.shards
    cpu_a = paired_ratios(a["sharded"].cpu.values, a["floor"].cpu.values)
    qps_a = paired_ratios(a["sharded"].qps.values, a["floor"].qps.values)
    per_shard = [v / shards for v in b["sharded"].cpu.values]
    # Round i of B against round i of A: the brief's "per shard request vs floor per request".
    cpu_b_a = paired_ratios(per_shard, a["floor"].cpu.values)
    cpu_b = paired_ratios(b["sharded"].cpu.values, b["floor"].cpu.values)
    qps_b = paired_ratios(b["sharded"].qps.values, b["floor"].qps.values)
    official = paired_ratios(a["official"].cpu.values, a["floor"].cpu.values)
    fanout = paired_ratios(b["fan-out"].cpu.values, b["floor"].cpu.values)

    def row(label: str, ratios: list[float], goal: float | None, higher: bool) -> str:
        return f"  {label:<66}{spread(ratios):<24}{verdict(med(ratios), goal, higher)}".rstrip()

    return [
        "E. sharded_chroma against the floor (bare aiohttp, same /query body); per-round "
        "ratios: median [min-max]",
        row("1 server: client CPU per request", cpu_a, FLOOR_CPU_GOAL, False),
        row(f"1 server: throughput @{args.concurrency}", qps_a, FLOOR_QPS_GOAL, True),
        row(
            f"{shards} shards: CPU per shard request (query / {shards}) vs 1-server floor",
            cpu_b_a,
            FLOOR_CPU_GOAL,
            False,
        ),
        row(f"{shards} shards: CPU per query vs floor fan-out", cpu_b, FLOOR_CPU_GOAL, False),
        row(
            f"{shards} shards: throughput @{args.concurrency} vs floor fan-out",
            qps_b,
            FLOOR_QPS_GOAL,
            True,
        ),
        row("(official client: CPU per request vs floor)", official, None, False),
        row("(hand-rolled official fan-out: CPU per query vs floor fan-out)", fanout, None, False),
        f"  floor CPU per request: {a['floor'].cpu.median:.3f} ms (1 server), "
        f"{b['floor'].cpu.median / shards:.3f} ms per shard request in the {shards}-shard "
        f"fan-out; sharded_chroma {a['sharded'].cpu.median:.3f} ms and "
        f"{b['sharded'].cpu.median / shards:.3f} ms",
    ]


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


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
        "A. one server: official chromadb.AsyncHttpClient vs sharded_chroma (1 shard); "
        "floor = bare aiohttp",
        "official",
        a["official"],
        a["sharded"],
        [
            ("query latency p50 (ms)", "p50", 0.6, False, None),
            ("query latency p99 (ms)", "p99", None, False, None),
            (f"throughput @{args.concurrency} (queries/s)", "qps", 2.0, True, FLOOR_QPS_GOAL),
            ("client CPU per query (ms)", "cpu", 0.3, False, FLOOR_CPU_GOAL),
            (f"add, batches of {ADD_BATCH} (records/s)", "add", 1.0, True, None),
            ("add, client CPU per record (us)", "add_cpu", None, False, None),
        ],
        floor=a["floor"],
    )
    lines.append("")
    lines += table(
        f"B. {args.shards} servers: hand-rolled fan-out (official clients) vs sharded_chroma; "
        "floor = bare aiohttp fan-out",
        "fan-out",
        b["fan-out"],
        b["sharded"],
        [
            ("query latency p50 (ms)", "p50", None, False, None),
            ("query latency p99 (ms)", "p99", None, False, None),
            (f"throughput @{args.concurrency} (queries/s)", "qps", None, True, FLOOR_QPS_GOAL),
            ("client CPU per query (ms)", "cpu", None, False, FLOOR_CPU_GOAL),
        ],
        floor=b["floor"],
    )
    lines.append(
        f"  sharded add over {args.shards} shards (one load): "
        f"{b['sharded'].add.median:.0f} records/s, "
        f"{b['sharded'].add_cpu.median:.1f} us client CPU per record"
    )
    lines.append("")
    lines += floor_summary(args, a, b)
    lines.append("")
    lines.append(f"C. recall@{K} against exact brute-force neighbours (numpy, squared L2)")
    for label, value in recalls.items():
        lines.append(f"  {label:<56}{value:>8.4f}")
    lines.append("")
    one, many = list(d)
    lines += table(
        f"D. sharded_chroma on 1 server holding everything vs {args.shards} shards "
        f"(ratio = {many} / {one})",
        one,
        d[one],
        d[many],
        [
            ("query latency p50 (ms)", "p50", None, False, None),
            ("query latency p99 (ms)", "p99", None, False, None),
            (f"throughput @{args.concurrency} (queries/s)", "qps", None, True, None),
            ("client CPU per query (ms)", "cpu", None, False, None),
            (f"add, batches of {ADD_BATCH} (records/s)", "add", None, True, None),
            ("add, client CPU per record (us)", "add_cpu", None, False, None),
        ],
        new_name=many,
    )
    r1 = recalls["one server, sharded_chroma (1 shard)"]
    rn = recalls[f"{args.shards} shards, sharded_chroma"]
    lines.append(f"  {'recall@' + str(K) + ' (from C)':<36}{r1:>11.4f}{rn:>11.4f}{rn / r1:>8.3f}x")
    lines.append("=" * 78)
    return "\n".join(lines)


def raw_numbers(pairs: dict[str, Pair]) -> dict[str, dict[str, list[float]]]:
    return {n: {k: v.values for k, v in _series(p).items()} for n, p in pairs.items()}


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
        "one server, floor (same collection as sharded_chroma)": recall_at_k(
            a["floor"].answers, truth, K
        ),
        f"{args.shards} shards, sharded_chroma": recall_at_k(b["sharded"].answers, truth, K),
        f"{args.shards} shards, hand-rolled fan-out": recall_at_k(b["fan-out"].answers, truth, K),
        f"{args.shards} shards, floor fan-out": recall_at_k(b["floor"].answers, truth, K),
    }
    same = sum(f == s for f, s in zip(a["floor"].answers, a["sharded"].answers, strict=True))
    log(f"  floor and sharded_chroma gave the same ids on {same}/{len(data.queries)} queries")
    info["load average at end"] = _machine.load_average()
    text = report(info, args, a, b, recalls, d)
    print(text, flush=True)
    return {
        "machine": info,
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "A": raw_numbers(a),
        "B": raw_numbers(b),
        "D": raw_numbers(d),
        "recall": recalls,
    }


async def run_add_only(urls: list[str], data: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    """``--only add``: part D's loads alone (sharded_chroma's public API only)."""
    info = machine_info()
    d = await part_d(urls, data, args, queries=False)
    info["load average at end"] = _machine.load_average()
    lines = ["", "=" * 78, "Add only (part D's loads; medians over rounds)", "=" * 78]
    lines += [f"  {k}: {v}" for k, v in info.items()]
    lines.append(
        f"  run: records={args.records} dim={args.dim} shards={args.shards} "
        f"add_rounds={args.add_rounds} batch={ADD_BATCH}"
    )
    for name, pair in d.items():
        rates = ", ".join(f"{v:.0f}" for v in pair.add.values)
        cpus = ", ".join(f"{v:.1f}" for v in pair.add_cpu.values)
        lines.append(
            f"  {name:<10} {pair.add.median:8.0f} records/s ({rates});  "
            f"client CPU {pair.add_cpu.median:6.1f} us/record ({cpus})"
        )
    lines.append("=" * 78)
    print("\n".join(lines), flush=True)
    return {
        "machine": info,
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "D": raw_numbers(d),
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
    p.add_argument(
        "--only",
        choices=("all", "add"),
        default="all",
        help="'add': only part D's loads (1 server vs --shards shards, --add-rounds each),\n"
        "no queries and no official client; works against older commits via PYTHONPATH",
    )
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
            runner = run_add_only if args.only == "add" else run
            raw = asyncio.run(runner(cluster.urls, data, args))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
