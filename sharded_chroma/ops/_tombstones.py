"""Tombstones: short-lived marks of deletes by id, so a move under way elsewhere can tell that
the record it is moving was deleted, rather than moved or rewritten by someone else.

An update that moves a record reads it, writes it to its new part, then deletes the copy it
read, only while that copy is still the one read. When that delete finds the copy gone, three
things can have happened in another process: a delete (the update must then take its new copy
back: an update never creates a record), a move, or a rewrite (the record lives on; taking the
new copy back could lose the other writer's data, if it wrote to the same part). A delete by id
marks its ids here, with a version above anything it located, *before* deleting any copy, so
the mover that finds its source gone can tell the first case from the others.

The marks live in one hidden physical collection per logical collection, on the catalog shard,
in the companion database of time buckets (every copy of that shard holds it, written through
the usual write path). They only have to outlive a move in flight: marks older than ``keep``
seconds are deleted now and then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from uuid import UUID

from chromadb.errors import ChromaError, NotFoundError

from ..catalog._layouts import PartLayouts, Target
from ..catalog._physical import PhysicalIds
from ..catalog._state import VERSION_KEY, CollectionState
from ..cluster._cluster import Cluster
from ._clock import HybridClock
from ._locator import stamp_of
from ._partio import PartIO

__all__ = ["Tombstones"]

logger = logging.getLogger("sharded_chroma.writes")

# Expired marks are swept at most this often per process.
_SWEEP_EVERY = 60.0


class Tombstones:
    """Marks deletes by id and answers whether an id was deleted after a given version."""

    def __init__(
        self,
        cluster: Cluster,
        layouts: PartLayouts,
        physical: PhysicalIds,
        io: PartIO,
        clock: HybridClock,
        keep: float,
    ) -> None:
        self._cluster = cluster
        self._layouts = layouts
        self._physical = physical
        self._io = io
        self._clock = clock
        self._keep_us = int(keep * 1_000_000)
        self._swept: dict[UUID, float] = {}

    async def _ensure(self, state: CollectionState) -> Target:
        sub = await self._layouts.ensure_tombstones(state)
        return Target(self._cluster.catalog_shard, sub)

    async def mark(self, state: CollectionState, ids: Sequence[str]) -> None:
        """Mark ``ids`` deleted now (above every version this process has seen)."""
        if not ids:
            return
        target = await self._ensure(state)
        version = self._clock.reserve()
        body = {
            "ids": list(ids),
            "embeddings": [[0.0]] * len(ids),
            "metadatas": [{VERSION_KEY: version}] * len(ids),
            "documents": None,
            "uris": None,
        }
        try:
            await self._io.write(target, "upsert", body)
        except NotFoundError:
            self._physical.forget(target.state)  # dropped by someone: make it again, once
            target = await self._ensure(state)
            await self._io.write(target, "upsert", body)
        await self._sweep(state, target, version)

    async def deleted_after(
        self, state: CollectionState, ids: Sequence[str], versions: Sequence[int]
    ) -> set[str]:
        """Which of ``ids`` were marked deleted after the paired version."""
        if not ids:
            return set()
        target = Target(self._cluster.catalog_shard, self._layouts.tombstone_state(state))
        try:
            found = await self._io.guarded(
                target,
                lambda: self._io.read(target, "/get", {"ids": list(ids), "include": ["metadatas"]}),
            )
        except NotFoundError:
            return set()
        if not found:
            return set()
        marks = {
            rid: stamp_of(meta)[0]
            for rid, meta in zip(found["ids"], found.get("metadatas") or [], strict=False)
        }
        return {rid for rid, seen in zip(ids, versions, strict=True) if marks.get(rid, 0) > seen}

    async def _sweep(self, state: CollectionState, target: Target, now: int) -> None:
        last = self._swept.get(state.id, 0.0)
        if time.monotonic() - last < _SWEEP_EVERY:
            return
        self._swept[state.id] = time.monotonic()
        cutoff = now - self._keep_us
        try:
            await self._io.write(target, "delete", {"where": {VERSION_KEY: {"$lt": cutoff}}})
        except (ChromaError, OSError) as exc:  # best effort: the next sweep tries again
            logger.info("sweeping tombstones of %s: %s", state.name, exc)
