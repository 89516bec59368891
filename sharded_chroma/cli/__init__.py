"""The ``sharded-chroma`` command: ``dev``, ``demo``, ``status``, ``verify``, ``repair``,
``drop-partitions``, ``plan``, ``rebalance``, ``rebuild``, ``abort``, ``export`` and
``import``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
from chromadb.errors import ChromaError

from .._client import ShardedClient
from .._errors import ShardedChromaError
from .._topology import Topology

__all__ = ["main"]


def _out(text: str) -> None:
    print(text, flush=True)


def _cluster_args(cmd: argparse.ArgumentParser, topology_help: str = "topology TOML file") -> None:
    """--topology FILE or --shards URL ..., one of them required."""
    where = cmd.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", type=Path, help=topology_help)
    where.add_argument("--shards", nargs="+", metavar="URL", help="one URL per shard")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sharded-chroma", description="Sharded Chroma tools.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="local cluster, sample corpus, queries, teardown")
    demo.add_argument("--shards", type=int, default=3)
    demo.add_argument("--records", type=int, default=50_000)
    demo.add_argument("--dim", type=int, default=64)

    dev = sub.add_parser("dev", help="run local Chroma servers until Ctrl-C")
    dev.add_argument("--shards", type=int, default=3)
    dev.add_argument("--data-dir", type=Path, default=Path(".sharded-chroma/dev"))
    dev.add_argument("--topology-out", type=Path, default=Path("cluster.toml"))
    dev.add_argument(
        "--control",
        choices=["none", "sqlite", "etcd"],
        default="sqlite",
        help="control store for online rebalancing (etcd: a local etcd member is started)",
    )

    status = sub.add_parser("status", help="health, versions, latency and counts per shard")
    _cluster_args(status)
    status.add_argument(
        "--collection",
        action="append",
        dest="collections",
        metavar="NAME",
        help="also show this collection's records per partition and shard (repeatable)",
    )
    status.add_argument(
        "--probes",
        type=int,
        default=10,
        metavar="N",
        help="heartbeats per node for the p50/p99 latency and error columns (default 10)",
    )
    status.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help="refresh every SECONDS until interrupted",
    )
    status.add_argument("--times", type=int, metavar="N", help=argparse.SUPPRESS)

    drop = sub.add_parser(
        "drop-partitions", help="retention: delete a time-placed collection's old buckets"
    )
    _cluster_args(drop)
    drop.add_argument("--collection", required=True, metavar="NAME")
    drop.add_argument(
        "--before",
        required=True,
        metavar="TIME",
        help="ISO-8601 time or epoch seconds: buckets ending at or before it go",
    )
    drop.add_argument("--dry-run", action="store_true", help="print what would go, delete nothing")

    for name, text in (
        ("verify", "compare every replica with its primary; exit 1 when they differ"),
        ("repair", "make every replica equal to its primary; safe under live traffic"),
    ):
        cmd = sub.add_parser(name, help=text)
        _cluster_args(cmd, "topology TOML file (with replicas)")
        cmd.add_argument(
            "--collection",
            action="append",
            dest="collections",
            metavar="NAME",
            help="only this collection (repeatable; default: all)",
        )
        cmd.add_argument("--page-size", type=int, default=1000, help="records per request")
        if name == "repair":
            cmd.add_argument("--rounds", type=int, default=3, help="fix-and-recheck passes")
    from ._rebalance import goal_args

    plan = sub.add_parser("plan", help="show the moves a rebalance would make; move nothing")
    goal_args(plan)
    rebalance = sub.add_parser(
        "rebalance", help="move slots between shards online (no goal options: resume)"
    )
    goal_args(rebalance)
    rebalance.add_argument("--batch", type=int, default=500, help="records per page")
    rebalance.add_argument("--rate", type=float, default=None, help="records/s at most")
    rebalance.add_argument(
        "--concurrency", type=int, default=1, help="source shards copied at once"
    )
    from ._rebuild import rebuild_args

    rebuild_args(sub)
    abort = sub.add_parser("abort", help="roll back a migration or rebuild not cut over")
    abort.add_argument("--topology", type=Path, required=True)
    abort.add_argument("--collection", required=True, metavar="NAME")
    from ._backup import backup_args

    backup_args(sub)
    return p


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise SystemExit(f"sharded-chroma: --{name} must be at least 1, got {value}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "demo":
            from ._demo import run_demo

            for name in ("shards", "records", "dim"):
                _positive(name, getattr(args, name))
            run_demo(shards=args.shards, records=args.records, dim=args.dim, out=_out)
        elif args.command == "dev":
            from ._dev import run_dev

            _positive("shards", args.shards)
            run_dev(
                shards=args.shards,
                data_dir=args.data_dir,
                topology_path=args.topology_out,
                control=args.control,
                out=_out,
            )
        elif args.command in ("plan", "rebalance", "abort"):
            from . import _rebalance

            if args.command == "rebalance":
                _positive("batch", args.batch)
                _positive("concurrency", args.concurrency)
            run = {
                "plan": _rebalance.run_plan,
                "rebalance": _rebalance.run_rebalance,
                "abort": _rebalance.run_abort,
            }[args.command]
            return anyio.run(run, args, _out)
        elif args.command == "rebuild":
            from ._rebuild import run_rebuild

            _positive("batch", args.batch)
            return anyio.run(run_rebuild, args, _out)
        elif args.command in ("export", "import"):
            from . import _backup

            _positive("batch", args.batch)
            run_backup = _backup.run_export if args.command == "export" else _backup.run_import
            return anyio.run(run_backup, args, _out)
        elif args.command in ("verify", "repair"):
            from ._repair import run_antientropy

            _positive("page-size", args.page_size)
            _positive("rounds", getattr(args, "rounds", 1))
            return run_antientropy(
                args.command,
                topology=args.topology,
                shards=args.shards,
                collections=args.collections,
                page_size=args.page_size,
                rounds=getattr(args, "rounds", 1),
                out=_out,
            )
        elif args.command == "drop-partitions":
            anyio.run(
                _drop_partitions,
                args.topology,
                args.shards,
                args.collection,
                args.before,
                args.dry_run,
            )
        else:
            if args.probes < 1 or (args.watch is not None and args.watch <= 0):
                raise ValueError("--probes must be at least 1 and --watch positive")
            anyio.run(
                _status,
                args.topology,
                args.shards,
                args.collections or [],
                args.probes,
                args.watch,
                args.times,
            )
    except KeyboardInterrupt:
        _out("\ninterrupted; local servers stopped.")
        return 130
    except (ShardedChromaError, ChromaError, ValueError) as exc:
        print(f"sharded-chroma: {exc}", file=sys.stderr)
        return 1
    return 0


def _topology(topology: Path | None, shards: list[str] | None) -> Topology:
    return Topology.from_urls(shards) if shards else Topology.from_toml(topology)  # type: ignore[arg-type]


async def _status(
    topology: Path | None,
    shards: list[str] | None,
    collections: list[str],
    probes: int = 10,
    watch: float | None = None,
    times: int | None = None,
) -> None:
    from ._status_view import render_layout, render_status

    # Not AsyncHttpClient(): it refuses to connect when a shard is down, and showing down
    # shards is what status is for.
    async with ShardedClient(_topology(topology, shards)) as client:
        shown = 0
        while True:
            if watch is not None:
                _out(f"\n{time.strftime('%H:%M:%S')} (every {watch:g} s; Ctrl-C stops)")
            _out(render_status(await client.status(probes=probes)))
            for name in collections:
                _out("")
                _out(render_layout(await client.layout(name)))
            shown += 1
            if watch is None or (times is not None and shown >= times):
                return
            await anyio.sleep(watch)


async def _drop_partitions(
    topology: Path | None,
    shards: list[str] | None,
    collection: str,
    before: str,
    dry_run: bool,
) -> None:
    cutoff: float | str = before
    with contextlib.suppress(ValueError):  # else an ISO-8601 time, checked by drop_partitions
        cutoff = float(before)
    async with ShardedClient(_topology(topology, shards)) as client:
        col = await client.get_collection(collection, embedding_function=None)
        dropped = await col.drop_partitions(cutoff, dry_run=dry_run)
    verb = "would drop" if dry_run else "dropped"
    for shard, bucket in dropped:
        _out(f"{verb} bucket {bucket} on shard {shard}")
    _out(
        f"{len(dropped)} bucket(s) would be dropped (dry run)"
        if dry_run
        else f"{len(dropped)} bucket(s) dropped"
    )
