"""`sharded-chroma plan`, `rebalance` and `abort`: move a hash-placed collection's slots, a
time-placed collection's buckets and hot shard, or a field-placed collection's partitions,
between shards while it stays in use."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .._client import ShardedClient
from .._errors import ConfigurationError
from .._policies import FieldPolicy, HashPolicy, TimePolicy
from .._routing import slot_for_key
from .._topology import Topology
from ..rebalance import RebalancePlan, plan_field, plan_hash, plan_time
from ._progress import StepProgress

__all__ = ["goal_args", "run_abort", "run_plan", "run_rebalance"]

Out = Callable[[str], None]


def goal_args(cmd: Any) -> None:
    cmd.add_argument("--topology", type=Path, required=True, help="topology TOML with [control]")
    cmd.add_argument("--collection", required=True, metavar="NAME")
    cmd.add_argument("--add", action="append", default=[], metavar="SHARD", help="give slots to")
    cmd.add_argument("--remove", action="append", default=[], metavar="SHARD", help="drain")
    cmd.add_argument(
        "--weight", action="append", default=[], metavar="SHARD=W", help="relative share"
    )
    cmd.add_argument(
        "--move",
        action="append",
        default=[],
        metavar="BUCKET=SHARD",
        help=(
            "time policy: move a bucket (its label, e.g. 2026-11-30) to a shard; field or "
            "composite policy: give a partition these shards (PARTITION=S1,S2)"
        ),
    )
    cmd.add_argument(
        "--hot", metavar="SHARD", help="time policy: the shard new buckets go to from now on"
    )


def _has_goal(args: Any) -> bool:
    return bool(args.add or args.remove or args.weight or args.move or args.hot)


def _weights(items: Sequence[str]) -> dict[str, float] | None:
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ConfigurationError(f"--weight takes SHARD=NUMBER, got {item!r}")
    return out


def _moves(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        label, sep, shard = item.partition("=")
        if not (sep and label and shard):
            raise ConfigurationError(f"--move takes BUCKET=SHARD or PARTITION=S1,S2, got {item!r}")
        if out.get(label, shard) != shard:
            raise ConfigurationError(f"--move names bucket {label!r} twice")
        out[label] = shard
    return out


def _refuse_options(kind: str, args: Any, options: dict[str, object]) -> None:
    given = [name for name, value in options.items() if value]
    if given:
        raise ConfigurationError(
            f"collection {args.collection!r} is placed by a {kind} policy; "
            f"{', '.join(given)} do not apply to it; nothing was planned"
        )


async def _slot_counts(client: ShardedClient, name: str, policy: HashPolicy) -> Counter[int]:
    """Records per slot, read once (ids only, or the hashed field's values)."""
    col = await client.get_collection(name, embedding_function=None)
    include: Any = [] if policy.field is None else ["metadatas"]
    counts: Counter[int] = Counter()
    async for page in col.scan(batch_size=5000, include=include):
        metas: Any = page.get("metadatas") or [None] * len(page["ids"])
        for rid, meta in zip(page["ids"], metas, strict=True):
            key = rid if policy.field is None else str((meta or {}).get(policy.field))
            counts[slot_for_key(key, policy.slots)] += 1
    return counts


async def _plan(client: ShardedClient, args: Any) -> RebalancePlan:
    current = await client.partition_map(args.collection)
    policy = current.policy
    if isinstance(policy, TimePolicy):
        _refuse_options(
            "time", args, {"--add": args.add, "--remove": args.remove, "--weight": args.weight}
        )
        return await _plan_time(client, args, policy)
    if isinstance(policy, FieldPolicy):
        _refuse_options(
            policy.kind,
            args,
            {
                "--add": args.add,
                "--remove": args.remove,
                "--weight": args.weight,
                "--hot": args.hot,
            },
        )
        return await _plan_field(client, args, policy)
    _refuse_options("hash", args, {"--move": args.move, "--hot": args.hot})
    known = [s.name for s in client.topology.shards]
    problems = [
        f"--add {s}: unknown shard {s!r} (the topology has {known})"
        for s in args.add
        if s not in known
    ]
    problems += [
        f"--remove {s}: unknown shard {s!r} (the collection uses {list(policy.shards)})"
        for s in args.remove
        if s not in policy.shards
    ]
    if problems:
        raise ConfigurationError("; ".join(problems) + "; nothing was planned")
    shards = [s for s in dict.fromkeys((*policy.shards, *args.add)) if s not in args.remove]
    counts = await _slot_counts(client, args.collection, policy)
    return plan_hash(policy, shards=shards, weights=_weights(args.weight), slot_counts=counts)


async def _plan_field(client: ShardedClient, args: Any, policy: FieldPolicy) -> RebalancePlan:
    """Partitions given new shard lists (``--move PARTITION=S1,S2``), counted from one layout
    read. Such a move copies every record (see the README)."""
    layout = await client.layout(args.collection)
    return plan_field(
        policy,
        move={p: tuple(shards.split(",")) for p, shards in _moves(args.move).items()},
        partition_counts={p.partition: p.records for p in layout.partitions},
        known_shards=[s.name for s in client.topology.shards],
    )


async def _plan_time(client: ShardedClient, args: Any, policy: TimePolicy) -> RebalancePlan:
    """Buckets that exist, where they are and their records, from one layout read."""
    layout = await client.layout(args.collection)
    existing = {p.partition: p.shards[0] for p in layout.partitions if p.shards}
    return plan_time(
        policy,
        existing_buckets=existing,
        move=_moves(args.move),
        hot=args.hot,
        bucket_counts={p.partition: p.records for p in layout.partitions},
        known_shards=[s.name for s in client.topology.shards],
    )


async def run_plan(args: Any, out: Out) -> int:
    """Print the plan and every problem in it; nothing moves. 1 when there are problems."""
    async with ShardedClient(Topology.from_toml(args.topology)) as client:
        current = await client.partition_map(args.collection)
        out(f"collection {args.collection}: epoch {current.epoch}, phase {current.phase}")
        record = await client._live().rebalancing.migration(args.collection)
        if record is not None:
            out(f"a migration is under way (step {record['step']}, tag {record['tag']})")
        plan = await _plan(client, args)
    out(plan.describe())
    return 1 if plan.problems else 0


async def run_rebalance(args: Any, out: Out) -> int:
    """Run (or, with no goal options, resume) the migration, with progress per step."""
    async with ShardedClient(Topology.from_toml(args.topology)) as client:
        goal = None
        if _has_goal(args):
            plan = await _plan(client, args)
            out(plan.describe())
            if plan.problems:
                return 1
            goal = plan.goal
        total = sum(s.records for s in await client.status()) or 1
        progress = StepProgress(out, total)

        report = await client.rebalance(
            args.collection,
            goal,
            batch=args.batch,
            rate=args.rate,
            concurrency=args.concurrency,
            progress=progress,
        )
        progress.finish()
    resumed = f" (resumed at {report.resumed_at})" if report.resumed_at else ""
    out(
        f"migration {report.tag} of {report.collection}: {' -> '.join(report.steps)}{resumed}; "
        f"{report.copied:,} record(s) copied, {report.passes} verify pass(es) fixing "
        f"{report.fixed:,}; epoch {report.epoch}; {report.seconds:.1f} s"
    )
    return 0


async def run_abort(args: Any, out: Out) -> int:
    async with ShardedClient(Topology.from_toml(args.topology)) as client:
        report = await client.abort_rebalance(args.collection)
    out(f"migration {report.tag} of {report.collection} aborted; epoch {report.epoch}")
    return 0
