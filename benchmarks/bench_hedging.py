"""Measure hedged reads against heavy-tailed delays on every copy of a replicated shard.

Run from the repository root: ``python benchmarks/bench_hedging.py`` (about 3-4 minutes on two
cores) or ``python benchmarks/bench_hedging.py --quick`` (a smoke run under a minute).

The script starts three Chroma servers on loopback in a temporary directory (the hint log lives
there too), loads a small collection into one shard made of a primary and two replicas, and puts
every copy behind its own ``FaultProxy`` (the test suite's, ``tests/_proxy.py``). Each proxy adds
an independent heavy-tailed delay, ``pareto_delay(--scale, --alpha, --cap)``, to every request;
the proxies are re-seeded before every measurement, so every configuration of a round meets the
same delay sequences (until its hedges draw delays of their own).

Every measurement is ``--reads`` sequential ``get(ids=[one id])`` calls, ``round_robin`` over the
three copies, with one client per configuration (each keeps its own latency history and hedge
budget across rounds):

- ``floor``: no injected delay, no hedging (what the proxies, the servers and the client cost);
- ``floor p<P>``: no injected delay, hedging at ``--floor-percentile`` (what a percentile
  trigger costs when nothing is slow);
- ``off``: injected delays, no hedging;
- ``p<P> b<B>``: injected delays, ``hedge_percentile=P``, ``hedge_budget=B`` (``--percentiles``,
  default 93 95, with ``--budget``, default 0.1; and, if given, ``--percentile-low-budget``
  with ``--low-budget``);
- ``after <T> b<B>``: injected delays, a fixed ``hedge_after=T``, if ``--hedge-after`` is given.

Per measurement: p50 and p99 (nearest rank) and extra requests per read, from the client's node
request counters: (requests - reads) / reads, so ``off`` is 0. ``--rounds`` rounds, the
configurations' order reversed every other round; tables show medians over rounds, the p99 of
all rounds' reads pooled, per-round values and paired off/on p99 ratios (off and on from the
same round). A p99 of 1500 heavy-tailed reads rests on its 15 slowest: ``--reads 3000`` gives a
steadier one (about 8 minutes with three triggers); a wider sweep in about 4 minutes:
``--reads 1000 --percentiles 90 93 95 97 --hedge-after 0.05``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from _proxy import FaultProxy, pareto_delay  # noqa: E402
from _stats import alternate, log, med, percentile  # noqa: E402

import sharded_chroma  # noqa: E402
from sharded_chroma.testing import LocalCluster  # noqa: E402

COLLECTION = "hedging_bench"
CONFIGURATION: Any = {"hnsw": {"space": "l2"}}


@dataclass(frozen=True)
class Setup:
    """One configuration: whether the proxies delay, and the replication settings."""

    name: str
    delayed: bool
    replication: dict[str, Any]


@dataclass
class Series:
    """Per-round results of one configuration."""

    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    extra: list[float] = field(default_factory=list)
    won: list[float] = field(default_factory=list)
    trigger: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def topology(urls: Sequence[str], hints: Path, **replication: Any) -> sharded_chroma.Topology:
    return sharded_chroma.Topology.build(
        {
            "shards": [{"name": "s0", "primary": urls[0], "replicas": list(urls[1:])}],
            "replication": {
                "hints_dir": str(hints),
                "read_selection": "round_robin",
                **replication,
            },
        }
    )


def total_requests(client: Any) -> int:
    return sum(s.requests for s in client.node_stats().values())


def hedge_counts(client: Any) -> tuple[int, int]:
    """Hedges sent and won over the shard's copies (the replica set's own counters)."""
    nodes = client._runtime.cluster.shards["s0"].nodes
    return sum(n.hedges_sent for n in nodes), sum(n.hedges_won for n in nodes)


def trigger_ms(client: Any, replication: dict[str, Any]) -> float:
    """The trigger the copies would use now: the mean over copies of their percentile of
    recent latencies (``Node.latencies``), or the fixed ``hedge_after``; nan when off."""
    pct = replication.get("hedge_percentile")
    if pct is None:
        after = replication.get("hedge_after")
        return float("nan") if after is None else after * 1e3
    nodes = client._runtime.cluster.shards["s0"].nodes
    return float(np.mean([np.percentile(list(n.latencies), pct) for n in nodes])) * 1e3


def setups(args: argparse.Namespace) -> list[Setup]:
    out = [
        Setup("floor", False, {}),
        Setup(
            f"floor p{args.floor_percentile:g}",
            False,
            {"hedge_percentile": args.floor_percentile, "hedge_budget": args.budget},
        ),
        Setup("off", True, {}),
    ]
    for p in args.percentiles:
        out.append(
            Setup(
                f"p{p:g} b{args.budget:g}",
                True,
                {"hedge_percentile": p, "hedge_budget": args.budget},
            )
        )
    if args.percentile_low_budget is not None:
        p, b = args.percentile_low_budget, args.low_budget
        out.append(Setup(f"p{p:g} b{b:g}", True, {"hedge_percentile": p, "hedge_budget": b}))
    if args.hedge_after:
        t = args.hedge_after
        out.append(
            Setup(
                f"after {t * 1e3:g}ms b{args.budget:g}",
                True,
                {"hedge_after": t, "hedge_budget": args.budget},
            )
        )
    return out


def set_delays(proxies: Sequence[FaultProxy], args: argparse.Namespace, seed: int | None) -> None:
    """Independent delays on every proxy, re-seeded (``seed`` None: no delay)."""
    for i, proxy in enumerate(proxies):
        if seed is None:
            proxy.set_latency(0.0)
        else:
            jitter = pareto_delay(args.scale, args.alpha, args.cap)
            proxy.set_latency(0.0, jitter=jitter, seed=seed * 10 + i)


async def timed_reads(col: Any, ids: Sequence[str]) -> list[float]:
    latencies = []
    for record_id in ids:
        t0 = time.perf_counter()
        await col.get(ids=[record_id])
        latencies.append(time.perf_counter() - t0)
    return latencies


async def load(urls: Sequence[str], hints: Path, args: argparse.Namespace) -> list[str]:
    """Write the records straight to the servers (no proxies), every copy acknowledging."""
    rng = np.random.default_rng(20261202)
    vectors = rng.standard_normal((args.records, args.dim), dtype=np.float32)
    ids = [f"rec-{i:05d}" for i in range(args.records)]
    client = await sharded_chroma.AsyncHttpClient(
        topology=topology(urls, hints, write_concern="all")
    )
    try:
        col = await client.create_collection(
            COLLECTION, configuration=CONFIGURATION, embedding_function=None
        )
        for start in range(0, args.records, 500):
            await col.add(
                ids=ids[start : start + 500],
                embeddings=vectors[start : start + 500],
                documents=[f"doc {i}" for i in range(start, min(start + 500, args.records))],
            )
    finally:
        await client.aclose()
    return ids


async def measure(
    cluster: LocalCluster, hints: Path, args: argparse.Namespace
) -> tuple[dict[str, Series], list[float]]:
    servers = cluster.servers
    ids = await load(cluster.urls, hints, args)
    order = np.random.default_rng(7).permutation(len(ids))
    read_ids = [ids[int(order[i % len(ids)])] for i in range(args.reads)]
    configs = setups(args)
    results = {s.name: Series() for s in configs}
    loads: list[float] = []
    with contextlib.ExitStack() as stack:
        proxies = [stack.enter_context(FaultProxy(s.host, s.port)) for s in servers]
        urls = [p.url for p in proxies]
        clients = {
            s.name: await sharded_chroma.AsyncHttpClient(
                topology=topology(urls, hints, **s.replication)
            )
            for s in configs
        }
        try:
            cols = {
                name: await c.get_collection(COLLECTION, embedding_function=None)
                for name, c in clients.items()
            }
            # Warm-up: connections, the collection cache, and >= 20 latencies per copy under
            # the delays a configuration will meet.
            for s in configs:
                set_delays(proxies, args, 99 if s.delayed else None)
                await timed_reads(cols[s.name], read_ids[: args.warmup])
            for r in range(args.rounds):
                for s in alternate(configs, r):
                    set_delays(proxies, args, args.seed + r if s.delayed else None)
                    client = clients[s.name]
                    before = total_requests(client)
                    sent0, won0 = hedge_counts(client)
                    t0 = time.perf_counter()
                    lat = await timed_reads(cols[s.name], read_ids)
                    elapsed = time.perf_counter() - t0
                    extra = (total_requests(client) - before - len(lat)) / len(lat)
                    sent1, won1 = hedge_counts(client)
                    won = (won1 - won0) / (sent1 - sent0) if sent1 > sent0 else float("nan")
                    res = results[s.name]
                    res.p50.append(percentile(lat, 50) * 1e3)
                    res.p99.append(percentile(lat, 99) * 1e3)
                    res.extra.append(extra)
                    res.won.append(won)
                    res.trigger.append(trigger_ms(client, s.replication))
                    res.seconds.append(elapsed)
                    res.latencies.extend(lat)
                    log(
                        f"  round {r + 1}: {s.name:<18} p50 {res.p50[-1]:7.2f} ms  "
                        f"p99 {res.p99[-1]:7.2f} ms  extra {extra:.3f}  won {won:.2f}  "
                        f"trigger {res.trigger[-1]:.1f} ms  ({elapsed:.1f} s)"
                    )
                loads.append(_os_load())
            set_delays(proxies, args, None)
        finally:
            for c in clients.values():
                await c.aclose()
    return results, loads


def _os_load() -> float:
    with contextlib.suppress(OSError):
        return os.getloadavg()[0]
    return float("nan")


# -- report ----------------------------------------------------------------------------------


def rounds_text(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    return ", ".join(fmt.format(v) for v in values)


def pooled(res: Series, pct: float) -> float:
    """Percentile over every timed read of every round (ms)."""
    return percentile(res.latencies, pct) * 1e3


def paired(off: Series, res: Series) -> list[float]:
    """Per round: the unhedged p99 over this configuration's p99, both from that round."""
    return [o / h for o, h in zip(off.p99, res.p99, strict=True)]


