"""Deleting what a migration leaves behind: the moved records' old copies after cleanup, or
the copies an aborted move made."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from .._options import options
from .._policies import TimePolicy
from ..catalog._layouts import PartLayouts, Target
from ..catalog._state import CollectionState
from ..control._maps import INCOMING_KEY, OUTGOING_KEY
from ..ops._partio import PartIO
from ._hintbarrier import HintBarrier
from ._support import again
from ._units import moving_units

__all__ = ["delete_everywhere", "delete_moved"]


def delete_everywhere(
    io: PartIO, part: Target, body: dict[str, Any]
) -> Callable[[], Awaitable[Any]]:
    """A filter delete that every copy of the shard must store: such a delete leaves no
    tombstone, so a copy that missed it would keep the old records for good (and could hand
    them back to the others in a repair). A copy that is down stops the step, to be resumed."""

    async def run() -> Any:
        with options(write_concern="all"):
            return await io.write(part, "delete", body)

    return run


async def delete_moved(
    io: PartIO,
    layouts: PartLayouts,
    state: CollectionState,
    source: Any,
    target: Any,
    tag: str,
    fence: Callable[[], Awaitable[None]],
    barrier: HintBarrier,
    *,
    abort: bool = False,
) -> None:
    """What a migration leaves behind, once the hints for the copies involved have landed:
    after cleanup the moved records' old copies (time buckets dropped whole, hashed records
    deleted by their outgoing mark); with ``abort`` the incoming copies the move made."""
    units = await moving_units(layouts, state, source, target)
    if abort:
        parts, key = units.targets, INCOMING_KEY
        await barrier.settle(f"abort of {state.name!r}", [p.shard for p in parts], fence)
    else:
        parts, key = units.sources, OUTGOING_KEY
        shards = [p.shard for p in parts] + [shard for shard, _ in units.buckets]
        await barrier.settle(f"cleanup of {state.name!r}", shards, fence)
        if isinstance(target, TimePolicy):
            for shard, label in units.buckets:
                await fence()
                drop = functools.partial(layouts.drop_bucket, state, shard, label)
                await again(f"dropping bucket {label} on shard {shard}", drop)
            return
    for part in parts:
        await fence()
        body = {"where": {key: tag}}
        await again(f"deleting the marked copies on {part.key}", delete_everywhere(io, part, body))
