"""The map one call is served under, carried down to routing and the part I/O.

A call of a collection is served under one partition map, fixed when it begins. The map is
passed down in a context variable, set only while the call's own code runs: a scan sets it
around each page it reads, never across a ``yield``, so a consumer's code between pages (and
a generator finalised in another task) never sees or resets it. ``NO_EPOCHS`` stands in when
there is no control store: nothing is served and every component uses the stored policy.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ._maps import PartitionMap

__all__ = [
    "NO_EPOCHS",
    "NoEpochs",
    "Served",
    "check_write_lease",
    "served_map",
    "serving_policy",
    "unserved",
]

_SERVED: contextvars.ContextVar[Served | None] = contextvars.ContextVar(
    "sharded_chroma_served_map", default=None
)


class Served:
    """One call's hold on a map: its collection, the map, and the write-lease check."""

    def __init__(
        self, collection: str, current: PartitionMap, check_lease: Callable[[], None]
    ) -> None:
        self.collection = collection
        self.map = current
        self.check_lease = check_lease

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make this the served map of the code run inside (same task, no ``yield``)."""
        token = _SERVED.set(self)
        try:
            yield
        finally:
            _SERVED.reset(token)


def _of(served: Served, state: Any) -> bool:
    """Whether ``state`` is the served collection or one of its time buckets."""
    owner = getattr(state, "parent", None) or state.id
    return served.collection == str(owner)


def served_map(state: Any) -> PartitionMap | None:
    """The map the running call serves, if it concerns ``state``'s collection (or one of its
    time buckets)."""
    served = _SERVED.get()
    if served is None or not _of(served, state):
        return None
    return served.map


def serving_policy(state: Any) -> Any:
    """The policy the running call routes by: its map's, else the stored one."""
    current = served_map(state)
    return state.policy if current is None else current.policy


def check_write_lease(state: Any) -> None:
    """Before each write request of a served call: refuse once the client's lease may have
    expired (a long batch must not outlive it)."""
    served = _SERVED.get()
    if served is not None and _of(served, state):
        served.check_lease()


@contextlib.contextmanager
def unserved() -> Iterator[None]:
    """No map served inside (the migrator's own requests are never mirrored or filtered)."""
    token = _SERVED.set(None)
    try:
        yield
    finally:
        _SERVED.reset(token)


class NoEpochs:
    """No control store: calls are served by their collection's stored policy."""

    @contextlib.asynccontextmanager
    async def hold(self, state: Any, *, writes: bool) -> AsyncIterator[Served | None]:
        yield None

    @contextlib.asynccontextmanager
    async def serving(self, state: Any, *, writes: bool) -> AsyncIterator[None]:
        yield

    def close(self) -> None:
        pass


NO_EPOCHS = NoEpochs()
