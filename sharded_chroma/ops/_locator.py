"""Finding where existing records are, and reading them whole (for moves and adds)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from chromadb.api.types import IDs

from .._fanout import fan_out, raise_for_failures
from ..catalog._layouts import PartLayouts, Target
from ..catalog._reserved import visible_metadata
from ..catalog._state import VERSION_KEY, CollectionState
from ._clock import HybridClock
from ._partio import PartIO
from ._router import Router

__all__ = ["FULL", "Locator", "version_of"]

FULL = ["embeddings", "metadatas", "documents", "uris"]


def version_of(metadata: Mapping[str, Any] | None) -> int:
    """A stored record's version (0 for a record written before versions existed)."""
    value = None if metadata is None else metadata.get(VERSION_KEY)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class Locator:
    """Asks parts which of some ids they hold."""

    def __init__(
        self, router: Router, layouts: PartLayouts, io: PartIO, clock: HybridClock
    ) -> None:
        self._router = router
        self._layouts = layouts
        self._io = io
        self._clock = clock

    async def locate(self, state: CollectionState, ids: IDs) -> dict[str, list[int]]:
        """Where existing ids are: positions per part key, ids found nowhere left out.

        Under hash of the id this is pure (every owner is named, whether it holds the id or
        not). Otherwise every part is asked, on a copy that serves reads; an id may be found in
        two parts while a move is being finished."""
        router = self._router
        if router.ids_routed(state):
            groups, _ = router.group_placements(state, router.place_records(state, ids, None))
            return groups
        parts = await router.all_parts(state, "locate")
        body = {"ids": list(ids), "include": []}

        async def look(target: Target) -> Any:
            found = await self._io.guarded(target, lambda: self._io.read(target, "/get", body))
            return found or {"ids": []}

        found, failures = await fan_out({k: functools.partial(look, t) for k, t in parts.items()})
        raise_for_failures("locate", failures)
        position = {record_id: i for i, record_id in enumerate(ids)}
        return {
            k: sorted(position[i] for i in r["ids"]) for k, r in sorted(found.items()) if r["ids"]
        }

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
                self._clock.observe(version_of(record["metadatas"]))
                # Moves work in the user's terms; the sender stamps hidden keys afresh.
                record["metadatas"] = visible_metadata(record["metadatas"])
                out[pos] = record
        return out
