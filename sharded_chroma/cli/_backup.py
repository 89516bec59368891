"""``sharded-chroma export`` and ``import``: logical backups with a progress line."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import orjson

from .._client import ShardedClient
from .._factory import AsyncHttpClient
from ..backup._files import open_export
from ._progress import Progress

__all__ = ["backup_args", "run_export", "run_import"]


def backup_args(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from . import _cluster_args

    export = sub.add_parser("export", help="write a collection to a backup file")
    _cluster_args(export)
    export.add_argument("--collection", required=True, metavar="NAME")
    export.add_argument("--out", required=True, type=Path, metavar="FILE")
    export.add_argument(
        "--since", type=Path, metavar="BACKUP", help="only what changed after this export"
    )
    export.add_argument("--batch", type=int, default=1000, help="records per page")
    imp = sub.add_parser("import", help="restore a chain of backup files into a collection")
    _cluster_args(imp)
    imp.add_argument("files", nargs="+", type=Path, metavar="FILE", help="full export first")
    imp.add_argument("--collection", metavar="NAME", help="target name (default: exported)")
    imp.add_argument("--policy", metavar="JSON", help='e.g. \'{"kind": "hash"}\'')
    imp.add_argument("--batch", type=int, default=500, help="records per write")
    imp.add_argument("--cursor", type=Path, help="resume file (default: beside the first file)")


async def _connect(args: argparse.Namespace) -> ShardedClient:
    if args.shards:
        return await AsyncHttpClient(shards=args.shards)
    return await AsyncHttpClient(topology=args.topology)


async def run_export(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    client = await _connect(args)
    async with client:
        col = await client.get_collection(args.collection, embedding_function=None)
        bar = Progress(f"export {args.collection}", await col.count())

        def step(done: int) -> None:
            bar.advance(done - bar.done)

        report = await client.export_collection(
            args.collection, args.out, since=args.since, batch_size=args.batch, progress=step
        )
    kind = "incremental export" if report.incremental else "export"
    out(
        f"{kind} {report.export_id}: {report.records:,} record(s) of {report.scanned:,} read "
        f"written to {report.path} in {bar.elapsed:.1f} s"
    )
    return 0


async def run_import(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    policy = None if args.policy is None else orjson.loads(args.policy)
    total = sum(open_export(f).records for f in args.files)
    client = await _connect(args)
    async with client:
        bar = Progress("import", total)

        def step(done: int) -> None:
            bar.advance(done - bar.done)

        report = await client.import_collection(
            args.files,
            name=args.collection,
            policy=policy,
            batch_size=args.batch,
            cursor=args.cursor,
            progress=step,
        )
    resumed = " (resumed)" if report.resumed else ""
    out(
        f"imported {report.records:,} record(s) from {report.files} file(s) into "
        f"{report.collection}{resumed}; {report.deleted:,} removed as deleted"
    )
    return 0