def report(
    info: dict[str, str],
    args: argparse.Namespace,
    results: dict[str, Series],
    loads: list[float],
) -> str:
    off, floor = results["off"], results["floor"]
    lines = ["", "=" * 78, "Results (medians over rounds; per-round values below)", "=" * 78]
    lines += [f"  {k}: {v}" for k, v in info.items()]
    lines.append(f"  load average (1 min) after each round: {rounds_text(loads, '{:.2f}')}")
    lines.append(
        f"  run: records={args.records} dim={args.dim} reads={args.reads} rounds={args.rounds} "
        f"warmup={args.warmup} seed={args.seed}; every copy delayed by pareto_delay("
        f"scale={args.scale}, alpha={args.alpha}, cap={args.cap}) except in the floor rows"
    )
    lines += [
        "",
        f"  {'configuration':<18}{'p50':>7}{'p99':>8}{'p99 all':>9}{'off/on p99':>11}"
        f"{'pooled':>8}{'extra':>7}{'won':>6}{'trigger':>9}",
        f"  {'':<18}{'ms':>7}{'ms':>8}{'ms':>9}{'paired':>11}{'ratio':>8}{'req':>7}"
        f"{'':>6}{'ms':>9}",
    ]
    for name, res in results.items():
        delayed = not name.startswith("floor")
        ratio = f"{med(paired(off, res)):.2f}x" if delayed else ""
        pooled_ratio = f"{pooled(off, 99) / pooled(res, 99):.2f}x" if delayed else ""
        won = [w for w in res.won if w == w]
        trig = [t for t in res.trigger if t == t]
        lines.append(
            f"  {name:<18}{med(res.p50):>7.2f}{med(res.p99):>8.1f}{pooled(res, 99):>9.1f}"
            f"{ratio:>11}{pooled_ratio:>8}{med(res.extra):>7.3f}"
            f"{(f'{med(won):.2f}' if won else '-'):>6}{(f'{med(trig):.1f}' if trig else '-'):>9}"
        )
    lines += [
        "",
        "  p99 all: over all rounds' reads pooled; paired: median over rounds of off p99 / p99;",
        "  extra req: (node requests - reads) / reads; won: hedges that answered first / hedges;",
        "  trigger: the copies' percentile of recent latencies after the measurement (mean).",
        "",
        "  per round, in round order (p50 ms; p99 ms; extra requests; off/on p99):",
    ]
    for name, res in results.items():
        lines.append(
            f"  {name:<18}({rounds_text(res.p50, '{:.2f}')}; {rounds_text(res.p99)}; "
            f"{rounds_text(res.extra, '{:.3f}')}; {rounds_text(paired(off, res), '{:.2f}')})"
        )
    lines += [
        "",
        f"  unhedged p99 over rounds: {min(off.p99):.1f}-{max(off.p99):.1f} ms (max/min "
        f"{max(off.p99) / min(off.p99):.2f}); floor p99 {min(floor.p99):.1f}-"
        f"{max(floor.p99):.1f} ms",
        "  goal: p99 cut >= 3x (paired median) with <= 0.10 extra requests per read (median):",
    ]
    for name, res in results.items():
        if name == "off" or name.startswith("floor"):
            continue
        ratios = paired(off, res)
        ok = med(ratios) >= 3 and med(res.extra) <= 0.10
        every = all(x >= 3 for x in ratios) and all(e <= 0.10 for e in res.extra)
        lines.append(
            f"  {name:<18} {'met' if ok else 'missed'}{' (in every round)' if every else ''}"
        )
    return "\n".join(lines)


