"""The migrator's passes over the data: copy the records a new policy moves, then reconcile
until a whole pass finds the target copies equal to their sources.

Sources are read in copy-proof pages (sequence ranges, see ``ops._seqpages``), raw: no
phase filter, no mirroring. Copies keep every stored key (sequence, version), lose the
outgoing mark and gain the incoming one. While the map is in ``dual``, clients write each
moved record to both places, so after the copy only the migrator's own races (a copy read
before a client's write and sent after it, a copy of a record a client deleted meanwhile)
can leave a difference; each reconcile pass fixes what it finds, and the migration moves on
only after a pass that found nothing. The source is the truth: an ``add`` of an id that
exists is a no-op at the source but creates the mirrored copy, so "newest version wins"
would be wrong there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
import orjson

from .._merge import take_rows
from ..catalog._layouts import Target
from ..catalog._state import SEQ_KEY, VERSION_KEY, CollectionState
from ..control._maps import INCOMING_KEY, OUTGOING_KEY
from ..ops._locator import FULL
from ..ops._migrating import strip_marks
from ..ops._partio import PartIO

__all__ = ["Passes", "Progress"]

logger = logging.getLogger("sharded_chroma.rebalance")

Progress = Callable[[str, int], None]
"""Called with a step name and how many records it handled since the last call."""


def _digest(row: Mapping[str, Any]) -> bytes:
    meta = strip_marks(row.get("metadatas"))
    return orjson.dumps(
        [
            row.get("embeddings"),
            row.get("documents"),
            row.get("uris"),
            None if meta is None else sorted(meta.items()),
        ],
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def _rows(page: Mapping[str, Any]) -> list[dict[str, Any]]:
    ids = page["ids"]
    out = []
    for n, rid in enumerate(ids):
        row = {"ids": rid}
        for column in FULL:
            values = page.get(column)
            row[column] = None if values is None else values[n]
        out.append(row)
    return out


def _version(meta: Mapping[str, Any] | None) -> int | None:
    value = None if meta is None else meta.get(VERSION_KEY)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Passes:
    """Copy and reconcile the records ``goal`` places elsewhere than ``source`` does."""

    def __init__(
        self,
        io: PartIO,
        state: CollectionState,
        source: Any,
        goal: Any,
        tag: str,
        *,
        batch: int,
        rate: float | None,
        progress: Progress,
        fence: Callable[[], Awaitable[None]],
    ) -> None:
        self._io = io
        self._state = state
        self._source = source
        self._goal = goal
        self._tag = tag
        self._batch = batch
        self._rate = rate
        self._progress = progress
        self._fence = fence

    def _homes(self, page: Mapping[str, Any]) -> list[str]:
        return [p.shard for p in self._goal.place_all(page["ids"], page.get("metadatas"))]

    async def _throttle(self, started: float, records: int) -> None:
        if self._rate:
            await anyio.sleep(max(0.0, records / self._rate - (time.monotonic() - started)))

    async def _source_pages(self, shard: str, after: int | None) -> Any:
        body: dict[str, Any] = {"include": FULL}
        if after is not None:
            # Records at the cursor's own sequence value are sent again: copies are idempotent.
            body["where"] = {SEQ_KEY: {"$gte": after}}
        async for page in self._io.pages(Target(shard, self._state), body, self._batch, raw=True):
            yield page

    def _copy_body(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        metas = []
        for row in rows:
            meta = strip_marks(row.get("metadatas")) or {}
            meta[INCOMING_KEY] = self._tag
            metas.append(meta)
        return {
            "ids": [r["ids"] for r in rows],
            "embeddings": [r["embeddings"] for r in rows],
            "metadatas": metas,
            "documents": [r["documents"] for r in rows],
            "uris": [r["uris"] for r in rows],
        }

    async def _mark_outgoing(self, shard: str, ids: Sequence[str]) -> None:
        if ids:
            body = {"ids": list(ids), "metadatas": [{OUTGOING_KEY: self._tag} for _ in ids]}
            await self._io.write(Target(shard, self._state), "update", body)

    async def copy(
        self, shard: str, after: int | None, save: Callable[[int], Awaitable[None]]
    ) -> int:
        """Copy every record of ``shard`` the goal moves, from sequence ``after`` on; the
        cursor is saved after every page. Returns how many records were copied."""
        copied = 0
        async for page in self._source_pages(shard, after):
            started = time.monotonic()
            rows = _rows(page)
            homes = self._homes(page)
            by_home: dict[str, list[dict[str, Any]]] = {}
            for row, home in zip(rows, homes, strict=True):
                if home != shard:
                    by_home.setdefault(home, []).append(row)
            await self._fence()
            for home, moving in by_home.items():
                await self._io.write(Target(home, self._state), "upsert", self._copy_body(moving))
            unmarked = [
                r["ids"]
                for rs in by_home.values()
                for r in rs
                if (r["metadatas"] or {}).get(OUTGOING_KEY) != self._tag
            ]
            await self._mark_outgoing(shard, unmarked)
            moved = sum(len(v) for v in by_home.values())
            copied += moved
            seqs = [m.get(SEQ_KEY) for m in page.get("metadatas") or [] if m]
            last = max((s for s in seqs if isinstance(s, int)), default=None)
            if last is not None:
                await save(last)
            self._progress("copy", len(rows))
            await self._throttle(started, len(rows))
        return copied

    async def reconcile(self, shards: Sequence[str]) -> int:
        """One pass over every source shard and every target: returns how many differences it
        found (and fixed). Zero means the targets held exactly the sources' moved records."""
        expected: dict[str, set[str]] = {}
        found = 0
        for shard in shards:
            found += await self._reconcile_source(shard, expected)
        for home in sorted(self._goal.shards_named()):
            found += await self._remove_extras(home, expected.get(home, set()))
        return found

    async def _reconcile_source(self, shard: str, expected: dict[str, set[str]]) -> int:
        found = 0
        async for page in self._source_pages(shard, None):
            started = time.monotonic()
            rows = _rows(page)
            homes = self._homes(page)
            by_home: dict[str, list[dict[str, Any]]] = {}
            for row, home in zip(rows, homes, strict=True):
                if home != shard:
                    by_home.setdefault(home, []).append(row)
                    expected.setdefault(home, set()).add(row["ids"])
            unmarked = [
                r["ids"]
                for rs in by_home.values()
                for r in rs
                if (r["metadatas"] or {}).get(OUTGOING_KEY) != self._tag
            ]
            await self._fence()
            await self._mark_outgoing(shard, unmarked)
            found += len(unmarked)
            for home, moving in by_home.items():
                found += await self._fix(home, moving)
            self._progress("verify", len(rows))
            await self._throttle(started, len(rows))
        return found

    async def _fix(self, home: str, moving: Sequence[Mapping[str, Any]]) -> int:
        target = Target(home, self._state)
        ids = [r["ids"] for r in moving]
        answer = await self._io.read(target, "/get", {"ids": ids, "include": FULL}, raw=True)
        copies = {r["ids"]: r for r in _rows(answer)}
        stale: list[Mapping[str, Any]] = []
        differing = 0
        for row in moving:
            copy = copies.get(row["ids"])
            if copy is not None and _digest(copy) == _digest(row):
                continue
            differing += 1
            # Upserts merge: a copy with keys its source lacks must go first, and only while
            # it is the copy compared. One a client rewrote meanwhile stays, for the next pass.
            if copy is None or await self._delete_copy(target, copy):
                stale.append(row)
        if stale:
            logger.info("reconcile: %d copy(ies) on %s differed; sent again", len(stale), home)
            await self._io.write(target, "upsert", self._copy_body(stale))
        return differing

    async def _delete_copy(self, target: Target, copy: Mapping[str, Any]) -> bool:
        """Delete one copy while it is the one read; whether it was deleted."""
        version = _version(copy.get("metadatas"))
        where = None if version is None else {VERSION_KEY: version}
        answer = await self._io.write(target, "delete", {"ids": [copy["ids"]], "where": where})
        return bool((answer or {}).get("deleted", 1))

    async def _remove_extras(self, home: str, expected: set[str]) -> int:
        """Incoming copies on ``home`` whose source no longer has them (a delete raced the
        copy): deleted, each only while it is the copy seen."""
        target = Target(home, self._state)
        extras: list[dict[str, Any]] = []
        body = {"where": {INCOMING_KEY: self._tag}, "include": ["metadatas"]}
        async for page in self._io.pages(target, body, self._batch, raw=True):
            rows = [r for r in range(len(page["ids"])) if page["ids"][r] not in expected]
            if rows:
                extras.extend(_rows(take_rows(page, rows)))
        await self._fence()
        for copy in extras:
            await self._delete_copy(target, copy)
        if extras:
            logger.info("reconcile: %d copy(ies) on %s had no source; deleted", len(extras), home)
        return len(extras)
