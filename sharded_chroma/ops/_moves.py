"""Moving records whose routing value changed (an upsert or update under a non-id policy).

A move writes the whole record, as it will read after the call, to its new part first and only
then deletes it from the old one, so it is never in neither. If the delete fails the record is
briefly in both: reads return the newer version (the moved copy's) and remove the older one,
the call raises, and repeating it finishes the move.

A moved record takes a new place at the end of get() order, as if deleted and added again (one
server would keep its place). Keeping its old sequence value would put it out of order in its
new part's stored order, and get() with limit/offset relies on each part storing records in
sequence order, because Chroma has no "order by" to ask for.

The caller holds the ordering stripes of every id involved (see ``WritePath``), so nothing of
this process writes those ids between the read and the delete.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from chromadb.api.types import Documents, Embeddings, IDs, Metadatas, URIs

from .._fanout import fan_out, raise_for_failures
from .._policies import CompositePolicy, Placement
from ..catalog._layouts import PartLayouts
from ..catalog._state import CollectionState
from ._locator import Locator
from ._partio import PartIO
from ._router import Router
from ._sender import RecordSender

__all__ = ["Mover", "merged_metadata", "routing_fields"]

Read = tuple[str, dict[str, Any]]
"""A stored record and the part key it was read from."""


def routing_fields(policy: Any) -> frozenset[str]:
    """Metadata fields whose change can move a record under ``policy``."""
    fields = {getattr(policy, "field", None)}
    if isinstance(policy, CompositePolicy):
        fields.add(policy.hash_key)
    return frozenset(f for f in fields if f is not None)


def merged_metadata(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metadata after an update on one server: keys merged, a None value removes the key."""
    out = dict(old or {})
    for key, value in (new or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


class Mover:
    """Moves records between parts."""

    def __init__(
        self,
        router: Router,
        layouts: PartLayouts,
        locator: Locator,
        sender: RecordSender,
        io: PartIO,
    ) -> None:
        self._router = router
        self._layouts = layouts
        self._locator = locator
        self._sender = sender
        self._io = io

    async def update_moves(
        self,
        state: CollectionState,
        ids: IDs,
        found: Mapping[str, list[int]],
        metadatas: Metadatas | None,
    ) -> tuple[list[Placement | None], dict[int, list[str]], dict[int, Read]] | None:
        """For an update: the new placement of records it moves, their source parts, and the
        stored records read to decide (so ``move`` need not read them again); None when
        nothing moves. Every new placement is checked before anything is written."""
        fields = routing_fields(state.policy)
        sources: dict[int, list[str]] = {}
        for key, pos in found.items():
            for i in pos:
                sources.setdefault(i, []).append(key)
        touched = [
            i
            for i in sources
            if len(sources[i]) > 1
            or (metadatas is not None and fields & set((metadatas[i] or {}).keys()))
        ]
        if not touched:
            return None
        read_from = {i: sources[i][0] for i in touched}
        old = await self._locator.read_records(state, ids, read_from)
        placements: list[Placement | None] = [None] * len(ids)
        moves: dict[int, list[str]] = {}
        for i in touched:
            if i not in old:
                continue
            meta = merged_metadata(old[i]["metadatas"], None if metadatas is None else metadatas[i])
            place: Placement = state.policy.place(ids[i], meta)
            placements[i] = place
            if sources[i] != [self._router.key_of(state, place)]:
                moves[i] = sources[i]
        return placements, moves, {i: (read_from[i], old[i]) for i in old}

    async def move(
        self,
        state: CollectionState,
        ids: IDs,
        moves: Mapping[int, Sequence[str]],
        placements: Sequence[Placement | None],
        embeddings: Embeddings | None,
        metadatas: Metadatas | None,
        documents: Documents | None,
        uris: URIs | None,
        known: Mapping[int, Read] | None = None,
    ) -> None:
        """Write moved records whole to their destination, then delete them at the sources.
        ``known`` holds records already read (part key, record) by position."""
        dest: dict[int, str] = {}
        for i in moves:
            where = placements[i]
            assert where is not None
            dest[i] = self._router.key_of(state, where)
        # A record already at its destination (an earlier move that did not finish) is read
        # from there: that copy is the newer one.
        pick = {i: (dest[i] if dest[i] in keys else keys[0]) for i, keys in moves.items()}
        have = {i: rec for i, (key, rec) in (known or {}).items() if pick.get(i) == key}
        missing = {i: k for i, k in pick.items() if i not in have}
        fetched = await self._locator.read_records(state, ids, missing) if missing else {}
        old = {**have, **fetched}
        order = [i for i in sorted(moves) if i in old]
        if not order:
            return
        new_ids = [ids[i] for i in order]
        new_emb = [embeddings[i] if embeddings is not None else old[i]["embeddings"] for i in order]
        new_meta: Metadatas = [
            merged_metadata(old[i]["metadatas"], None if metadatas is None else metadatas[i])
            for i in order
        ]
        new_docs = [documents[i] if documents is not None else old[i]["documents"] for i in order]
        new_uris = [uris[i] if uris is not None else old[i]["uris"] for i in order]
        groups: dict[str, list[int]] = {}
        for n, i in enumerate(order):
            groups.setdefault(dest[i], []).append(n)
        parts = {k: self._layouts.part_of_key(state, k) for k in groups}
        await self._sender.send(
            "upsert",
            state,
            new_ids,
            groups,
            parts,
            new_emb,
            new_meta,
            None if all(d is None for d in new_docs) else new_docs,
            None if all(u is None for u in new_uris) else new_uris,
            sequence="all",
        )
        stale: dict[str, list[str]] = {}
        for i in order:
            for key in moves[i]:
                if key != dest[i]:
                    stale.setdefault(key, []).append(ids[i])

        async def remove(key: str) -> Any:
            target = self._layouts.part_of_key(state, key)
            return await self._io.write(target, "delete", {"ids": stale[key]})

        _, failures = await fan_out({k: functools.partial(remove, k) for k in stale})
        raise_for_failures("move", failures, unwritten_ids=stale)