# -- driver ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    p.add_argument("--records", type=int, default=1000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--reads", type=int, default=1500, help="sequential reads per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=90, help="reads per configuration first")
    p.add_argument("--scale", type=float, default=0.002, help="pareto_delay scale (s)")
    p.add_argument("--alpha", type=float, default=1.0, help="pareto_delay alpha")
    p.add_argument("--cap", type=float, default=0.5, help="pareto_delay cap (s)")
    p.add_argument("--percentiles", type=float, nargs="*", default=[93.0, 95.0])
    p.add_argument("--budget", type=float, default=0.1, help="hedge_budget for the triggers")
    p.add_argument(
        "--percentile-low-budget",
        type=float,
        default=None,
        help="also this percentile with --low-budget (default: not measured)",
    )
    p.add_argument("--low-budget", type=float, default=0.05)
    p.add_argument("--hedge-after", type=float, default=0.0, help="fixed trigger (s); 0: none")
    p.add_argument("--floor-percentile", type=float, default=95.0)
    p.add_argument("--seed", type=int, default=1000, help="delay seeds: seed + round")
    p.add_argument("--json", type=Path, default=None, help="also save every per-round number")
    args = p.parse_args(argv)
    if args.quick:
        args.reads, args.rounds, args.warmup = 300, 1, 30
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    info = _machine.machine_info()
    with tempfile.TemporaryDirectory(prefix="bench_hedging_") as tmp:
        cluster = LocalCluster(3, Path(tmp) / "servers")
        hints = Path(tmp) / "hints"
        log("starting 3 local chroma servers")
        # LocalCluster.start stops whatever it started if a server fails; the with-block
        # stops every server (by the pid it started) when the benchmark ends, on error too.
        with cluster:
            results, loads = asyncio.run(measure(cluster, hints, args))
    print(report(info, args, results, loads))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    k: {f: v for f, v in vars(r).items() if f != "latencies"}
                    for k, r in results.items()
                },
                indent=2,
            )
            + "\n"
        )
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
