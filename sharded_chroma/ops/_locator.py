"""Finding where existing records are, and reading them whole (for moves and adds)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chromadb.api.types import IDs, Where, WhereDocument

from .._fanout import fan_out, raise_for_failures
from ..catalog._layouts import PartLayouts, Target
from ..catalog._reserved import visible_metadata
from ..catalog._state import SEQ_KEY, VERSION_KEY, CollectionState
from ._clock import HybridClock
from ._partio import PartIO
from ._router import Router

__all__ = ["FULL", "Located", "Locator", "Stamp", "stamp_of", "stamp_where"]

FULL = ["embeddings", "metadatas", "documents", "uris"]

Stamp = tuple[int, int | None]
"""What identifies one stored copy of a record: its version and sequence (0 and None for a
record written outside this library)."""


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def stamp_of(metadata: Mapping[str, Any] | None) -> Stamp:
    meta = metadata or {}
    return (_int(meta.get(VERSION_KEY)) or 0, _int(meta.get(SEQ_KEY)))


def stamp_where(stamp: Stamp | None) -> dict[str, Any] | None:
    """The filter that matches a copy only while it is still the one read (None: a copy that
    carries no stamp, which only an unconditional request can address)."""
    if stamp is None:
        return None
    version, seq = stamp
    if version:
        return {VERSION_KEY: version}
    if seq is not None:
        return {SEQ_KEY: seq}
    return None


@dataclass(frozen=True)
class Located:
    """Where existing ids are: positions per part key (ids found nowhere left out), and under
    policies other than hash of the id, the stamp of every copy found."""

    groups: dict[str, list[int]]
    stamps: dict[tuple[str, int], Stamp] = field(default_factory=dict)


class Locator:
    """Asks parts which of some ids they hold."""

    def __init__(
        self, router: Router, layouts: PartLayouts, io: PartIO, clock: HybridClock
    ) -> None:
        self._router = router
        self._layouts = layouts
        self._io = io
        self._clock = clock

    async def locate(
        self,
        state: CollectionState,
        ids: IDs,
        where: Where | None = None,
        where_document: WhereDocument | None = None,
    ) -> Located:
        """Where existing ids are (those matching ``where``, in stored terms, if given).

        Under hash of the id this is pure (every owner is named, whether it holds the id or
        not). Otherwise every part is asked, on a copy that serves reads, with the copies'
        stamps; an id may be found in two parts while a move is being finished."""
        router = self._router
        if router.ids_routed(state):
            owners, _ = router.group_placements(state, router.place_records(state, ids, None))
            return Located(owners)
        parts = await router.all_parts(state, "locate")
        body = {
            "ids": list(ids),
            "where": where,
            "where_document": where_document,
            "include": ["metadatas"],
        }

        async def look(target: Target) -> Any:
            found = await self._io.guarded(target, lambda: self._io.read(target, "/get", body))
            return found or {"ids": []}

        found, failures = await fan_out({k: functools.partial(look, t) for k, t in parts.items()})
        raise_for_failures("locate", failures)
        position = {record_id: i for i, record_id in enumerate(ids)}
        groups: dict[str, list[int]] = {}
        stamps: dict[tuple[str, int], Stamp] = {}
        for key in sorted(found):
            answer = found[key]
            metas = answer.get("metadatas") or [None] * len(answer["ids"])
            for rid, meta in zip(answer["ids"], metas, strict=True):
                i = position[rid]
                groups.setdefault(key, []).append(i)
                stamps[(key, i)] = stamp = stamp_of(meta)
                self._clock.observe(stamp[0])
        return Located({k: sorted(v) for k, v in groups.items()}, stamps)

    async def read_records(
        self, state: CollectionState, ids: IDs, sources: Mapping[int, str]
    ) -> dict[int, dict[str, Any]]:
        """Whole stored records by input position (metadata as the user sees it), each read
        from the part key ``sources`` names; a record gone meanwhile is left out."""
        by_key: dict[str, list[int]] = {}
        for pos, key in sources.items():
            by_key.setdefault(key, []).append(pos)

        async def read(key: str) -> Any:
            target = self._layouts.part_of_key(state, key)
            body = {"ids": [ids[i] for i in by_key[key]], "include": FULL}
            return await self._io.read(target, "/get", body)

        answers, failures = await fan_out({k: functools.partial(read, k) for k in by_key})
        raise_for_failures("move", failures)
        out: dict[int, dict[str, Any]] = {}
        for key, answer in answers.items():
            row = {rid: n for n, rid in enumerate(answer["ids"])}
            blank = [None] * len(row)
            columns = {c: answer.get(c) or blank for c in FULL}
            for pos in by_key[key]:
                n = row.get(ids[pos])
                if n is None:
                    continue  # deleted meanwhile: nothing to move
                record = {c: values[n] for c, values in columns.items()}
                stamp = stamp_of(record["metadatas"])
                self._clock.observe(stamp[0])
                record["stamp"] = stamp
                # Moves work in the user's terms; the sender stamps hidden keys afresh.
                record["metadatas"] = visible_metadata(record["metadatas"])
                out[pos] = record
        return out
