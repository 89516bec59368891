"""Online rebalancing against real Chroma servers and a real control store: how fast a move
copies, what it does to live queries, and how soon every client follows a cutover.

Run from the repository root: ``python benchmarks/bench_rebalance.py`` (about 10 minutes on two
cores; needs ``etcd`` on PATH and the ``etcd`` extra) or ``--quick``; ``--control sqlite`` uses
the one-host backend instead.

Four Chroma servers on loopback in a temporary directory and a single-member etcd. Per round,
two collections of ``--records`` records (``--dim`` float32 dimensions, a document and three
metadata fields each) are made on s0..s2 (hash of the id) and grown onto s3 (a quarter of the
slots move), each with ``rebalance(batch=--batch)`` at the default throttle (none):

- *copy*: the first collection moves with no other traffic. Its copy rate (the records the
  move copied, over the time from the dual epoch's swap to the last copied page, so the
  barrier's wait is in it) is set against the baseline: the same moved records ingested
  into a fresh collection on s3 with the official ``chromadb.AsyncHttpClient``, in batches
  of the same size, in the same round.
- *queries*: the second collection moves while ``--query-tasks`` tasks (each on its own client)
  run sequential ``query(n_results=10)`` calls; their latencies during the move are set against
  the same tasks' over ``--idle-seconds`` just before it.
- *propagation*: ``--clients`` more clients hold the second collection open; the time from the
  cutover's map swap (its progress event) to the next step's (``cleanup``) is an upper bound of
  the time until the last client acknowledged the cutover epoch: it also holds one migration
  record write, one map read and one map swap.

Ratios are per round, median [min-max] over rounds; the machine is shared, so its load is in
the JSON header.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_ROOT / "benchmarks"))

import _machine  # noqa: E402
import chromadb  # noqa: E402
import numpy as np  # noqa: E402
from _stats import log, med, paired_ratios, percentile, spread  # noqa: E402

import sharded_chroma  # noqa: E402
from sharded_chroma.rebalance import plan_hash  # noqa: E402
from sharded_chroma.testing import LocalCluster  # noqa: E402
from sharded_chroma.testing._etcd import LocalEtcd  # noqa: E402

THREE = ("s0", "s1", "s2")


class Timeline:
    """Progress events of one migration with their monotonic times."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, int]] = []

    def __call__(self, step: str, n: int) -> None:
        self.events.append((time.perf_counter(), step, n))

    def copy_seconds(self) -> float:
        """From the dual epoch's swap to the last copied page: the copy step, plus the wait
        for every client to acknowledge the dual epoch (a few hundred ms at most here)."""
        start = next(t for t, step, n in self.events if step == "dual" and n == 0)
        return max(t for t, step, _ in self.events if step == "copy") - start

    def step_gap(self, first: str, then: str) -> float:
        start = next(t for t, step, n in self.events if step == first and n == 0)
        return next(t for t, step, n in self.events if step == then and t >= start) - start


def records(n: int, dim: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "ids": [f"doc-{seed}-{i:07d}" for i in range(n)],
        "embeddings": rng.random((n, dim), dtype=np.float32),
        "documents": [f"document {i} of round {seed}, some words to carry" for i in range(n)],
        "metadatas": [{"n": i, "group": f"g{i % 17}", "score": float(i % 101)} for i in range(n)],
    }


async def load(col: Any, data: dict[str, Any], rows: list[int], batch: int) -> float:
    """Add ``rows`` of ``data`` in batches; records/s."""
    started = time.perf_counter()
    for at in range(0, len(rows), batch):
        part = rows[at : at + batch]
        await col.add(
            ids=[data["ids"][i] for i in part],
            embeddings=data["embeddings"][part],
            documents=[data["documents"][i] for i in part],
            metadatas=[data["metadatas"][i] for i in part],
        )
    return len(rows) / (time.perf_counter() - started)


async def query_loop(col: Any, dim: int, seed: int, stop: asyncio.Event, out: list[float]) -> None:
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        vector = rng.random(dim, dtype=np.float32)
        started = time.perf_counter()
        await col.query(query_embeddings=[vector], n_results=10)
        out.append(time.perf_counter() - started)


async def queried(cols: list[Any], dim: int, seed: int, work: Any) -> tuple[list[float], Any]:
    """Latencies of the query tasks while ``work()`` runs, and what it returned."""
    stop = asyncio.Event()
    samples: list[float] = []
    tasks = [
        asyncio.ensure_future(query_loop(c, dim, seed + k, stop, samples))
        for k, c in enumerate(cols)
    ]
    try:
        result = await work()
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return samples, result


