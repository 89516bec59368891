"""What a rebalance plan is: its moves, its goal, the balance after it and its problems."""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import ConfigurationError
from .._policies import FieldPolicy, HashPolicy, TimePolicy

__all__ = ["Move", "PlannedPolicy", "RebalancePlan", "raise_for_problems"]

PlannedPolicy = HashPolicy | FieldPolicy | TimePolicy
"""A policy the planner works on (a ``CompositePolicy`` is a ``FieldPolicy``)."""
_SHOW = 6  # ranges or bucket labels listed per move in ``describe``


@dataclass(frozen=True)
class Move:
    """One unit of work: slots, time buckets or field partitions that go from source to target.

    ``records`` is how many records it carries, when the plan was given counts."""

    source: str
    target: str
    slots: tuple[tuple[int, int], ...] = ()
    buckets: tuple[str, ...] = ()
    partitions: tuple[str, ...] = ()
    records: int | None = None

    @property
    def slot_count(self) -> int:
        return sum(hi - lo for lo, hi in self.slots)

    def what(self) -> str:
        """What moves, in a few words: ``slots 0-9, 20-29 (20 slots)``, ``buckets 2026-01-01``."""
        if self.slots:
            shown = [f"{lo}-{hi - 1}" if hi - lo > 1 else str(lo) for lo, hi in self.slots]
            return f"slots {_listed(shown)} ({self.slot_count} slots)"
        if self.buckets:
            return f"bucket(s) {_listed(list(self.buckets))}"
        return f"partition(s) {_listed(list(self.partitions))}"


@dataclass(frozen=True)
class RebalancePlan:
    """A goal policy and the moves that get the records of ``current`` to where it places them.

    ``balance`` is per shard after the plan, in ``unit``: records when counts were given, else
    slots (hash), buckets (time) or partitions (field). It is a read-only mapping."""

    current: PlannedPolicy
    goal: PlannedPolicy
    moves: tuple[Move, ...]
    balance: dict[str, int]
    problems: tuple[str, ...] = ()
    unit: str = "records"

    def describe(self) -> str:
        """A multi-line report: the moves, records per move, the balance after, the problems."""
        counted = [m.records for m in self.moves if m.records is not None]
        head = f"{self.goal.kind} policy: {len(self.moves)} move(s)"
        if isinstance(self.goal, HashPolicy):
            moved, slots = sum(m.slot_count for m in self.moves), self.goal.slots
            head += f", {moved} of {slots} slots ({100 * moved / slots:.1f}%)"
        if counted:
            head += f", {sum(counted):,} records"
        if not self.moves:
            done = f"not planned, {len(self.problems)} problem(s)" if self.problems else "no moves"
            head = f"{self.goal.kind} policy: {done}"
        lines = [head]
        if (
            isinstance(self.goal, TimePolicy)
            and isinstance(self.current, TimePolicy)
            and self.goal.hot != self.current.hot
        ):
            lines.append(f"  new buckets go to {self.goal.hot} (was {self.current.hot})")
        by_metadata = isinstance(self.goal, FieldPolicy) or getattr(self.goal, "field", None)
        if self.moves and by_metadata and not isinstance(self.goal, TimePolicy):
            lines.append("  placed by metadata: the move copies every record (a new generation)")
        for m in self.moves:
            records = "" if m.records is None else f", {m.records:,} records"
            lines.append(f"  {m.source} -> {m.target}: {m.what()}{records}")
        total = sum(self.balance.values())
        width = max((len(s) for s in self.balance), default=0)
        lines.append(f"balance after the plan ({self.unit} per shard):")
        for shard, n in self.balance.items():
            share = 100 * n / total if total else 0.0
            lines.append(f"  {shard:<{width}}  {n:>12,}  {share:5.1f}%")
        if self.problems:
            lines.append("problems:")
            lines.extend(f"  - {p}" for p in self.problems)
        return "\n".join(lines)


def raise_for_problems(plan: RebalancePlan) -> None:
    """Raise ``ConfigurationError`` listing every problem of ``plan``, if it has any."""
    if plan.problems:
        raise ConfigurationError(
            f"the rebalance plan has {len(plan.problems)} problem(s): " + "; ".join(plan.problems)
        )


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more
