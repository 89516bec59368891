"""Record writes across shards: validated once, split by owner, sent to every copy."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from uuid import UUID

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

from ._backend import CollectionState, reject_reserved
from ._fanout import fan_out, raise_for_failures
from ._moves import MoveOps
from ._parts import Target
from ._reads import check_where

__all__ = ["RecordOps"]


def _check_metadatas(metadatas: Metadatas | None) -> None:
    for meta in metadatas or ():
        reject_reserved(meta or {}, "metadata")


def _moving(found: Mapping[str, list[int]], dest: Mapping[str, list[int]]) -> dict[int, list[str]]:
    """Positions found in a part other than their destination: position -> source part keys."""
    where_to = {i: k for k, pos in dest.items() for i in pos}
    sources: dict[int, list[str]] = {}
    for key, pos in found.items():
        for i in pos:
            sources.setdefault(i, []).append(key)
    return {i: keys for i, keys in sources.items() if keys != [where_to.get(i)]}


def _without(groups: Mapping[str, list[int]], gone: Mapping[int, Any]) -> dict[str, list[int]]:
    out = {k: [i for i in pos if i not in gone] for k, pos in groups.items()}
    return {k: pos for k, pos in out.items() if pos}


class RecordOps(MoveOps):
    """Data-plane methods with the signatures chromadb's AsyncCollection calls."""

    async def _prepare_write(
        self,
        collection_id: UUID,
        ids: IDs,
        embeddings: Embeddings | None,
        metadatas: Metadatas | None,
        documents: Documents | None,
        uris: URIs | None,
        tenant: str,
        database: str,
    ) -> CollectionState:
        state = await self.state(collection_id, tenant, database)
        validate_batch(
            (ids, embeddings, metadatas, documents, uris),
            {"max_batch_size": await self._batch_limit()},
        )
        _check_metadatas(metadatas)
        if embeddings is not None and len(embeddings):
            await self._refresh_dimension(state)
        self._check_embeddings(state, embeddings)
        return state

    async def _add(
        self,
        ids: IDs,
        collection_id: UUID,
        embeddings: Embeddings,
        metadatas: Metadatas | None = None,
        documents: Documents | None = None,
        uris: URIs | None = None,
        tenant: str = "default_tenant",
        database: str = "default_database",
    ) -> bool:
        state = await self._prepare_write(
            collection_id, ids, embeddings, metadatas, documents, uris, tenant, database
        )
        groups, parts = self.group_placements(state, self.place_records(state, ids, metadatas))
        await self._write(
            "add", state, ids, groups, parts, embeddings, metadatas, documents, uris, sequence="all"
        )
        return True

    async def _upsert(
        self,
        collection_id: UUID,
        ids: IDs,
        embeddings: Embeddings,
        metadatas: Metadatas | None = None,
        documents: Documents | None = None,
        uris: URIs | None = None,
        tenant: str = "default_tenant",
        database: str = "default_database",
    ) -> bool:
        state = await self._prepare_write(
            collection_id, ids, embeddings, metadatas, documents, uris, tenant, database
        )
        placements = self.place_records(state, ids, metadatas)
        groups, parts = self.group_placements(state, placements)
        known: set[int] | None = None
        if not self.ids_routed(state):
            # A record may live anywhere its routing value sent it: every part must answer
            # before anything is written, and records whose value changed are moved.
            found = await self._locate(state, ids)
            known = {i for pos in found.values() for i in pos}
            moving = _moving(found, groups)
            if moving:
                await self._move(
                    state, ids, moving, placements, embeddings, metadatas, documents, uris
                )
                groups = _without(groups, moving)
        await self._write(
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
        return True

    async def _update(
        self,
        collection_id: UUID,
        ids: IDs,
        embeddings: Embeddings | None = None,
        metadatas: Metadatas | None = None,
        documents: Documents | None = None,
        uris: URIs | None = None,
        tenant: str = "default_tenant",
        database: str = "default_database",
    ) -> bool:
        state = await self._prepare_write(
            collection_id, ids, embeddings, metadatas, documents, uris, tenant, database
        )
        groups = await self._locate(state, ids)
        parts = {k: self._part_of_key(state, k) for k in groups}
        if not self.ids_routed(state):
            moving = await self._update_moves(state, ids, groups, metadatas)
            if moving and moving[1]:
                placements, moves, known = moving
                await self._move(
                    state, ids, moves, placements, embeddings, metadatas, documents, uris, known
                )
                groups = _without(groups, moves)
        if groups:
            await self._write(
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
        return True

    async def _delete(
        self,
        collection_id: UUID,
        ids: IDs | None = None,
        where: Where | None = None,
        where_document: WhereDocument | None = None,
        limit: int | None = None,
        tenant: str = "default_tenant",
        database: str = "default_database",
    ) -> DeleteResult:
        state = await self.state(collection_id, tenant, database)
        check_where(where)
        if limit is not None:
            # "Delete n in total": pick the first n matches in the cluster's order.
            picked = await self._get(
                collection_id, ids, where, limit, None, where_document, [], tenant, database
            )
            if not picked["ids"]:
                return DeleteResult(deleted=0)
            ids, where, where_document = picked["ids"], None, None
        targets: dict[str, Target]
        if ids is not None:
            groups = await self._locate(state, ids)
            targets = {
                k: replace(self._part_of_key(state, k), ids=[ids[i] for i in pos])
                for k, pos in groups.items()
            }
        else:
            plan = await self.plan(state, None, where)
            raise_for_failures("delete", plan.failed)
            targets = plan.targets
        if not targets:
            return DeleteResult(deleted=0)

        async def delete(target: Target) -> int:
            body = {"ids": target.ids, "where": where, "where_document": where_document}
            resp = await self._write_to(target.shard, target.state, "delete", body)
            return int(resp.get("deleted", 0)) if isinstance(resp, dict) else 0

        results, failures = await fan_out(
            {k: functools.partial(delete, t) for k, t in targets.items()}
        )
        raise_for_failures(
            "delete",
            failures,
            unwritten_ids={k: list(targets[k].ids or ()) for k in failures},
            all_failed=len(failures) == len(targets),
        )
        return DeleteResult(deleted=sum(results.values()))
