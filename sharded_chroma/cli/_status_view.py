"""Text rendering of a cluster status for the CLI."""

from __future__ import annotations

from collections.abc import Sequence

from .._status import ShardStatus

__all__ = ["render_status"]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def render_status(shards: Sequence[ShardStatus]) -> str:
    lines = [
        f"{'shard':<8} {'node':<28} {'health':<8} {'version':<8} {'latency':>9} "
        f"{'records':>10} {'est. memory':>12}"
    ]
    total = sum(s.records for s in shards if s.healthy)
    for s in shards:
        if not s.healthy:
            lines.append(f"{s.shard:<8} {s.url:<28} {'DOWN':<8} {s.error}")
            continue
        lines.append(
            f"{s.shard:<8} {s.url:<28} {'ok':<8} {s.version or '?':<8} "
            f"{s.latency_ms or 0:>7.1f}ms {s.records:>10,} {_mib(s.estimated_memory_bytes):>12}"
        )
        for c in s.collections:
            lines.append(f"{'':<8}   {c.name:<26} {'':<8} {'':<8} {'':>9} {c.records:>10,}")
    healthy = [s for s in shards if s.healthy]
    if healthy and total:
        mean = total / len(healthy)
        skew = max(abs(s.records - mean) / mean for s in healthy)
        lines.append(f"total records {total:,}; largest deviation from the mean {skew:.1%}")
    return "\n".join(lines)
