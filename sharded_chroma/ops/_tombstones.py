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

A delete also announces itself while it runs (``begin`` .. ``end``), because it looks for its
records part by part: a move that writes a record to a part the delete already looked at and
removes it from one the delete looks at later would slip past it, and the record would outlive
an acknowledged delete. The announcement (the delete's ids, or none for a delete by filter, and
its filters) is written before the delete looks anywhere and taken back when it is done. An
update that moves records looks for announcements after writing its new copies and before
removing the old ones, so any delete that could have missed them is still announced then; it
applies that delete to its new copies (the update is then ordered first, as it may be: the two
overlap). An announcement older than ``ANNOUNCED_FOR`` seconds is ignored (its process died or
stalled), and swept with the marks.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import anyio
import orjson
from chromadb.api.types import Where, WhereDocument
from chromadb.errors import ChromaError, NotFoundError

from ..catalog._layouts import PartLayouts, Target
from ..catalog._physical import PhysicalIds
from ..catalog._state import RESERVED_PREFIX, VERSION_KEY, CollectionState
from ..cluster._cluster import Cluster
from ._clock import HybridClock
from ._locator import stamp_of
from ._partio import PartIO

__all__ = ["ANNOUNCED_FOR", "Deleting", "Tombstones"]

logger = logging.getLogger("sharded_chroma.writes")

# Expired marks are swept at most this often per process.
_SWEEP_EVERY = 60.0

ANNOUNCED_FOR = 60.0
"""Seconds an announcement of a running delete counts."""

# The id an announcement row is about ("" for a delete by filter alone), and the prefix of its
# row id (the rest is a fresh token and a row number, so no user id is ever hit). Every row of
# one delete holds the same document (its token and filters), which groups them back.
_ABOUT_KEY = RESERVED_PREFIX + "del"
_ROW_PREFIX = RESERVED_PREFIX + "del-"
_BY_FILTER = ""


@dataclass(frozen=True)
class Deleting:
    """A delete under way in some process: its ids (None: whatever its filters match) and
    its filters, in stored terms."""

    ids: frozenset[str] | None
    where: Where | None
    where_document: WhereDocument | None

    def covers(self, record_id: str) -> bool:
        return self.ids is None or record_id in self.ids


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
        version = self._clock.reserve()
        target = await self._upsert(state, list(ids), [{VERSION_KEY: version}] * len(ids), None)
        await self._sweep(state, target, version)

    async def begin(
        self,
        state: CollectionState,
        ids: Sequence[str] | None,
        where: Where | None,
        where_document: WhereDocument | None,
    ) -> list[str]:
        """Announce a delete of ``ids`` (None: by filter alone) before it looks for anything;
        returns the rows ``end`` takes back."""
        about = sorted(set(ids)) if ids is not None else [_BY_FILTER]
        token = uuid.uuid4().hex
        rows = [f"{_ROW_PREFIX}{token}-{n}" for n in range(len(about))]
        version = self._clock.reserve()
        filters = orjson.dumps(
            {"token": token, "where": where, "where_document": where_document}
        ).decode()
        metadatas = [{VERSION_KEY: version, _ABOUT_KEY: rid} for rid in about]
        await self._upsert(state, rows, metadatas, [filters] * len(rows))
        return rows

    async def end(self, state: CollectionState, rows: Sequence[str]) -> None:
        """Take an announcement back (best effort: a row left behind stops counting after
        ``ANNOUNCED_FOR`` seconds); runs to the end even when the caller is cancelled."""
        if not rows:
            return
        target = self._marks(state)
        with anyio.CancelScope(shield=True), anyio.move_on_after(10.0):
            try:
                await self._io.write(target, "delete", {"ids": list(rows)})
            except (ChromaError, OSError) as exc:
                logger.info("taking back a delete announcement of %s: %s", state.name, exc)

    async def deleting(self, state: CollectionState, ids: Sequence[str]) -> list[Deleting]:
        """The deletes under way that may concern ``ids`` (announced, not yet taken back)."""
        if not ids:
            return []
        target = self._marks(state)
        body = {
            "where": {_ABOUT_KEY: {"$in": [*sorted(set(ids)), _BY_FILTER]}},
            "include": ["metadatas", "documents"],
        }
        try:
            found = await self._io.guarded(target, lambda: self._io.read(target, "/get", body))
        except NotFoundError:
            return []  # no delete by id ever ran on this collection
        if not found:
            return []
        oldest = self._clock.reserve() - int(ANNOUNCED_FOR * 1_000_000)
        by_delete: dict[str, set[str]] = {}
        for meta, doc in zip(found["metadatas"] or [], found["documents"] or [], strict=False):
            if meta and doc and stamp_of(meta)[0] >= oldest:
                by_delete.setdefault(doc, set()).add(str(meta.get(_ABOUT_KEY, _BY_FILTER)))
        out = []
        for doc, about in by_delete.items():
            filters: dict[str, Any] = orjson.loads(doc)
            out.append(
                Deleting(
                    None if _BY_FILTER in about else frozenset(about),
                    filters.get("where"),
                    filters.get("where_document"),
                )
            )
        return out

    def _marks(self, state: CollectionState) -> Target:
        """The marks' collection, as a target (not made if missing)."""
        return Target(self._cluster.catalog_shard, self._layouts.tombstone_state(state))

    async def _upsert(
        self,
        state: CollectionState,
        ids: list[str],
        metadatas: list[dict[str, Any]],
        documents: list[str] | None,
    ) -> Target:
        target = await self._ensure(state)
        body = {
            "ids": ids,
            "embeddings": [[0.0]] * len(ids),
            "metadatas": metadatas,
            "documents": documents,
            "uris": None,
        }
        try:
            await self._io.write(target, "upsert", body)
        except NotFoundError:
            self._physical.forget(target.state)  # dropped by someone: make it again, once
            target = await self._ensure(state)
            await self._io.write(target, "upsert", body)
        return target

    async def deleted_after(
        self, state: CollectionState, ids: Sequence[str], versions: Sequence[int]
    ) -> set[str]:
        """Which of ``ids`` were marked deleted after the paired version."""
        if not ids:
            return set()
        target = self._marks(state)
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
