"""Text rendering of a cluster status for the CLI: one row per node, primary first."""

from __future__ import annotations

from collections.abc import Sequence

from .._layout import CollectionLayout
from .._status import ShardStatus

__all__ = ["render_layout", "render_status"]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _sync(s: ShardStatus) -> str:
    # A stale node serves no reads until its missed writes (hints) are replayed, or, if it
    # lost some, until a repair.
    if s.needs_repair:
        return f"repair, {s.pending_hints:,} hints" if s.pending_hints else "needs repair"
    if s.stale:
        return f"stale, {s.pending_hints:,} hints"
    return f"{s.pending_hints:,} hints" if s.pending_hints else "current"


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _durable(s: ShardStatus) -> list[str]:
    """Lines under a node's row for what its durable state says beyond the sync column (the
    reason is already masked by ``shard_status``)."""
    lines = []
    if s.needs_repair:
        reason = _one_line(s.repair_reason) if s.repair_reason else "no reason recorded"
        lines.append(f"{'':<20}needs repair: {reason} (run `sharded-chroma repair`)")
    if s.quarantined_hints:
        lines.append(f"{'':<20}{s.quarantined_hints:,} hints quarantined until a repair")
    return lines


def render_status(shards: Sequence[ShardStatus]) -> str:
    """The node table: p50/p99 are heartbeat latencies and errors the share of heartbeats
    that failed, over this status call's probes."""
    lines = [
        f"{'shard':<8} {'role':<8} {'node':<28} {'health':<7} {'sync':<18} {'version':<8} "
        f"{'p50':>8} {'p99':>8} {'errors':>7} {'records':>10} {'est. memory':>12}"
    ]
    for s in shards:
        head = f"{s.shard:<8} {s.role:<8} {s.url:<28}"
        if not s.healthy:
            lines.append(f"{head} {'DOWN':<7} {_sync(s):<18} {s.error}")
            lines.extend(_durable(s))
            continue
        lines.append(
            f"{head} {'ok':<7} {_sync(s):<18} {s.version or '?':<8} "
            f"{s.latency_ms or 0:>6.1f}ms {s.latency_p99_ms or 0:>6.1f}ms {s.error_rate:>7.0%} "
            f"{s.records:>10,} {_mib(s.estimated_memory_bytes):>12}"
        )
        lines.extend(_durable(s))
        for c in s.collections:
            lines.append(f"{'':<20}{c.name:<72} {c.records:>10,}")
    # The cluster's records are one copy per shard: the primary's count, or a healthy replica's
    # while the primary is down, so replicas do not multiply the total.
    per_shard: dict[str, int] = {}
    for s in sorted(shards, key=lambda s: s.role != "primary"):
        if s.healthy and s.shard not in per_shard:
            per_shard[s.shard] = s.records
    total = sum(per_shard.values())
    if per_shard and total:
        mean = total / len(per_shard)
        skew = max(abs(n - mean) / mean for n in per_shard.values())
        lines.append(f"total records {total:,}; largest deviation from the mean {skew:.1%}")
    return "\n".join(lines)


def render_layout(layout: CollectionLayout) -> str:
    """A collection's records per partition and per shard, with the skew between shards."""
    lines = [f"collection {layout.collection!r} ({layout.policy} policy)"]
    lines.append(f"  {'partition':<24} {'shards':<24} {'records':>10}")
    for p in layout.partitions:
        lines.append(f"  {p.partition:<24} {', '.join(p.shards):<24} {p.records:>10,}")
    lines.append(f"  {'shard':<49} {'records':>10}")
    for shard, n in layout.shards.items():
        lines.append(f"  {shard:<49} {n:>10,}")
    lines.append(
        f"  total records {layout.records:,}; largest deviation from the mean {layout.skew:.1%}"
    )
    return "\n".join(lines)
