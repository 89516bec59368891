"""The write path: every record write of the cluster, validated once, ordered per id, routed.

Per-id ordering has one owner, this component. Every write of an id holds that id's ordering
stripe (``IdOrdering``) from its first read (locating the id, reading a record to move) to its
last request, across tasks and threads of the process, so a move, an add, an update and a
delete of one id never interleave. Across processes, records carry a version (the hybrid clock
of their last write) and reads settle an id met twice by keeping the newer (see ``Reader``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from chromadb.api.types import (
    DeleteResult,
    Documents,
    Embeddings,
    IDs,
    Metadatas,
    URIs,
    Where,
    WhereDocument,
    validate_batch,
)

from .._fanout import raise_for_failures
from .._policies import TimePolicy
from ..catalog._layouts import PartLayouts, Target
from ..catalog._reserved import escape_where
from ..catalog._state import CollectionState
from ..cluster._cluster import Cluster
from ..control._served import served_map
from ._checks import check_embeddings
from ._locator import Locator
from ._moves import Mover
from ._ordering import IdOrdering
from ._reader import Reader
from ._removal import Remover
from ._router import Router
from ._sender import RecordSender
from ._tombstones import Tombstones

__all__ = ["WritePath"]

logger = logging.getLogger("sharded_chroma.writes")

# A delete by id looks again for ids whose copy changed under it at most this often.
_DELETE_ROUNDS = 8
# An upsert looks again for records whose copy went before its move could read it at most
# this often.
_MOVE_ROUNDS = 8


def _moving(found: Mapping[str, list[int]], dest: Mapping[str, list[int]]) -> dict[int, list[str]]:
    """Positions found in a part other than their destination: position -> source part keys."""
    where_to = {i: k for k, pos in dest.items() for i in pos}
    sources: dict[int, list[str]] = {}
    for key, pos in found.items():
        for i in pos:
            sources.setdefault(i, []).append(key)
    return {i: keys for i, keys in sources.items() if keys != [where_to.get(i)]}


def _without(groups: Mapping[str, list[int]], gone: Any) -> dict[str, list[int]]:
    out = {k: [i for i in pos if i not in gone] for k, pos in groups.items()}
    return {k: pos for k, pos in out.items() if pos}


class WritePath:
    """add, upsert, update and delete across parts."""

    def __init__(
        self,
        cluster: Cluster,
        router: Router,
        layouts: PartLayouts,
        locator: Locator,
        sender: RecordSender,
        mover: Mover,
        remover: Remover,
        tombstones: Tombstones,
        reader: Reader,
        ordering: IdOrdering,
    ) -> None:
        self._cluster = cluster
        self._router = router
        self._layouts = layouts
        self._locator = locator
        self._sender = sender
        self._mover = mover
        self._remover = remover
        self._tombstones = tombstones
        self._reader = reader
        self._ordering = ordering

    async def _prepare(
        self,
        state: CollectionState,
        ids: IDs,
        embeddings: Embeddings | None,
        metadatas: Metadatas | None,
        documents: Documents | None,
        uris: URIs | None,
    ) -> None:
        validate_batch(
            (ids, embeddings, metadatas, documents, uris),
            {"max_batch_size": await self._cluster.batch_limit()},
        )
        if embeddings is not None and len(embeddings) and state.dimension is None:
            # Another process may have fixed the dimension since this handle was fetched.
            stored = await self._layouts.stored_dimension(state)
            if stored is not None:
                state.dimension = stored
        check_embeddings(state.dimension, embeddings)

    async def add(
        self,
        state: CollectionState,
        ids: IDs,
        embeddings: Embeddings,
        metadatas: Metadatas | None,
        documents: Documents | None,
        uris: URIs | None,
    ) -> None:
        """Add records; an id that exists anywhere in the collection is left as it is, as one
        server leaves it."""
        await self._prepare(state, ids, embeddings, metadatas, documents, uris)
        router = self._router
        groups, parts = router.group_placements(state, router.place_records(state, ids, metadatas))
        async with self._ordering.hold(state.id, ids):
            if not router.ids_routed(state):
                # Under hash of the id the owner itself ignores an existing id; elsewhere the
                # id may live in another part than this add would put it.
                found = await self._locator.locate(state, ids)
                groups = _without(groups, {i for pos in found.groups.values() for i in pos})
            if groups:
                await self._sender.send(
                    "add",
                    state,
                    ids,
                    groups,
                    parts,
                    embeddings,
                    metadatas,
                    documents,
                    uris,
                    sequence="all",
                )

    async def upsert(
        self,
        state: CollectionState,
        ids: IDs,
        embeddings: Embeddings,
        metadatas: Metadatas | None,
        documents: Documents | None,
        uris: URIs | None,
    ) -> None:
        await self._prepare(state, ids, embeddings, metadatas, documents, uris)
        router = self._router
        placements = router.place_records(state, ids, metadatas)
        groups, parts = router.group_placements(state, placements)
        async with self._ordering.hold(state.id, ids):
            known: dict[int, int | None] | None = None
            if not router.ids_routed(state):
                # A record may live anywhere its routing value sent it: every part must answer
                # before anything is written, and records whose value changed are moved. A
                # record whose copy went between the look and the move's read (another process
                # moved it, or deleted it, possibly by a move applying a delete under way) is
                # looked for again, and written where it belongs if found nowhere: dropping it
                # from the write would lose this acknowledged upsert.
                moved: set[int] = set()
                for _ in range(_MOVE_ROUNDS):
                    found = await self._locator.locate(state, ids)
                    known = {
                        i: found.stamps.get((key, i), (0, None))[1]
                        for key, pos in found.groups.items()
                        for i in pos
                    }
                    moving = {
                        i: keys
                        for i, keys in _moving(found.groups, groups).items()
                        if i not in moved
                    }
                    if not moving:
                        break
                    done = await self._mover.move(
                        state,
                        ids,
                        moving,
                        placements,
                        embeddings,
                        metadatas,
                        documents,
                        uris,
                        stamps=found.stamps,
                    )
                    moved |= done
                    if done >= moving.keys():
                        break
                else:
                    logger.warning(
                        "upsert into %s kept missing records that moved under it; writing them "
                        "where they belong after %d rounds",
                        state.name,
                        _MOVE_ROUNDS,
                    )
                groups = _without(groups, moved)
            await self._sender.send(
                "upsert",
                state,
                ids,
                groups,
                parts,
                embeddings,
                metadatas,
                documents,
                uris,
                sequence="new",
                existing=known,
            )

    async def update(
        self,
        state: CollectionState,
        ids: IDs,
        embeddings: Embeddings | None,
        metadatas: Metadatas | None,
        documents: Documents | None,
        uris: URIs | None,
    ) -> None:
        await self._prepare(state, ids, embeddings, metadatas, documents, uris)
        async with self._ordering.hold(state.id, ids):
            found = await self._locator.locate(state, ids)
            groups = found.groups
            parts = {k: self._layouts.part_of_key(state, k) for k in groups}
            if not self._router.ids_routed(state):
                moving = await self._mover.update_moves(state, ids, groups, metadatas, found.stamps)
                if moving and moving[1]:
                    placements, moves, known = moving
                    await self._mover.move(
                        state,
                        ids,
                        moves,
                        placements,
                        embeddings,
                        metadatas,
                        documents,
                        uris,
                        known,
                        found.stamps,
                        undo_if_gone=True,
                    )
                    groups = _without(groups, moves)
            if groups:
                await self._sender.send(
                    "update",
                    state,
                    ids,
                    groups,
                    parts,
                    embeddings,
                    metadatas,
                    documents,
                    uris,
                    sequence="none",
                )

    async def delete(
        self,
        state: CollectionState,
        ids: IDs | None,
        where: Where | None,
        where_document: WhereDocument | None,
        limit: int | None,
    ) -> DeleteResult:
        if limit is not None:
            # "Delete n in total": pick the first n matches in the cluster's order.
            picked = await self._reader.get(
                state, ids, where, limit, None, where_document, [], "raise"
            )
            if not picked["ids"]:
                return DeleteResult(deleted=0)
            ids, where, where_document = picked["ids"], None, None
        stored_where = escape_where(where)
        if self._router.ids_routed(state):
            return await self._delete(state, ids, where, stored_where, where_document)
        # Records can move between parts: the delete is announced while it runs, so a move
        # that slips past its part-by-part search applies it (see ``Tombstones``).
        rows = await self._tombstones.begin(state, ids, stored_where, where_document)
        try:
            return await self._delete(state, ids, where, stored_where, where_document)
        finally:
            await self._tombstones.end(state, rows)

    async def _delete(
        self,
        state: CollectionState,
        ids: IDs | None,
        where: Where | None,
        stored_where: Where | None,
        where_document: WhereDocument | None,
    ) -> DeleteResult:
        if ids is None:
            plan = await self._router.plan(state, None, where)
            raise_for_failures("delete", plan.failed)
            targets = {k: replace(t, ids=None) for k, t in plan.targets.items()}
            deleted, _ = await self._remover.remove(
                targets, {}, where=stored_where, where_document=where_document
            )
            served = served_map(state)
            nxt = None if served is None else served.mirror_policy()
            # (Time buckets are mirrored bucket by bucket, by the part I/O.)
            if nxt is not None and not isinstance(nxt, TimePolicy):
                # The next policy's other shards hold copies the filter may match too; what
                # they delete are copies, so it is not counted again.
                extra = {
                    s: Target(s, state)
                    for s in self._router.shard_names
                    if s in nxt.shards_named() and s not in targets
                }
                if extra:
                    await self._remover.remove(
                        extra, {}, where=stored_where, where_document=where_document
                    )
            return DeleteResult(deleted=deleted)
        async with self._ordering.hold(state.id, ids):
            return DeleteResult(
                deleted=await self._delete_ids(state, ids, stored_where, where_document)
            )

    async def _delete_ids(
        self,
        state: CollectionState,
        ids: IDs,
        where: Where | None,
        where_document: WhereDocument | None,
    ) -> int:
        """Delete ids wherever they are. Under policies that can move records, each copy is
        deleted only while it is the one located, and ids whose copy changed meanwhile (another
        process moved or rewrote it) are looked for again, so a delete is never undone by a
        move that was under way when it started."""
        deleted = 0
        todo = list(ids)
        for _ in range(_DELETE_ROUNDS):
            found = await self._locator.locate(state, todo, where, where_document)
            if found.stamps:
                # Marked before any copy goes, so a move under way elsewhere that finds its
                # source gone knows it was deleted (see ``Tombstones``).
                located = sorted({todo[i] for pos in found.groups.values() for i in pos})
                await self._tombstones.mark(state, located)
            targets = {
                k: replace(self._layouts.part_of_key(state, k), ids=[todo[i] for i in pos])
                for k, pos in found.groups.items()
            }
            stamps = {(k, todo[i]): stamp for (k, i), stamp in found.stamps.items()}
            n, short = await self._remover.remove(
                targets, stamps, where=where, where_document=where_document
            )
            deleted += n
            again = sorted({rid for rids in short.values() for rid in rids})
            if not again:
                return deleted
            todo = again
        logger.warning(
            "delete of %d id(s) of %s kept meeting concurrent changes; giving up after %d rounds",
            len(todo),
            state.name,
            _DELETE_ROUNDS,
        )
        return deleted
