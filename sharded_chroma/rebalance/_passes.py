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

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio

from .._merge import take_rows
from ..catalog._layouts import Target
from ..catalog._state import SEQ_KEY, VERSION_KEY, CollectionState
from ..control._maps import INCOMING_KEY, OUTGOING_KEY
from ..ops._locator import FULL
from ..ops._migrating import strip_marks
from ..ops._partio import PartIO
from ._homes import Homes
from ._rows import digest, rows_of, stamp_of, version_of

__all__ = ["Passes", "Progress"]

logger = logging.getLogger("sharded_chroma.rebalance")

# How long a difference must hold before it counts: longer than a client's write takes to
# reach both places.
_SETTLE_S = 0.3
# Source parts are paged by ids and metadata in pages this many times the batch: a move that
# takes a quarter of a part then still reads and writes the moved records about a batch at a
# time (a request per small slice cost more than the records did).
_SCAN_PAGES = 4

Progress = Callable[[str, int], None]
"""Called with a step name and how many records it handled since the last call."""


class Passes:
    """Copy and reconcile the records ``goal`` places elsewhere than ``source`` does."""

    def __init__(
        self,
        io: PartIO,
        state: CollectionState,
        homes: Homes,
        tag: str,
        *,
        batch: int,
        rate: float | None,
        progress: Progress,
        fence: Callable[[], Awaitable[None]],
        lease_left: Callable[[], float],
        marks: bool = True,
    ) -> None:
        self._io = io
        self._state = state
        self._homes_of = homes
        self._tag = tag
        # A rebuild copies into collections of their own, which hold nothing but copies:
        # nothing is marked, and every record of a target part is one.
        self._marks = marks
        self._batch = batch
        self._rate = rate
        self._progress = progress
        self._fence = fence
        self._lease_left = lease_left

    async def _write(self, target: Target, op: str, body: Mapping[str, Any]) -> Any:
        """One write of the migrator, given up on (``TimeoutError``: the run stops, to be
        resumed) once this migrator's lease may have expired: a stalled migrator must not go
        on writing where a second one may have taken over."""
        await self._fence()
        with anyio.fail_after(max(0.0, self._lease_left())):
            return await self._io.write(target, op, body)

    async def _throttle(self, started: float, records: int) -> None:
        if not self._rate:
            return
        until = started + records / self._rate
        # In slices, renewing the lease between them: a low rate must not outlast it.
        while (left := until - time.monotonic()) > 0:
            await anyio.sleep(min(left, 1.0))
            await self._fence()

    async def _source_pages(self, source: Target, after: int | None) -> Any:
        # Ids and metadata only (what placement needs): the moved records' content is read
        # by id afterwards, so a move of a quarter of a part reads a quarter of its vectors.
        body: dict[str, Any] = {"include": ["metadatas"]}
        if after is not None:
            # Records at the cursor's own sequence value are sent again: copies are idempotent.
            body["where"] = {SEQ_KEY: {"$gte": after}}
        async for page in self._io.pages(source, body, self._batch * _SCAN_PAGES, raw=True):
            yield page

    async def _content(
        self, source: Target, rows: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """The whole source records of ``rows`` (a record deleted since is not among them),
        read a batch at a time."""
        out: list[dict[str, Any]] = []
        for at in range(0, len(rows), self._batch):
            body = {"ids": [r["ids"] for r in rows[at : at + self._batch]], "include": FULL}
            out += rows_of(await self._io.read(source, "/get", body, raw=True))
        return out

    def _copy_body(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        metas = []
        for row in rows:
            meta = strip_marks(row.get("metadatas")) or {}
            if self._marks:
                meta[INCOMING_KEY] = self._tag
            metas.append(meta)
        return {
            "ids": [r["ids"] for r in rows],
            "embeddings": [r["embeddings"] for r in rows],
            "metadatas": metas,
            "documents": [r["documents"] for r in rows],
            "uris": [r["uris"] for r in rows],
        }

    async def _mark_outgoing(self, source: Target, ids: Sequence[str]) -> None:
        for at in range(0, len(ids), self._batch):
            chunk = list(ids[at : at + self._batch])
            body = {"ids": chunk, "metadatas": [{OUTGOING_KEY: self._tag} for _ in chunk]}
            await self._write(source, "update", body)

    def _moving(
        self, source: Target, page: Mapping[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[str, tuple[Target, list[dict[str, Any]]]], list[str]]:
        """A source page's rows, those the goal moves grouped by the part they go to (by part
        key), and the ids of those not yet carrying the outgoing mark."""
        rows = rows_of(page)
        by_home: dict[str, tuple[Target, list[dict[str, Any]]]] = {}
        for row, home in zip(rows, self._homes_of.of(source, page), strict=True):
            if home is not None:
                by_home.setdefault(home.key, (home, []))[1].append(row)
        unmarked = [
            r["ids"]
            for _, moving in by_home.values()
            for r in moving
            if self._marks and (r["metadatas"] or {}).get(OUTGOING_KEY) != self._tag
        ]
        return rows, by_home, unmarked

    async def _whole_by_home(
        self, source: Target, by_home: Mapping[str, tuple[Target, list[dict[str, Any]]]]
    ) -> dict[str, tuple[Target, list[dict[str, Any]]]]:
        """The moving records read whole, grouped by their home as read then: a client may
        have changed a routing value since the page showed them."""
        whole = await self._content(source, [r for _, rows in by_home.values() for r in rows])
        out: dict[str, tuple[Target, list[dict[str, Any]]]] = {}
        page = {"ids": [r["ids"] for r in whole], "metadatas": [r["metadatas"] for r in whole]}
        for row, home in zip(whole, self._homes_of.of(source, page), strict=True):
            if home is not None:
                out.setdefault(home.key, (home, []))[1].append(row)
        return out

    async def copy(
        self, source: Target, after: int | None, save: Callable[[int], Awaitable[None]]
    ) -> int:
        """Copy every record of the ``source`` part the goal moves, from sequence ``after``
        on; the cursor is saved after every page. Returns how many records were copied."""
        copied = 0
        async for page in self._source_pages(source, after):
            started = time.monotonic()
            rows, by_home, unmarked = self._moving(source, page)
            await self._fence()
            for home, whole in (await self._whole_by_home(source, by_home)).values():
                for at in range(0, len(whole), self._batch):
                    chunk = whole[at : at + self._batch]
                    await self._write(home, "upsert", self._copy_body(chunk))
                copied += len(whole)
            await self._mark_outgoing(source, unmarked)
            seqs = [m.get(SEQ_KEY) for m in page.get("metadatas") or [] if m]
            last = max((s for s in seqs if isinstance(s, int)), default=None)
            if last is not None:
                await save(last)
            self._progress("copy", len(rows))
            await self._throttle(started, len(rows))
        return copied

    async def reconcile(self, sources: Sequence[Target], targets: Sequence[Target]) -> int:
        """One pass over every source part and every target part: returns how many copies it
        found wrong (and fixed). Zero means every target held exactly its sources' moved
        records, apart from writes clients were making (which reach both places)."""
        expected: dict[str, set[str]] = {}
        found = 0
        # Only a move into a new generation takes every record of parts placed by metadata,
        # where two processes moving one record can leave it in two parts for a while.
        shadowed = {} if self._marks else await self._shadowed(sources)
        for source in sources:
            found += await self._reconcile_source(source, expected, shadowed)
        for target in targets:
            found += await self._remove_extras(target, expected.get(target.key, set()), sources)
        return found

    async def _shadowed(self, sources: Sequence[Target]) -> dict[str, str]:
        """Ids held by several source parts, mapped to the part of their newest copy (highest
        version, then sequence; ties: the first part), which readers keep and the copy must
        hold: the other copies are neither compared nor kept."""
        seen: dict[str, tuple[tuple[int, int], str]] = {}
        several: set[str] = set()
        for source in sources:
            async for page in self._source_pages(source, None):
                for rid, meta in zip(page["ids"], page.get("metadatas") or [], strict=False):
                    stamp = stamp_of(meta)
                    if rid in seen:
                        several.add(rid)
                        if stamp <= seen[rid][0]:
                            continue
                    seen[rid] = (stamp, source.key)
        return {rid: seen[rid][1] for rid in several}

    async def _reconcile_source(
        self, source: Target, expected: dict[str, set[str]], shadowed: Mapping[str, str]
    ) -> int:
        found = 0
        async for page in self._source_pages(source, None):
            started = time.monotonic()
            if shadowed:
                keep = [
                    n
                    for n, rid in enumerate(page["ids"])
                    if shadowed.get(rid, source.key) == source.key
                ]
                page = take_rows(page, keep)
            rows, by_home, unmarked = self._moving(source, page)
            await self._fence()
            await self._mark_outgoing(source, unmarked)
            found += len(unmarked)
            for key, (home, whole) in (await self._whole_by_home(source, by_home)).items():
                expected.setdefault(key, set()).update(r["ids"] for r in whole)
                found += await self._fix(source, home, whole)
            self._progress("verify", len(rows))
            await self._throttle(started, len(rows))
        return found

    async def _differing(
        self, target: Target, rows: Sequence[Mapping[str, Any]]
    ) -> list[tuple[Mapping[str, Any], Mapping[str, Any] | None]]:
        """The rows whose copy on ``target`` is missing or differs, with that copy."""
        if not rows:
            return []
        ids = [r["ids"] for r in rows]
        answer = await self._io.read(target, "/get", {"ids": ids, "include": FULL}, raw=True)
        copies = {r["ids"]: r for r in rows_of(answer)}
        out: list[tuple[Mapping[str, Any], Mapping[str, Any] | None]] = []
        for row in rows:
            copy = copies.get(row["ids"])
            if copy is None or digest(copy) != digest(row):
                out.append((row, copy))
        return out

    async def _fix(
        self, source: Target, target: Target, moving: Sequence[Mapping[str, Any]]
    ) -> int:
        """Send again the copies on ``home`` that stay wrong; returns how many still differ
        afterwards. A difference whose source changed meanwhile is a client's write under
        way, which reaches both places, and is left to it; only one that holds (the copy went
        out of date while the source stayed) is fixed. Then every id found differing is read
        again in the pass's order (source, then copy): agreeing then is the same evidence as
        agreeing at first, and a pass is clean only when every record gave it."""
        first = await self._differing(target, moving)
        if not first:
            return 0
        await anyio.sleep(_SETTLE_S)
        ids = [row["ids"] for row, _ in first]
        now = await self._sourcerows_of(source, ids)
        held = [r for r, _ in first if r["ids"] in now and digest(now[r["ids"]]) == digest(r)]
        stale: list[Mapping[str, Any]] = []
        for row, copy in await self._differing(target, held):
            # Upserts merge: a copy with keys its source lacks must go first, and only while
            # it is the copy compared. One a client rewrote meanwhile stays, for the next pass.
            if copy is None or await self._delete_copy(target, copy):
                stale.append(row)
        if stale:
            logger.info(
                "reconcile: %d copy(ies) on %s differed; sent again", len(stale), target.key
            )
            await self._write(target, "upsert", self._copy_body(stale))
        return await self._still_differing(source, target, ids)

    async def _sourcerows_of(self, source: Target, ids: list[str]) -> dict[str, dict[str, Any]]:
        answer = await self._io.read(source, "/get", {"ids": ids, "include": FULL}, raw=True)
        return {r["ids"]: r for r in rows_of(answer)}

    async def _still_differing(self, source: Target, target: Target, ids: list[str]) -> int:
        """How many of ``ids`` differ between ``source`` and ``target`` now (one deleted at
        the source meanwhile agrees when its copy is gone too)."""
        now = await self._sourcerows_of(source, ids)
        wrong = await self._differing(target, list(now.values()))
        gone = [i for i in ids if i not in now]
        if gone:
            body = {"ids": gone, "include": []}
            wrong += [
                (r, None) for r in rows_of(await self._io.read(target, "/get", body, raw=True))
            ]
        for row, copy in wrong:
            logger.debug("reconcile: %s on %s still differs: %s", row["ids"], target.key, copy)
        return len(wrong)

    async def _delete_copy(self, target: Target, copy: Mapping[str, Any]) -> bool:
        """Delete one copy while it is the one read; whether it was deleted."""
        version = version_of(copy.get("metadatas"))
        where = None if version is None else {VERSION_KEY: version}
        answer = await self._write(target, "delete", {"ids": [copy["ids"]], "where": where})
        return bool((answer or {}).get("deleted", 1))

    async def _sourced(
        self, target: Target, ids: list[str], sources: Sequence[Target]
    ) -> dict[str, dict[str, Any]]:
        """Of ``ids``, those whose newest copy in the sources as they are now (one in several
        parts is settled as readers settle it) has its home on ``target``, with that copy."""
        newest: dict[str, tuple[tuple[int, int], dict[str, Any], bool]] = {}
        for source in sources:
            read = functools.partial(
                self._io.read, source, "/get", {"ids": ids, "include": FULL}, raw=True
            )
            answer = await self._io.guarded(source, read)
            if answer is None:
                continue  # a bucket dropped meanwhile
            for row, home in zip(rows_of(answer), self._homes_of.of(source, answer), strict=True):
                stamp = stamp_of(row.get("metadatas"))
                if row["ids"] in newest and stamp <= newest[row["ids"]][0]:
                    continue
                newest[row["ids"]] = (stamp, row, home is not None and home.key == target.key)
        return {rid: row for rid, (_, row, mine) in newest.items() if mine}

    async def _remove_extras(
        self,
        target: Target,
        expected: set[str],
        sources: Sequence[Target],
    ) -> int:
        """Incoming copies on ``target`` that its sources' pages did not show. After a pause,
        one still there whose record a source holds now (a client moved it there after that
        source's pages were read) is compared with it; one no source holds (a delete raced
        the copy) is deleted, only while it is the copy seen. Returns how many were neither
        gone by then nor equal to their source: the pass is clean only when that is none."""
        candidates: list[str] = []
        body: dict[str, Any] = {"include": []}
        if self._marks:
            body["where"] = {INCOMING_KEY: self._tag}
        async for page in self._io.pages(target, body, self._batch, raw=True):
            candidates += [rid for rid in page["ids"] if rid not in expected]
        if not candidates:
            return 0
        await anyio.sleep(_SETTLE_S)
        sourced = await self._sourced(target, candidates, sources)
        # Read after the sources, as a pass reads: a copy a client deleted is gone by now.
        left = await self._io.read(
            target, "/get", {"ids": candidates, "include": ["metadatas"]}, raw=True
        )
        extras = [r for r in rows_of(left) if r["ids"] not in sourced]
        unequal = await self._differing(target, [r for r in sourced.values()])
        await self._fence()
        gone: list[str] = []
        for copy in extras:
            if await self._delete_copy(target, copy):
                gone.append(copy["ids"])
        if gone:
            logger.info(
                "reconcile: %d copy(ies) on %s had no source; deleted", len(gone), target.key
            )
        # A copy deleted here agrees with its sources (absent) from then on, unless a source
        # holds it for this target by now (a client's write whose copy here came first).
        back = await self._sourced(target, gone, sources) if gone else {}
        return len(extras) - len(gone) + len(unequal) + len(back)
