"""What the migration engine's steps share: the report, goal checks, retries of transient
failures, comparing map phases, and policies read back from a migration record."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import orjson
from chromadb.errors import ChromaError

from .._errors import ConfigurationError, NodeUnavailableError, ShardFailureError
from .._node import node_fault
from .._policies import HashPolicy, build_policy, policy_to_json
from ..control._maps import PartitionMap
from ..ops._migrating import mirrorable

__all__ = [
    "MigrationReport",
    "again",
    "check_goal",
    "policy_of_record",
    "same_phase",
    "single_error",
    "stable",
]

logger = logging.getLogger("sharded_chroma.rebalance")

_T = TypeVar("_T")


@dataclass
class MigrationReport:
    """What one run of the migrator did."""

    collection: str
    tag: str
    steps: list[str] = field(default_factory=list)
    copied: int = 0
    passes: int = 0
    fixed: int = 0
    epoch: int = 0
    resumed_at: str | None = None
    seconds: float = 0.0


def check_goal(current: Any, goal: Any) -> None:
    """Refuse a goal the engine cannot reach online, before anything is written."""
    for policy in (current, goal):
        if not mirrorable(policy):
            what = "hash of a metadata field" if policy.kind == "hash" else policy.kind
            raise ConfigurationError(
                f"online moves of a collection placed by {what} are not supported yet, only "
                "hash of the record id and time buckets (a record that changes its routing "
                "value could need two copies in one collection mid-move); nothing was changed"
            )
    if current.kind != goal.kind:
        raise ConfigurationError(
            f"the goal is a {goal.kind} policy but the collection is placed by a "
            f"{current.kind} one (nothing was changed)"
        )
    if current.kind == "time":
        same = ("field", "granularity") if not current.ranges else ("field",)
        if any(getattr(current, k) != getattr(goal, k) for k in same) or bool(
            current.ranges
        ) != bool(goal.ranges):
            raise ConfigurationError(
                "a time goal must bucket the same field the same way (field, granularity or "
                "ranges); only the shards of buckets may change (nothing was changed)"
            )
        return
    if current.slots != goal.slots:
        raise ConfigurationError(
            "the goal must hash into the same slot space as the current policy "
            f"({current.slots} vs {goal.slots} slots); nothing was changed"
        )


def transient(exc: BaseException) -> bool:
    """A failure worth another try: a node that did not answer, or a server error answer
    (Chroma 1.5 sometimes answers a get racing deletes with "Error finding id")."""
    if isinstance(exc, NodeUnavailableError):
        return True
    if isinstance(exc, ChromaError):
        return node_fault(exc)
    if isinstance(exc, ShardFailureError):
        return all(transient(e) for e in exc.failures.values())
    return False


async def again(what: str, run: Callable[[], Awaitable[_T]], attempts: int = 6) -> _T:
    """``run()``, tried again after transient failures (each step is idempotent: a copy
    resumes at its saved cursor, a pass starts over, deletes repeat)."""
    for attempt in range(1, attempts + 1):
        try:
            return await run()
        except Exception as exc:
            if attempt == attempts or not transient(exc):
                raise
            pause = min(5.0, 0.25 * 2**attempt)
            logger.warning("%s failed (%s); again in %.1f s", what, exc, pause)
            await anyio.sleep(pause)
    raise AssertionError("unreachable")


def single_error(exc: BaseException) -> BaseException:
    """The one error inside a task group's exception group (anyio wraps even a single one),
    so callers see the error class they can handle; a group of several is kept."""
    inner = getattr(exc, "exceptions", None)
    while isinstance(inner, tuple) and len(inner) == 1 and isinstance(inner[0], BaseException):
        exc = inner[0]
        inner = getattr(exc, "exceptions", None)
    return exc


def stable(policy: Any) -> dict[str, Any]:
    return {"phase": "stable", "policy": policy, "other": None, "tag": None}


def same_phase(current: PartitionMap, wanted: dict[str, Any]) -> bool:
    def text(p: Any) -> str | None:
        return None if p is None else policy_to_json(p)

    return (
        current.phase == wanted["phase"]
        and current.tag == wanted["tag"]
        and text(current.policy) == text(wanted["policy"])
        and text(current.other) == text(wanted["other"])
        and current.generation == wanted.get("generation", current.generation)
        and current.other_generation == wanted.get("other_generation", current.other_generation)
    )


def policy_of_record(text: str) -> HashPolicy:
    policy: HashPolicy = build_policy(orjson.loads(text), source="migration record")
    return policy
