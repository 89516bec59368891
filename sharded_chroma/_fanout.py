"""Run one call per shard concurrently and collect answers and failures side by side."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from chromadb.errors import ChromaError

from ._errors import (
    ControlUnavailableError,
    NodeAccessError,
    PartialWriteError,
    ShardFailureError,
)

__all__ = ["Coverage", "OnShardError", "fan_out", "raise_for_failures"]

T = TypeVar("T")
OnShardError = Literal["raise", "partial"]


@dataclass(frozen=True)
class Coverage:
    """Which shards a call asked, which answered, which failed (with the error text), and
    which it skipped because the collection's policy and the filter rule out matches there."""

    asked: tuple[str, ...]
    answered: tuple[str, ...]
    failed: Mapping[str, str] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.failed


async def fan_out(
    calls: Mapping[str, Callable[[], Awaitable[T]]],
) -> tuple[dict[str, T], dict[str, Exception]]:
    """Await every call concurrently; a failing shard does not cancel the others, so the caller
    can say exactly which shards answered. Cancellation from outside still cancels all."""
    results: dict[str, T] = {}
    failures: dict[str, Exception] = {}

    async def run(name: str, call: Callable[[], Awaitable[T]]) -> None:
        try:
            results[name] = await call()
        except Exception as exc:  # collected, then raised or reported by the caller
            failures[name] = exc

    if len(calls) == 1:
        # The common single-shard case (get by id, one owner) needs no task.
        ((name, call),) = calls.items()
        await run(name, call)
        return results, failures
    # gather is as structured as a task group here: it awaits every child, and cancelling it
    # cancels them all; ``run`` keeps each child's Exception, so only a BaseException (a
    # cancellation, KeyboardInterrupt) comes back, and it is raised. It costs about a third
    # of an anyio task group per call, and this is the hot path of every fanned-out query.
    outcomes = await asyncio.gather(
        *(run(name, call) for name, call in calls.items()), return_exceptions=True
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return results, failures


def raise_for_failures(
    operation: str,
    failures: Mapping[str, Exception],
    *,
    unwritten_ids: Mapping[str, Sequence[str]] | None = None,
    all_failed: bool = False,
) -> None:
    """Raise one error for the failed shards, or nothing when there are none.

    When every failure is the same Chroma error class (say, NotFoundError because the collection
    was deleted, or InvalidArgumentError for a bad filter) and no write was partly applied, that
    error is re-raised as is, so callers see what one Chroma server would have raised; so is
    a refusal of this client's credentials or TLS setup when every failed shard refused it
    the same way (one proxy in front of every node), so it can be caught by its class, and
    so is this client's own refusal to write once its control-store lease may have expired
    (``ControlUnavailableError``: wait for the store, then write again).
    """
    if not failures:
        return
    errors = list(failures.values())
    first = errors[0]
    same_class = all(type(e) is type(first) for e in errors)
    as_is = same_class and isinstance(
        first, (ChromaError, NodeAccessError, ControlUnavailableError)
    )
    if as_is and (unwritten_ids is None or all_failed):
        raise first
    if unwritten_ids is not None:
        raise PartialWriteError(operation, failures, unwritten_ids) from first
    raise ShardFailureError(operation, failures) from first
