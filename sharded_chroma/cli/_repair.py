"""`sharded-chroma verify` and `sharded-chroma repair`: anti-entropy between replicas and their
primaries, with progress on long runs and a report whose id lists are capped."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
from chromadb.errors import ChromaError

from .._antientropy import verify
from .._antirepair import repair
from .._client import ShardedClient
from .._reports import PairRepair, PairReport, RepairReport, VerifyReport
from .._topology import Topology
from ._progress import Progress

__all__ = ["render_repair", "render_verify", "run_antientropy"]

SHOWN_IDS = 10
_NO_REPLICAS = (
    "no shard has replicas in this topology, so there is nothing to compare "
    "(--shards gives one node per shard; use a --topology file with replicas = [...])"
)


def _ids(label: str, ids: Sequence[str], cap: int) -> str:
    more = f" ... and {len(ids) - cap:,} more" if len(ids) > cap else ""
    return f"    {label} ({len(ids):,}): {', '.join(ids[:cap])}{more}"


def _head(pair: PairReport | PairRepair) -> str:
    return f"{pair.collection} / {pair.shard} / replica {pair.replica}"


def _pair_lines(pair: PairReport, cap: int) -> list[str]:
    if pair.error is not None:
        return [f"{_head(pair)}: NOT COMPARED: {pair.error}"]
    state = "ok" if pair.clean else f"{pair.differences:,} difference(s)"
    lines = [
        f"{_head(pair)}: {state} (primary {pair.primary_records:,} records, "
        f"replica {pair.replica_records:,})"
    ]
    if pair.stale or pair.pending_hints:
        lines.append(f"    replica is catching up: {pair.pending_hints:,} hint(s) pending")
    for label, ids in (
        ("missing on replica", pair.missing),
        ("extra on replica", pair.extra),
        ("differing", pair.differing),
    ):
        if ids:
            lines.append(_ids(label, ids, cap))
    return lines


def render_verify(report: VerifyReport, cap: int = SHOWN_IDS) -> str:
    lines = [
        f"verify: {len(report.collections)} collection(s), {len(report.pairs)} replica pair(s), "
        f"{report.records_read:,} records read in {report.seconds:.1f} s"
    ]
    for pair in report.pairs:
        lines.extend(_pair_lines(pair, cap))
    if not report.pairs:
        lines.append(_NO_REPLICAS)
    elif report.clean:
        lines.append("clean: every replica matches its primary")
    else:
        bad = sum(not p.clean for p in report.pairs)
        errors = sum(p.error is not None for p in report.pairs)
        lines.append(
            f"DIFFERENT: {report.differences:,} record(s) differ on {bad} replica pair(s)"
            + (f", {errors} pair(s) could not be compared" if errors else "")
            + "; `sharded-chroma repair` fixes them from the primaries"
        )
    return "\n".join(lines)


def render_repair(report: RepairReport, cap: int = SHOWN_IDS) -> str:
    before = report.before
    copied = sum(len(p.copied) for p in report.pairs)
    deleted = sum(len(p.deleted) for p in report.pairs)
    lines = [
        f"repair: {len(before.pairs)} replica pair(s) checked, {before.differences:,} "
        f"difference(s) found; {copied:,} record(s) copied, {deleted:,} deleted "
        f"in {report.seconds:.1f} s"
    ]
    for url, count in sorted(report.hints_replayed.items()):
        lines.append(f"replayed {count:,} missed write(s) from the hint log to {url}")
    for pair in report.pairs:
        if pair.error is not None:
            lines.append(f"{_head(pair)}: NOT REPAIRED: {pair.error}")
            continue
        lines.append(
            f"{_head(pair)}: copied {len(pair.copied):,}, deleted {len(pair.deleted):,} "
            f"in {pair.rounds} round(s)"
        )
        for label, ids in (
            ("copied", pair.copied),
            ("deleted", pair.deleted),
            ("still different", pair.remaining),
        ):
            if ids:
                lines.append(_ids(label, ids, cap))
    if not before.pairs:
        lines.append(_NO_REPLICAS)
    elif report.clean:
        lines.append("clean: every replica matches its primary")
    else:
        left = sum(len(p.remaining) for p in report.pairs)
        errors = sum(p.error is not None for p in report.pairs)
        lines.append(
            f"NOT CLEAN: {left:,} record(s) still differ"
            + (f", {errors} pair(s) not repaired" if errors else "")
            + "; run repair again (writes to those ids were racing with it)"
        )
    return "\n".join(lines)


class _ProgressAdapter:
    """Feeds ``(done, total)`` callbacks, whose total grows as work is found, to a Progress."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Progress | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress(self.label, total)
        self.bar.total = total
        if done > self.bar.done:
            self.bar.advance(done - self.bar.done)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.finish()


def run_antientropy(
    command: str,
    *,
    topology: Path | None,
    shards: Sequence[str] | None,
    collections: Sequence[str] | None,
    page_size: int,
    rounds: int,
    out: Callable[[str], None],
) -> int:
    """Run verify or repair; the exit code is 0 when the replicas match their primaries."""
    # Not AsyncHttpClient(): it refuses to start when a node is down, and a report that names
    # the node that could not be compared is more use than no report.
    topo = Topology.from_urls(shards) if shards else Topology.from_toml(topology)  # type: ignore[arg-type]

    async def run() -> int:
        async with ShardedClient(topo) as client:
            bar = _ProgressAdapter("records compared" if command == "verify" else "repair")
            try:
                if command == "verify":
                    found = await verify(
                        client, collections=collections, page_size=page_size, progress=bar
                    )
                    bar.finish()
                    out(render_verify(found))
                    return 0 if found.clean else 1
                fixed = await repair(
                    client,
                    collections=collections,
                    page_size=page_size,
                    progress=bar,
                    rounds=rounds,
                )
                bar.finish()
                out(render_repair(fixed))
                return 0 if fixed.clean else 1
            except ChromaError as exc:  # an unknown collection name, mostly
                print(f"sharded-chroma: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1

    return anyio.run(run)
