"""`sharded-chroma rebuild`: copy a collection into fresh physical collections with new index
parameters (or the same ones, to defragment) and swap them in while it stays in use."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._client import ShardedClient
from .._topology import Topology
from ..rebalance._rebuildconfig import HNSW_PARAMETERS
from ._progress import StepProgress

__all__ = ["rebuild_args", "run_rebuild"]

Out = Callable[[str], None]


def rebuild_args(sub: Any) -> None:
    cmd = sub.add_parser(
        "rebuild",
        help="rebuild a collection's index online, with new HNSW parameters or the same ones",
    )
    cmd.add_argument("--topology", type=Path, required=True, help="topology TOML with [control]")
    cmd.add_argument("--collection", required=True, metavar="NAME")
    for name, kind in sorted(HNSW_PARAMETERS.items()):
        cmd.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=None,
            dest=name,
            metavar="N",
            help=f"hnsw {name} of the new index (default: as now)",
        )
    cmd.add_argument(
        "--resume", action="store_true", help="finish the rebuild a killed run left, as recorded"
    )
    cmd.add_argument("--batch", type=int, default=500, help="records per page")
    cmd.add_argument("--rate", type=float, default=None, help="records/s at most")


async def run_rebuild(args: Any, out: Out) -> int:
    """Run (or resume) the rebuild, with progress per step."""
    hnsw = {k: getattr(args, k) for k in HNSW_PARAMETERS if getattr(args, k) is not None}
    if args.resume and hnsw:
        raise SystemExit("sharded-chroma: --resume takes no index parameters (they are recorded)")
    async with ShardedClient(Topology.from_toml(args.topology)) as client:
        total = sum(s.records for s in await client.status()) or 1
        progress = StepProgress(out, total)

        report = await client.rebuild(
            args.collection,
            None if args.resume else hnsw,
            batch=args.batch,
            rate=args.rate,
            progress=progress,
        )
        progress.finish()
        generation = (await client.partition_map(args.collection)).generation
    resumed = f" (resumed at {report.resumed_at})" if report.resumed_at else ""
    out(
        f"rebuild {report.tag} of {report.collection}: {' -> '.join(report.steps)}{resumed}; "
        f"{report.copied:,} record(s) copied, {report.passes} verify pass(es) fixing "
        f"{report.fixed:,}; now generation {generation}, epoch {report.epoch}; "
        f"{report.seconds:.1f} s"
    )
    return 0
