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

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from chromadb.api.types import Documents, Embeddings, IDs, Metadatas, URIs

from .._policies import CompositePolicy, Placement
from ..catalog._layouts import PartLayouts
from ..catalog._state import CollectionState
from ..control._served import serving_policy
from ._locator import Locator, Stamp
from ._removal import Remover
from ._router import Router
from ._sender import RecordSender
from ._tombstones import Deleting, Tombstones

__all__ = ["Mover", "merged_metadata", "routing_fields"]

logger = logging.getLogger("sharded_chroma.writes")

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


def _whole(
    old: Mapping[int, dict[str, Any]],
    order: Sequence[int],
    embeddings: Embeddings | None,
    metadatas: Metadatas | None,
    documents: Documents | None,
    uris: URIs | None,
) -> tuple[list[Any], Metadatas, Documents | None, URIs | None]:
    """Records as they read after the call: the call's values over the stored ones."""
    emb = [embeddings[i] if embeddings is not None else old[i]["embeddings"] for i in order]
    meta: Metadatas = [
        merged_metadata(old[i]["metadatas"], None if metadatas is None else metadatas[i])
        for i in order
    ]
    docs = [documents[i] if documents is not None else old[i]["documents"] for i in order]
    links = [uris[i] if uris is not None else old[i]["uris"] for i in order]
    return (
        emb,
        meta,
        None if all(d is None for d in docs) else docs,
        None if all(u is None for u in links) else links,
    )


def _newest(
    keys: Sequence[str],
    position: int,
    stamps: Mapping[tuple[str, int], Stamp],
    prefer: str | None = None,
) -> str:
    """The part holding the newest located copy of a record (``prefer`` wins ties)."""

    def rank(key: str) -> tuple[int, int, bool]:
        version, seq = stamps.get((key, position), (0, None))
        return (version, seq or 0, key == prefer)

    return max(keys, key=rank)


