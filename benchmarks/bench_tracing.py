"""Query throughput with tracing off, tracing on (SDK, in-memory exporter) and the official
client, in one run against the same real servers.

Run from the repository root: ``python benchmarks/bench_tracing.py`` (about 3-5 minutes on two
cores) or ``--quick`` (under a minute).

The script starts ``--shards`` Chroma servers on loopback in a temporary directory, loads
``--records`` records of ``--dim`` float32s (``benchmarks/_data.py``) into one sharded
collection, and into one plain collection on the first server for the official client (the
floor: one server, no fan-out). Each round measures, in alternating order, ``--queries``
queries (``n_results=10``) at ``--concurrency`` in flight for each of:

- ``official``: chromadb's AsyncHttpClient on one server;
- ``off``: the sharded client without a tracer provider;
- ``on``: the sharded client with an SDK ``TracerProvider`` whose spans go to an
  ``InMemorySpanExporter`` (cleared after every round) through a ``BatchSpanProcessor`` (what
  a deployment uses; ``--simple`` for the synchronous ``SimpleSpanProcessor``, which exports
  each span on the caller's thread), plus a ``MeterProvider`` with an in-memory reader for
  the duration histogram.

Per round: queries/s of each; the table shows medians with [min-max] over rounds and the
paired ratios on/off and off/official (both sides from the same round). Goals (issue 13):
off within noise of today (there is no "today" to compare against in one run: the ratio
off/official is what to compare across commits), on at most 10% slower than off.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
# PYTHONPATH (another checkout's package) wins over this checkout, as in bench_client.py.
sys.path.insert(0 if "PYTHONPATH" not in os.environ else len(sys.path), str(_ROOT))
sys.path.insert(0, str(_ROOT / "benchmarks"))

import _machine  # noqa: E402
import chromadb  # noqa: E402
from _data import add_all, make_dataset  # noqa: E402
from _stats import alternate, closed_loop, log, med, paired_ratios, spread  # noqa: E402
from chromadb.config import Settings  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import (  # noqa: E402
    BatchSpanProcessor,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

import sharded_chroma  # noqa: E402
from sharded_chroma.testing import LocalCluster  # noqa: E402

NAME = "bench-tracing"


async def main(args: argparse.Namespace) -> None:
    data = make_dataset(args.records, args.dim, args.queries)
    queries = [q.tolist() for q in data.queries]
    config = {"hnsw": {"space": "l2"}}
    with tempfile.TemporaryDirectory(prefix="sc-bench-tracing-") as tmp:
        cluster = LocalCluster(args.shards, Path(tmp) / "servers")
        cluster.start(timeout=180.0)
        try:
            urls = [s.url for s in cluster.servers]
            spans = InMemorySpanExporter()
            provider = TracerProvider()
            processor = SimpleSpanProcessor(spans) if args.simple else BatchSpanProcessor(spans)
            provider.add_span_processor(processor)
            meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
            off = await sharded_chroma.AsyncHttpClient(shards=urls)
            on = (
                off
                if args.off_only
                else await sharded_chroma.AsyncHttpClient(
                    shards=urls, tracer_provider=provider, meter_provider=meters
                )
            )
            host, port = urls[0].removeprefix("http://").rsplit(":", 1)
            official = await chromadb.AsyncHttpClient(
                host=host, port=int(port), settings=Settings(anonymized_telemetry=False)
            )
            try:
                sharded_col = await off.create_collection(
                    NAME,
                    configuration=config,
                    embedding_function=None,  # type: ignore[arg-type]
                )
                plain = await official.create_collection(
                    NAME + "-plain",
                    configuration=config,
                    embedding_function=None,  # type: ignore[arg-type]
                )
                log(f"loading {args.records} records x {args.dim}")
                await add_all(sharded_col, data, 500)
                await add_all(plain, data, 500)
                cols: dict[str, Any] = {"official": plain, "off": sharded_col}
                if not args.off_only:
                    cols["on"] = await on.get_collection(NAME, embedding_function=None)
                rates: dict[str, list[float]] = {k: [] for k in cols}
                for round_no in range(args.rounds):
                    for name in alternate(list(cols), round_no):
                        col = cols[name]

                        async def one(i: int, col: Any = col) -> None:
                            await col.query(
                                query_embeddings=[queries[i % len(queries)]], n_results=10
                            )

                        await closed_loop(one, args.warmup, args.concurrency)
                        rate = await closed_loop(one, args.queries, args.concurrency)
                        rates[name].append(rate)
                        spans.clear()
                        log(f"round {round_no + 1} {name}: {rate:.0f} queries/s")
            finally:
                await off.aclose()
                if on is not off:
                    await on.aclose()
                provider.shutdown()
        finally:
            cluster.stop()
    info = _machine.machine_info(
        package=str(Path(sharded_chroma.__file__).parent),
        processor="simple" if args.simple else "batch",
        shards=str(args.shards),
        records=str(args.records),
        dim=str(args.dim),
        concurrency=str(args.concurrency),
    )
    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    print(f"\n{'client':<10} {'queries/s median [min-max] over rounds':>40}")
    for name, values in rates.items():
        print(f"{name:<10} {med(values):>12.0f} [{min(values):.0f}-{max(values):.0f}]")
    if "on" in rates:
        on_off = spread(paired_ratios(rates["on"], rates["off"]))
        print(f"\non / off (paired per round):       {on_off}")
    print(
        "off / official (paired per round): "
        f"{spread(paired_ratios(rates['off'], rates['official']))}"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--queries", type=int, default=600)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2000 x 64, 100 queries, 2 rounds")
    p.add_argument("--simple", action="store_true", help="SimpleSpanProcessor instead of batch")
    p.add_argument(
        "--off-only",
        action="store_true",
        help="official and off only: runs against a checkout without tracing (PYTHONPATH)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.dim, args.queries, args.rounds, args.warmup = 2000, 64, 100, 2, 10
    return args


if __name__ == "__main__":
    asyncio.run(main(parse()))