async def one_round(args: Any, round_no: int, topology: Any, target_url: str) -> dict[str, float]:
    data = records(args.records, args.dim, seed=round_no)
    rows = list(range(args.records))
    owner = sharded_chroma.AsyncHttpClient
    async with await owner(topology=topology) as client:
        goal = plan_hash(sharded_chroma.HashPolicy(shards=THREE), shards=[*THREE, "s3"]).goal
        moving = [i for i in rows if goal.place(data["ids"][i], None).shard == "s3"]
        out: dict[str, float] = {}

        # copy, against the target's own ingest of the same records
        quiet = await client.create_collection(
            f"copy-{round_no}",
            embedding_function=None,
            policy=sharded_chroma.HashPolicy(shards=THREE),
        )
        await load(quiet, data, rows, 500)
        plain = await chromadb.AsyncHttpClient(
            host=target_url.split("//")[1].split(":")[0], port=int(target_url.rsplit(":", 1)[1])
        )
        base = await plain.create_collection(f"ingest-{round_no}", embedding_function=None)
        timeline = Timeline()

        async def migrate_quiet() -> None:
            report = await client.rebalance(
                quiet.name,
                goal,
                batch=args.batch,
                concurrency=args.concurrency,
                progress=timeline,
            )
            out["copied"] = report.copied

        async def ingest() -> None:
            out["ingest"] = await load(base, data, moving, args.batch)

        # Alternate which goes first, so drift over the run favours neither.
        for job in (migrate_quiet, ingest) if round_no % 2 == 0 else (ingest, migrate_quiet):
            await job()
        out["copy"] = out["copied"] / timeline.copy_seconds()
        log(
            f"round {round_no}: copied {out['copied']:,.0f} records, {out['copy']:,.0f}/s copy, "
            f"{out['ingest']:,.0f}/s ingest"
        )

        # live queries and propagation on a second collection
        live = await client.create_collection(
            f"live-{round_no}",
            embedding_function=None,
            policy=sharded_chroma.HashPolicy(shards=THREE),
        )
        await load(live, data, rows, 500)
        readers = [await owner(topology=topology) for _ in range(args.query_tasks)]
        idle_clients = [await owner(topology=topology) for _ in range(args.clients)]
        try:
            cols = [await r.get_collection(live.name, embedding_function=None) for r in readers]
            for c in idle_clients:
                await (await c.get_collection(live.name, embedding_function=None)).count()
            idle, _ = await queried(
                cols, args.dim, 100 * round_no, lambda: asyncio.sleep(args.idle_seconds)
            )
            moving_timeline = Timeline()

            async def migrate_live() -> Any:
                return await client.rebalance(
                    live.name,
                    goal,
                    batch=args.batch,
                    concurrency=args.concurrency,
                    rate=args.rate,
                    progress=moving_timeline,
                )

            during, report = await queried(cols, args.dim, 100 * round_no + 50, migrate_live)
        finally:
            for c in (*readers, *idle_clients):
                await c.aclose()
        assert report.steps[-1] == "done", report
        out["idle_p50"], out["idle_p99"] = percentile(idle, 50), percentile(idle, 99)
        out["move_p50"], out["move_p99"] = percentile(during, 50), percentile(during, 99)
        out["queries_idle"], out["queries_move"] = len(idle), len(during)
        out["propagation"] = moving_timeline.step_gap("cutover", "cleanup")
        out["move_seconds"] = report.seconds
        log(
            f"round {round_no}: queries p99 {out['idle_p99'] * 1e3:.1f} ms idle, "
            f"{out['move_p99'] * 1e3:.1f} ms during the move ({len(during)} queries, "
            f"{report.seconds:.1f} s); cutover acknowledged in {out['propagation'] * 1e3:.0f} ms"
        )
    return out


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=1, help="source shards copied at once")
    p.add_argument("--rate", type=float, default=None, help="throttle of the queried move")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--query-tasks", type=int, default=2)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--control", choices=["etcd", "sqlite"], default="etcd")
    p.add_argument("--quick", action="store_true", help="records 6000, rounds 2, idle 5 s")
    args = p.parse_args()
    if args.quick:
        args.records, args.rounds, args.idle_seconds = 6000, 2, 5.0
    if args.control == "etcd" and shutil.which("etcd") is None:
        raise SystemExit(
            "etcd is not on PATH (Debian: apt-get install etcd-server); "
            "or run with --control sqlite"
        )
    print(
        json.dumps(
            _machine.machine_info(benchmark="bench_rebalance", control=args.control), indent=1
        )
    )
    results: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        etcd = LocalEtcd(folder / "etcd") if args.control == "etcd" else None
        if etcd is not None:
            etcd.start()
        try:
            with LocalCluster(4, folder / "servers") as servers:
                control: dict[str, Any] = (
                    {"backend": "etcd", "endpoints": [etcd.endpoint]}
                    if etcd is not None
                    else {"backend": "sqlite", "path": str(folder / "control.sqlite3")}
                )
                topology = sharded_chroma.Topology.build(
                    {
                        "shards": [
                            {"name": f"s{i}", "primary": u} for i, u in enumerate(servers.urls)
                        ],
                        "control": control,
                    }
                )
                for round_no in range(args.rounds):
                    results.append(await one_round(args, round_no, topology, servers.urls[3]))
        finally:
            if etcd is not None:
                etcd.stop()
    print(
        f"\n{args.records:,} records x {args.dim} dims per collection, a quarter moving to s3; "
        f"batch {args.batch}, {args.rounds} rounds, control {args.control}"
    )
    col = [r["copy"] for r in results]
    ing = [r["ingest"] for r in results]
    print(
        f"copy            {med(col):>10,.0f} records/s   ingest {med(ing):>10,.0f} records/s   "
        f"copy/ingest {spread(paired_ratios(col, ing))}   (goal >= 0.8)"
    )
    for q in ("p50", "p99"):
        during = [r[f"move_{q}"] for r in results]
        idle = [r[f"idle_{q}"] for r in results]
        print(
            f"query {q}       {med(idle) * 1e3:>8.1f} ms idle   {med(during) * 1e3:>8.1f} ms moving"
            f"   moving/idle {spread(paired_ratios(during, idle))}"
            + ("   (goal <= 2x)" if q == "p99" else "")
        )
    prop = [r["propagation"] for r in results]
    print(
        f"cutover -> every client acknowledged: median {med(prop) * 1e3:.0f} ms "
        f"[{min(prop) * 1e3:.0f}-{max(prop) * 1e3:.0f}] (upper bound; goal < 1 s on etcd), "
        f"{args.clients + args.query_tasks + 1} clients"
    )
    moves = [r["move_seconds"] for r in results]
    print(
        f"whole migration under query load: median {med(moves):.1f} s "
        f"[{min(moves):.1f}-{max(moves):.1f}]"
    )


if __name__ == "__main__":
    asyncio.run(main())
