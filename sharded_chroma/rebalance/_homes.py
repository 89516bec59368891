"""Where a move puts each record of a source part's page: strategies of the data passes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from .._errors import RoutingError
from ..catalog._layouts import Target
from ..catalog._reserved import visible_metadata
from ..catalog._state import CollectionState

__all__ = ["BucketHomes", "HashHomes", "Homes", "PlacedHomes"]


class Homes(Protocol):
    """Where the goal puts each record of a source part's page (None: it stays)."""

    def of(self, source: Target, page: Mapping[str, Any]) -> list[Target | None]: ...


class HashHomes:
    """Records hashed by id: each goes to the goal's shard for it, in the root collection."""

    def __init__(self, goal: Any, state: CollectionState) -> None:
        self._goal = goal
        self._state = state

    def of(self, source: Target, page: Mapping[str, Any]) -> list[Target | None]:
        metas = page.get("metadatas") or [None] * len(page["ids"])
        out: list[Target | None] = []
        for rid, meta in zip(page["ids"], metas, strict=True):
            try:
                shard = self._goal.place(rid, visible_metadata(meta)).shard
            except RoutingError:
                shard = source.shard  # one the goal cannot place stays where it is
            out.append(None if shard == source.shard else Target(shard, self._state))
        return out


class BucketHomes:
    """Whole time buckets: every record of a moving bucket goes to the same bucket elsewhere."""

    def __init__(self, moves: Mapping[str, Target]) -> None:
        self._moves = dict(moves)
        """Target part by source part key."""

    def of(self, source: Target, page: Mapping[str, Any]) -> list[Target | None]:
        home = self._moves.get(source.key)
        return [home] * len(page["ids"])


class PlacedHomes:
    """Every record to the goal's part for it in another generation (even on its own shard:
    that is another physical collection). A record the goal cannot place raises
    ``RoutingError``: the copy stops, before cutover."""

    def __init__(self, goal: Any, state: CollectionState) -> None:
        self._goal = goal
        self._state = state

    def of(self, source: Target, page: Mapping[str, Any]) -> list[Target | None]:
        metas = page.get("metadatas") or [None] * len(page["ids"])
        return [
            Target(self._goal.place(rid, visible_metadata(meta)).shard, self._state)
            for rid, meta in zip(page["ids"], metas, strict=True)
        ]
