"""Measure what placement policies buy: pruned queries, and what placing writes costs.

Run from the repository root: ``python benchmarks/bench_policies.py`` (about 5-7 minutes on
two busy cores) or ``python benchmarks/bench_policies.py --quick`` (a smoke run, under 20 s).

Four Chroma servers on loopback in a temporary directory, one shard each (``s0``-``s3``).
Deterministic clustered vectors, each record with metadata ``region`` (one of four), ``topic``
(an int, one of four) and ``ts`` (epoch seconds on one of four days), drawn independently, so
each filter below keeps about a quarter of the records. The same records go into ``hash`` (no
policy: hash of the id), ``field`` (``FieldPolicy`` on ``region``, one region per shard) and
``time`` (``TimePolicy`` on ``ts``, one day bucket per shard, ``hot="s3"``). Measured:

1. queries against the same ``where`` on the ``hash`` collection, which cannot prune and asks
   all four shards: ``region`` = one region (the field policy prunes to one shard), ``ts``
   within one day (the time policy prunes to one bucket) and ``topic`` = one value (control:
   not a routing field, so both fan out). Query i filters on value i mod 4. Sequential p50/p99,
   throughput at ``--concurrency``, shards and requests per query (``client.node_stats()``
   deltas), recall@10 against exact filtered neighbours;
2. ingestion into a fresh collection, batches of ``--batch`` sent one at a time (sequential
   writer), records/s: field, time (generated order, days mixed; and sorted by ``ts``), hash.

Each measurement is repeated ``--rounds`` (``--add-rounds``) times, the configurations' order
reversed every other round; tables show medians and ratios against the baseline's median.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# Lets the script run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _machine
import numpy as np
from _data import Dataset, exact_top_k, make_dataset, recall_at_k
from _stats import alternate, closed_loop, log, med, percentile

import sharded_chroma
from sharded_chroma.testing import LocalCluster

K = 10
SHARDS = 4
CONFIGURATION: Any = {"hnsw": {"space": "l2"}}
REGIONS = ("eu", "us", "ap", "sa")
DAYS = ("2026-11-20", "2026-11-21", "2026-11-22", "2026-11-23")
DAY0 = int(datetime(2026, 11, 20, tzinfo=timezone.utc).timestamp())
DAY = 86_400
POLICIES: dict[str, Any] = {
    "hash": None,
    "field": sharded_chroma.FieldPolicy(
        field="region", partitions={r: (f"s{i}",) for i, r in enumerate(REGIONS)}
    ),
    "time": sharded_chroma.TimePolicy(
        field="ts", granularity="day", hot="s3", buckets={d: f"s{i}" for i, d in enumerate(DAYS)}
    ),
}
# (label, collection, filter kind): each policy collection's query, then its hash baseline.
QUERY_CONFIGS = [
    (f"{col}, {kind}", col, kind)
    for kind, policy in (("region", "field"), ("day", "time"), ("topic", "field"))
    for col in (policy, "hash")
]
# (label, collection policy, record order)
ADD_CONFIGS = [(p, p, "generated") for p in ("hash", "field", "time")]
ADD_CONFIGS.append(("time, sorted by ts", "time", "by ts"))


@dataclass(frozen=True)
class Records:
    data: Dataset
    labels: dict[str, np.ndarray]  # filter kind -> value index (0-3) of every record
    metadatas: list[dict[str, Any]]
    by_ts: np.ndarray  # record positions sorted by ts


def make_records(args: argparse.Namespace) -> Records:
    data = make_dataset(args.records, args.dim, args.queries)
    rng = np.random.default_rng(7)
    n = len(data)
    region, topic, day = (rng.integers(0, 4, size=n) for _ in range(3))
    ts = DAY0 + day * DAY + rng.integers(0, DAY, size=n)
    metadatas = [
        {"region": REGIONS[r], "topic": int(t), "ts": int(s)}
        for r, t, s in zip(region, topic, ts, strict=True)
    ]
    labels = {"region": region, "topic": topic, "day": day}
    return Records(data, labels, metadatas, np.argsort(ts, kind="stable"))


def where_for(kind: str, i: int) -> dict[str, Any]:
    v = i % 4
    if kind == "region":
        return {"region": REGIONS[v]}
    if kind == "topic":
        return {"topic": v}
    lo = DAY0 + v * DAY
    return {"$and": [{"ts": {"$gte": lo}}, {"ts": {"$lte": lo + DAY - 1}}]}


def exact_answers(rec: Records, kind: str, n: int) -> list[list[str]]:
    """Exact filtered top-K ids (squared L2) for the first ``n`` queries under ``kind``."""
    out: list[list[str]] = [[] for _ in range(n)]
    for v in range(4):
        rows = np.flatnonzero(rec.labels[kind] == v)
        qs = [i for i in range(n) if i % 4 == v]
        if not qs:
            continue
        top = exact_top_k(rec.data.vectors[rows], rec.data.queries[qs], K)
        for i, hit in zip(qs, top, strict=True):
            out[i] = [rec.data.ids[j] for j in rows[hit]]
    return out


@dataclass
class QuerySeries:
    p50: list[float] = field(default_factory=list)  # per round, and so on
    p99: list[float] = field(default_factory=list)
    qps: list[float] = field(default_factory=list)
    shards: list[float] = field(default_factory=list)  # mean nodes asked per query
    requests: list[float] = field(default_factory=list)  # mean requests per query
    answers: list[list[str]] = field(default_factory=list)  # first round's, for recall


def counters(client: Any) -> dict[str, int]:
    return {url: s.requests for url, s in client.node_stats().items()}


async def query(col: Any, rec: Records, kind: str, i: int) -> list[str]:
    q = rec.data.queries[i % len(rec.data.queries)][None, :]
    result = await col.query(query_embeddings=q, n_results=K, where=where_for(kind, i))
    return list(result["ids"][0])


async def sequential(
    client: Any, col: Any, rec: Records, kind: str, n: int, out: QuerySeries
) -> None:
    """``n`` queries one at a time; nodes and requests per query from the node counters."""
    latencies, nodes, sent, answers = [], [], [], []
    for i in range(n):
        before = counters(client)
        t0 = time.perf_counter()
        answers.append(await query(col, rec, kind, i))
        latencies.append(time.perf_counter() - t0)
        after = counters(client)
        deltas = [after[u] - before.get(u, 0) for u in after]
        nodes.append(sum(1 for d in deltas if d > 0))
        sent.append(sum(deltas))
    out.p50.append(percentile(latencies, 50) * 1e3)
    out.p99.append(percentile(latencies, 99) * 1e3)
    out.shards.append(float(np.mean(nodes)))
    out.requests.append(float(np.mean(sent)))
    if not out.answers:
        out.answers = answers


async def throughput(col: Any, rec: Records, kind: str, total: int, workers: int) -> float:
    """``total`` queries by ``workers`` tasks, each sending its next when one returns; q/s."""
    return await closed_loop(lambda i: query(col, rec, kind, i), total, workers)


async def load(col: Any, rec: Records, order: np.ndarray, batch: int) -> float:
    """Insert every record in ``order``, one batch at a time; records per second."""
    t0 = time.perf_counter()
    for start in range(0, len(order), batch):
        pos = order[start : start + batch]
        await col.add(
            ids=[rec.data.ids[p] for p in pos],
            embeddings=rec.data.vectors[pos],
            metadatas=[rec.metadatas[p] for p in pos],
        )
    return len(order) / (time.perf_counter() - t0)


async def part_ingest(
    client: Any, rec: Records, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, Any]]:
    """2. Fresh collection per configuration and round; the last round's hash, field and
    time (generated order) collections are kept for the query part."""
    orders = {"generated": np.arange(len(rec.data)), "by ts": rec.by_ts}
    rates: dict[str, list[float]] = {label: [] for label, _, _ in ADD_CONFIGS}
    per_batch: dict[str, list[float]] = {label: [] for label, _, _ in ADD_CONFIGS}
    kept: dict[str, Any] = {}
    for r in range(args.add_rounds):
        for label, policy, order in alternate(ADD_CONFIGS, r):
            name = f"policies_{policy}_{order.replace(' ', '_')}_{r}"
            kw = {"configuration": CONFIGURATION, "policy": POLICIES[policy]}
            col = await client.create_collection(name, embedding_function=None, **kw)
            before = sum(counters(client).values())
            rate = await load(col, rec, orders[order], args.batch)
            batches = -(-len(rec.data) // args.batch)
            sent = (sum(counters(client).values()) - before) / batches
            rates[label].append(rate)
            per_batch[label].append(sent)
            log(f"  add round {r + 1}: {label:<20} {rate:8.0f} records/s  {sent:.2f} req/batch")
            if r == args.add_rounds - 1 and order == "generated":
                count = await col.count()
                if count != len(rec.data):
                    raise AssertionError(f"{name}: count() {count}, added {len(rec.data)}")
                kept[policy] = col
            else:
                await client.delete_collection(name)  # time buckets included
    return rates, per_batch, kept


async def part_queries(
    client: Any, cols: dict[str, Any], rec: Records, args: argparse.Namespace
) -> dict[str, QuerySeries]:
    """1. Pruned queries vs the same filter on the hash collection."""
    out = {label: QuerySeries() for label, _, _ in QUERY_CONFIGS}
    for _, key, kind in QUERY_CONFIGS:
        for i in range(args.warmup):
            await query(cols[key], rec, kind, i)
    for r in range(args.rounds):
        for label, key, kind in alternate(QUERY_CONFIGS, r):
            s = out[label]
            await sequential(client, cols[key], rec, kind, args.queries, s)
            s.qps.append(
                await throughput(cols[key], rec, kind, args.throughput_queries, args.concurrency)
            )
            log(
                f"  query round {r + 1}: {label:<14} p50 {s.p50[-1]:6.1f} ms  p99 "
                f"{s.p99[-1]:6.1f} ms  {s.qps[-1]:6.1f} q/s  shards {s.shards[-1]:.2f}  "
                f"requests {s.requests[-1]:.2f}"
            )
    return out


def rounds_text(values: Sequence[float], fmt: str) -> str:
    return "(" + ", ".join(format(v, fmt) for v in values) + ")"


def report(
    info: dict[str, str],
    args: argparse.Namespace,
    rec: Records,
    queries: dict[str, QuerySeries],
    ingest: tuple[dict[str, list[float]], dict[str, list[float]]],
    counts: dict[str, list[int]],
) -> str:
    lines = ["", "=" * 78, "Results (medians over rounds; per-round values in brackets)"]
    lines += ["=" * 78, *(f"  {k}: {v}" for k, v in info.items())]
    lines.append(f"  load average at end: {_machine.load_average()}")
    lines.append(
        f"  run: records={args.records} dim={args.dim} queries={args.queries} "
        f"rounds={args.rounds} "
        f"throughput_queries={args.throughput_queries} concurrency={args.concurrency} "
        f"add_rounds={args.add_rounds} batch={args.batch} n_results={K} shards={SHARDS}"
    )
    lines.append("  records per shard s0-s3 (kept collections; time: per day bucket):")
    lines += [f"    {k:<6} {v}" for k, v in counts.items()]
    lines += [
        "",
        f"1. queries: {args.queries} sequential (p50/p99), {args.throughput_queries} "
        f"at concurrency {args.concurrency} (q/s); query i filters on value i mod 4",
        '  where: region {"region": r}; topic {"topic": t}; day {"$and": [{"ts": {"$gte": d}}, '
        '{"ts": {"$lte": d + 86399}}]}',
        f"  {'collection, where':<16}{'shards/q':>9}{'req/q':>7}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'q/s':>8}{'recall@10':>11}",
    ]
    for label, _, kind in QUERY_CONFIGS:
        s = queries[label]
        truth = exact_answers(rec, kind, len(s.answers))
        lines.append(
            f"  {label:<16}{med(s.shards):>9.2f}{med(s.requests):>7.2f}{med(s.p50):>9.2f}"
            f"{med(s.p99):>9.2f}{med(s.qps):>8.1f}{recall_at_k(s.answers, truth, K):>11.4f}"
        )
    lines.append("  per round (p50 ms; p99 ms; q/s):")
    for label, _, _ in QUERY_CONFIGS:
        s = queries[label]
        lines.append(
            f"    {label:<16}{rounds_text(s.p50, '.2f')}; {rounds_text(s.p99, '.2f')}; "
            f"{rounds_text(s.qps, '.1f')}"
        )
    lines.append(
        "  ratios, policy / hash collection, same where (latency lower is better, q/s higher):"
    )
    for (a, _, kind), (b, _, _) in zip(QUERY_CONFIGS[::2], QUERY_CONFIGS[1::2], strict=True):
        x, y = queries[a], queries[b]
        lines.append(
            f"    {kind:<7} p50 {med(x.p50) / med(y.p50):.2f}x  p99 {med(x.p99) / med(y.p99):.2f}x"
            f"  q/s {med(x.qps) / med(y.qps):.2f}x  requests/q {med(x.requests):.2f} vs "
            f"{med(y.requests):.2f}"
        )
    adds, per_batch = ingest
    base = med(adds["hash"])
    lines += [
        "",
        f"2. ingestion: {args.records} records, batches of {args.batch}, one batch at a time "
        "(sequential writer), fresh collection each round",
        f"  {'policy, record order':<26}{'req/batch':>11}{'records/s':>10}{'ratio':>8}  per round",
    ]
    for label, _, order in ADD_CONFIGS:
        v = med(adds[label])
        name = f"{label} ({order})" if order == "generated" else label
        lines.append(
            f"  {name:<26}{med(per_batch[label]):>11.2f}{v:>10.0f}{v / base:>7.2f}x  "
            f"{rounds_text(adds[label], '.0f')}"
        )
    return "\n".join(lines)


async def part_counts(client: Any, cols: dict[str, Any]) -> dict[str, list[int]]:
    """Records per shard: hash and field from ``client.status()``; time per day bucket (not
    listed there) through a one-day ``get()`` each, day i's bucket living on shard s<i>."""
    status = {s.shard: {c.name: c.records for c in s.collections} for s in await client.status()}
    shards = [f"s{i}" for i in range(SHARDS)]
    out = {key: [status[s].get(cols[key].name, 0) for s in shards] for key in ("hash", "field")}
    time_col = cols["time"]
    out["time"] = [
        len((await time_col.get(where=where_for("day", v), include=[]))["ids"]) for v in range(4)
    ]
    return out


