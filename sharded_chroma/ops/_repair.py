"""Settling an id met in two parts: the newer copy is read, the older one removed.

The pure halves (``settle_get``, ``settle_query``) pick, per id met more than once, the copy
with the highest ``(version, sequence)`` and return the answers without the others. The removal
is a delete of that id *where its version is still the one read*, so a write that reached the
older copy in the meantime (it is then the newer one) is never undone; the next read settles
that case the other way round.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from .._fanout import fan_out
from ..catalog._layouts import Target
from ..catalog._state import SEQ_KEY, VERSION_KEY, CollectionState
from ._clock import HybridClock
from ._locator import stamp_of
from ._partio import PartIO, Removal

__all__ = ["Loser", "ReadRepair", "settle_get", "settle_query"]

logger = logging.getLogger("sharded_chroma.repair")

# A read removes at most this many older copies; the rest wait for the next read.
_MAX_REPAIRS = 256


@dataclass(frozen=True)
class Loser:
    """An older copy of a record: the answer (part) it came from, its id and stored keys,
    and the version of the newer copy that beat it."""

    part: int
    id: str
    version: int
    seq: int | None
    newer: int = 0


def _rank(meta: Mapping[str, Any] | None) -> tuple[int, int]:
    version, seq = stamp_of(meta)
    return (version, seq or 0)


def _settle_rows(
    rows: Sequence[tuple[int, Sequence[str], Sequence[Any] | None]],
) -> tuple[dict[int, set[int]], list[Loser]]:
    """For row lists ``(part, ids, metadatas)``: rows to drop per part, and the losers."""
    counts = Counter(chain.from_iterable(ids for _, ids, _ in rows))
    twice = {rid for rid, n in counts.items() if n > 1}
    if not twice:
        return {}, []
    best: dict[str, tuple[tuple[int, int], int, int]] = {}
    seen: list[tuple[str, tuple[int, int], int, int]] = []
    for part, ids, metas in rows:
        for r, rid in enumerate(ids):
            if rid not in twice:
                continue
            rank = _rank(None if metas is None else metas[r])
            seen.append((rid, rank, part, r))
            # Ties go to the earlier part, so every reader settles the same way.
            if rid not in best or rank > best[rid][0]:
                best[rid] = (rank, part, r)
    drop: dict[int, set[int]] = {}
    losers: list[Loser] = []
    for rid, rank, part, r in seen:
        if best[rid][1:] == (part, r):
            continue
        drop.setdefault(part, set()).add(r)
        losers.append(Loser(part, rid, rank[0], rank[1] or None, best[rid][0][0]))
    return drop, losers


def _without_rows(answer: Mapping[str, Any], rows: set[int], columns: Sequence[str]) -> Any:
    out = dict(answer)
    for c in columns:
        values = answer.get(c)
        if values is not None:
            out[c] = [v for i, v in enumerate(values) if i not in rows]
    return out


def settle_get(responses: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[Loser]]:
    """Per-part ``/get`` answers with every id kept once, at its newest copy."""
    rows = [(p, r["ids"], r.get("metadatas")) for p, r in enumerate(responses)]
    drop, losers = _settle_rows(rows)
    columns = ("ids", "embeddings", "metadatas", "documents", "uris")
    out = [_without_rows(r, drop[p], columns) if p in drop else r for p, r in enumerate(responses)]
    return out, losers


def settle_query(responses: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[Loser]]:
    """Per-part ``/query`` answers with, in each query's rows, every id kept once at its
    newest copy."""
    columns = ("ids", "distances", "embeddings", "metadatas", "documents", "uris")
    out = [dict(r) for r in responses]
    losers: list[Loser] = []
    n_queries = len(responses[0]["ids"]) if responses else 0
    for q in range(n_queries):
        rows = []
        for p, r in enumerate(responses):
            metas = r.get("metadatas")
            rows.append((p, r["ids"][q], None if metas is None else metas[q]))
        drop, found = _settle_rows(rows)
        losers.extend(found)
        for p, dropped in drop.items():
            for c in columns:
                per_query = out[p].get(c)
                if per_query is None or per_query[q] is None:
                    continue
                per_query = out[p][c] = list(per_query)
                per_query[q] = [v for i, v in enumerate(per_query[q]) if i not in dropped]
    unique = {(x.part, x.id): x for x in losers}
    return out, list(unique.values())


class ReadRepair:
    """Removes older copies that reads met, each conditionally on its version."""

    def __init__(self, io: PartIO, clock: HybridClock, repair_after: float) -> None:
        self._io = io
        self._clock = clock
        self._after_us = int(repair_after * 1_000_000)

    async def remove_older(
        self, state: CollectionState, parts: Sequence[Target], losers: Sequence[Loser]
    ) -> None:
        """Best effort: a removal that fails is logged and left to the next read or repair.
        Copies whose newer twin is younger than ``repair_after`` are left alone (a move may be
        under way); the read returned the newer one all the same."""
        for loser in losers:
            self._clock.observe(loser.newer)
        now = self._clock.reserve()
        settled = [x for x in losers if now - x.newer >= self._after_us]
        todo = settled[:_MAX_REPAIRS]

        async def remove(loser: Loser) -> Any:
            if loser.version:
                where: dict[str, Any] = {VERSION_KEY: loser.version}
            elif loser.seq is not None:
                where = {SEQ_KEY: loser.seq}
            else:
                return None  # written outside this library: nothing safe to condition on
            target = parts[loser.part]
            body = {"ids": [loser.id], "where": where}
            removes = Removal((loser.id,), loser.version) if loser.version else None
            return await self._io.write(target, "delete", body, removes=removes)

        _, failures = await fan_out(
            {f"{n}": functools.partial(remove, x) for n, x in enumerate(todo)}
        )
        for key, exc in failures.items():
            loser = todo[int(key)]
            logger.warning(
                "could not remove the older copy of %r from %s of %s: %s",
                loser.id,
                parts[loser.part].key,
                state.name,
                exc,
            )
        if todo:
            logger.info("removed %d older cop(ies) from %s", len(todo) - len(failures), state.name)