class Mover:
    """Moves records between parts."""

    def __init__(
        self,
        router: Router,
        layouts: PartLayouts,
        locator: Locator,
        sender: RecordSender,
        remover: Remover,
        tombstones: Tombstones,
    ) -> None:
        self._router = router
        self._layouts = layouts
        self._locator = locator
        self._sender = sender
        self._remover = remover
        self._tombstones = tombstones

    async def update_moves(
        self,
        state: CollectionState,
        ids: IDs,
        found: Mapping[str, list[int]],
        metadatas: Metadatas | None,
        stamps: Mapping[tuple[str, int], Stamp],
    ) -> tuple[list[Placement | None], dict[int, list[str]], dict[int, Read]] | None:
        """For an update: the new placement of records it moves, their source parts, and the
        stored records read to decide (so ``move`` need not read them again); None when
        nothing moves. Every new placement is checked before anything is written."""
        fields = routing_fields(serving_policy(state))
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
        read_from = {i: _newest(sources[i], i, stamps) for i in touched}
        old = await self._locator.read_records(state, ids, read_from)
        placements: list[Placement | None] = [None] * len(ids)
        moves: dict[int, list[str]] = {}
        for i in touched:
            if i not in old:
                continue
            meta = merged_metadata(old[i]["metadatas"], None if metadatas is None else metadatas[i])
            place: Placement = serving_policy(state).place(ids[i], meta)
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
        stamps: Mapping[tuple[str, int], Stamp] | None = None,
        *,
        undo_if_gone: bool = False,
    ) -> set[int]:
        """Write moved records whole to their destination, then delete them at the sources;
        returns the positions handled here. A record whose copy to move went before it was
        read (another process moved or deleted it since it was located) is left out: the
        caller decides (an upsert looks for it again, see ``WritePath.upsert``).

        ``known`` holds records already read (part key, record) by position, ``stamps`` the
        stamps copies were located with, by (part key, position). With ``undo_if_gone`` (an
        update, which must not create a record) a record whose source copy changed or went
        before it was deleted here is taken back from its destination."""
        dest: dict[int, str] = {}
        for i in moves:
            where = placements[i]
            assert where is not None
            dest[i] = self._router.key_of(state, where)
        # A record in two parts (a move that did not finish, here or in another process) is
        # read from its newest copy, the destination's on a tie.
        pick = {i: _newest(keys, i, stamps or {}, dest[i]) for i, keys in moves.items()}
        have = {i: rec for i, (key, rec) in (known or {}).items() if pick.get(i) == key}
        missing = {i: k for i, k in pick.items() if i not in have}
        fetched = await self._locator.read_records(state, ids, missing) if missing else {}
        old = {**have, **fetched}
        order = [i for i in sorted(moves) if i in old]
        if not order:
            return set()
        # An update of a record whose newest copy is already where the update puts it is an
        # update there (a no-op if someone deleted it meanwhile, as on one server); only the
        # other copies go. Everything else is written whole to its new place.
        in_place = [i for i in order if undo_if_gone and pick[i] == dest[i]]
        rewrite = [i for i in order if not (undo_if_gone and pick[i] == dest[i])]
        versions: dict[int, int] = {}
        under_way: list[Deleting] = []
        if in_place:
            there: dict[str, list[int]] = {}
            for i in in_place:
                there.setdefault(dest[i], []).append(i)
            await self._sender.send(
                "update",
                state,
                ids,
                there,
                {k: self._layouts.part_of_key(state, k) for k in there},
                embeddings,
                metadatas,
                documents,
                uris,
                sequence="none",
            )
        if rewrite:
            # An update adds its copy where it saw none: if another process created the
            # record there meanwhile, the add leaves that record be (as if this update came
            # first), where an upsert would overwrite it and the undo below could then take
            # it back whole. A copy seen there (an unfinished move) is overwritten.
            adds = {i for i in rewrite if undo_if_gone and dest[i] not in moves[i]}
            versions = await self._rewrite(
                state, ids, rewrite, dest, old, embeddings, metadatas, documents, uris, adds
            )
            if undo_if_gone:
                # Looked for between writing the new copies and removing the old ones: a
                # delete whose search could miss both is still announced now.
                under_way = await self._tombstones.deleting(state, [ids[i] for i in rewrite])
        stale: dict[str, list[str]] = {}
        stale_stamps: dict[tuple[str, str], Stamp | None] = {}
        for i in order:
            for key in moves[i]:
                if key != dest[i]:
                    stale.setdefault(key, []).append(ids[i])
                    # The copy read is removed only while it is still that copy; other stale
                    # copies by the stamp they were located with.
                    read = old[i]["stamp"] if key == pick[i] else (stamps or {}).get((key, i))
                    stale_stamps[(key, ids[i])] = read
        targets = {k: replace(self._layouts.part_of_key(state, k), ids=v) for k, v in stale.items()}
        _, short = await self._remover.remove(
            targets, stale_stamps, per_id=undo_if_gone, operation="move"
        )
        if under_way:
            await self._apply(state, ids, rewrite, dest, versions, under_way)
        if not undo_if_gone or not short:
            return set(order)
        # The copy this update read went or changed since. Only if another process deleted
        # the record is the copy this update wrote taken back (an update never creates a
        # record; only while it is still the one it wrote); after a move or a rewrite the
        # record lives on, and taking the copy back could lose that writer's data.
        gone = [i for i in order if pick[i] != dest[i] and ids[i] in short.get(pick[i], ())]
        deleted = await self._tombstones.deleted_after(
            state, [ids[i] for i in gone], [old[i]["stamp"][0] for i in gone]
        )
        undo: dict[str, list[str]] = {}
        for i in gone:
            if ids[i] in deleted:
                undo.setdefault(dest[i], []).append(ids[i])
        if undo:
            n = sum(len(v) for v in undo.values())
            logger.info("update of %d record(s) of %s met a concurrent change", n, state.name)
            back = {k: replace(self._layouts.part_of_key(state, k), ids=v) for k, v in undo.items()}
            written = {ids[i]: versions.get(i, 0) for i in gone}
            mine = {(k, rid): (written[rid], None) for k, v in undo.items() for rid in v}
            await self._remover.remove(back, mine, operation="move")
        return set(order)

    async def _apply(
        self,
        state: CollectionState,
        ids: IDs,
        moved: Sequence[int],
        dest: Mapping[int, str],
        versions: Mapping[int, int],
        deletes: Sequence[Deleting],
    ) -> None:
        """Apply deletes under way elsewhere to the copies this update just wrote, each copy
        only while it is still the one written (the update is ordered before them)."""
        for d in deletes:
            hit: dict[str, list[str]] = {}
            for i in moved:
                if d.covers(ids[i]):
                    hit.setdefault(dest[i], []).append(ids[i])
            if not hit:
                continue
            n = sum(len(v) for v in hit.values())
            logger.info("update of %d record(s) of %s met a delete under way", n, state.name)
            back = {k: replace(self._layouts.part_of_key(state, k), ids=v) for k, v in hit.items()}
            written = {ids[i]: versions[i] for i in moved}
            mine = {(k, rid): (written[rid], None) for k, v in hit.items() for rid in v}
            await self._remover.remove(
                back, mine, where=d.where, where_document=d.where_document, operation="move"
            )

    async def _rewrite(
        self,
        state: CollectionState,
        ids: IDs,
        order: Sequence[int],
        dest: Mapping[int, str],
        old: Mapping[int, dict[str, Any]],
        embeddings: Embeddings | None,
        metadatas: Metadatas | None,
        documents: Documents | None,
        uris: URIs | None,
        adds: frozenset[int] | set[int] = frozenset(),
    ) -> dict[int, int]:
        """Write records whole to their destinations (fresh sequence values: a moved record
        sorts last), those in ``adds`` as adds; returns the version written per position."""
        emb, meta, docs, links = _whole(old, order, embeddings, metadatas, documents, uris)
        versions: dict[int, int] = {}
        for op in ("add", "upsert"):
            chosen = [n for n, i in enumerate(order) if (i in adds) == (op == "add")]
            if not chosen:
                continue
            groups: dict[str, list[int]] = {}
            for n in chosen:
                groups.setdefault(dest[order[n]], []).append(n)
            parts = {k: self._layouts.part_of_key(state, k) for k in groups}
            version = await self._sender.send(
                op,
                state,
                [ids[i] for i in order],
                groups,
                parts,
                emb,
                meta,
                docs,
                links,
                sequence="all",
            )
            versions.update({order[n]: version for n in chosen})
        return versions