async def run(urls: list[str], rec: Records, args: argparse.Namespace) -> str:
    info = _machine.machine_info()
    client = await sharded_chroma.AsyncHttpClient(shards=urls)
    try:
        log("2. ingestion (runs first; its last round's collections are queried in part 1)")
        adds, per_batch, cols = await part_ingest(client, rec, args)
        counts = await part_counts(client, cols)
        log(f"  records per shard: {counts}")
        log("1. pruned queries vs the same filter on the hash collection")
        queries = await part_queries(client, cols, rec, args)
    finally:
        await client.aclose()
    return report(info, args, rec, queries, (adds, per_batch), counts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=200, help="held-out queries")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--throughput-queries", type=int, default=None, help="default --queries")
    p.add_argument("--warmup", type=int, default=8, help="queries per configuration")
    p.add_argument("--add-rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=500)
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.dim, args.queries = 2000, 64, 60
        args.rounds, args.add_rounds, args.warmup = 1, 1, 4
    if args.throughput_queries is None:
        args.throughput_queries = args.queries
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    rec = make_records(args)
    log(f"dataset: {args.records} x {args.dim} float32, {args.queries} held-out queries")
    with tempfile.TemporaryDirectory(prefix="bench_policies_") as tmp:
        cluster = LocalCluster(SHARDS, Path(tmp) / "servers")
        log(f"starting {SHARDS} local chroma servers")
        # LocalCluster.start stops whatever it started if a server fails; the with-block
        # stops every server when the benchmark ends, on error or Ctrl-C too.
        with cluster:
            log(f"servers: {', '.join(cluster.urls)}")
            text = asyncio.run(run(cluster.urls, rec, args))
    print(text)
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
