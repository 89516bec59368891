"""Record writes across shards: validated once, split by owner, sent to every copy."""

from __future__ import annotations

import base64
import functools
from collections.abc import Mapping, Sequence
from typing import Any, Literal
from uuid import UUID

import numpy as np
import orjson
from chromadb.api.types import (
    DeleteResult,
    Documents,
    Embeddings,
    IDs,
    Metadatas,
    URIs,
    Where,
    WhereDocument,
    serialize_metadata,
    validate_batch,
)

from ._backend import SEQ_KEY, CollectionState, reject_reserved
from ._fanout import fan_out, raise_for_failures
from ._options import current_options
from ._reads import ReadOps, check_where
from ._replicas import HintTarget, Node

__all__ = ["RecordOps"]


def _check_metadatas(metadatas: Metadatas | None) -> None:
    for meta in metadatas or ():
        reject_reserved(meta or {}, "metadata")


def _b64(matrix: np.ndarray[Any, Any]) -> list[str]:
    """Chroma's base64 wire form: little-endian float32 per vector."""
    data = np.ascontiguousarray(matrix, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in data]


class RecordOps(ReadOps):
    """Data-plane methods with the signatures chromadb's AsyncCollection calls."""

    async def _refresh_dimension(self, state: CollectionState) -> None:
        """Learn the cluster's dimension from the shards while this client has not seen it:
        another process may have fixed it since this handle was fetched."""
        if state.dimension is not None:
            return

        async def model(node: Node) -> Any:
            await self.node_path(state, node)
            return await node.transport.request(
                "GET", f"{state.base}/by-id/{state.physical[node.url]}"
            )

        # Shards that cannot answer now are left out: a write routed to live shards must not
        # fail because another shard is down.
        answers, _ = await fan_out(
            {n: functools.partial(self.shards[n].read, model) for n in self.shard_names}
        )
        models = answers
        dims = {int(m["dimension"]) for m in models.values() if m.get("dimension") is not None}
        if dims:
            state.dimension = min(dims) if len(dims) == 1 else None

    async def _write_to(self, shard: str, state: CollectionState, op: str, body: Any) -> Any:
        """Send a write to every copy of a shard under the call's write concern."""
        content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        target = HintTarget(state.tenant, state.database, str(state.id), state.name, op)
        concern = current_options().write_concern or self.replication.write_concern
        return await self.shards[shard].write(
            lambda node: self.node_path(state, node, f"/{op}"), content, target, concern
        )

    # -- writes -----------------------------------------------------------------------------

    async def _write(
        self,
        op: str,
        state: CollectionState,
        ids: IDs,
        groups: Mapping[str, list[int]],
        embeddings: Embeddings | None,
        metadatas: Metadatas | None,
        documents: Documents | None,
        uris: URIs | None,
        *,
        sequence: Literal["all", "new", "none"],
        existing: set[int] | None = None,
    ) -> None:
        """Send each shard its records, shards concurrently, each shard's chunks in order.

        ``sequence`` says which records get a fresh hidden sequence value: all (add), only
        those not stored yet (upsert: an existing record keeps its place in get() order, as
        on one server, where an upsert merges metadata into the stored record), or none.
        For ``"new"`` each shard is asked which of its ids it holds, unless ``existing`` (input
        positions) is known already; a shard that cannot answer fails like its write would.
        """
        max_batch = await self._batch_limit()
        matrix = None if embeddings is None else np.asarray(embeddings)
        base = self.clock.reserve(len(ids)) if sequence != "none" else 0

        def column(values: Sequence[Any] | None, pos: list[int]) -> list[Any] | None:
            return None if values is None else [values[i] for i in pos]

        def meta(i: int, fresh: bool) -> Any:
            user = metadatas[i] if metadatas is not None else None
            return {**(user or {}), SEQ_KEY: base + i} if fresh else user

        async def send(shard: str) -> None:
            if sequence == "none":
                await send_unlocked(shard)
                return
            # Sequenced writes from this client reach each shard in sequence order: the lock
            # is FIFO and each shard task is queued right after the sequence was reserved, so
            # a shard stores this client's records in the order get() will merge them.
            async with self._write_lock(state, shard):
                await send_unlocked(shard)

        async def send_unlocked(shard: str) -> None:
            pos = groups[shard]
            if sequence == "new" and existing is None:
                found = await self._read_from(
                    shard, state, "/get", {"ids": [ids[i] for i in pos], "include": []}
                )
                present = set(found["ids"])
                fresh = [ids[i] not in present for i in pos]
            else:
                fresh = [
                    sequence == "all" or (sequence == "new" and i not in (existing or ()))
                    for i in pos
                ]
            metas = None
            if sequence != "none" or metadatas is not None:
                metas = [serialize_metadata(meta(i, f)) for i, f in zip(pos, fresh, strict=True)]
            supports_b64 = bool((await self.preflight(shard)).get("supports_base64_encoding"))
            step = max_batch if max_batch > 0 else len(pos)
            for start in range(0, len(pos), step):
                chunk = pos[start : start + step]
                emb: Any = None
                if matrix is not None:
                    rows = matrix[chunk]
                    emb = _b64(rows) if supports_b64 else rows.tolist()
                body = {
                    "ids": [ids[i] for i in chunk],
                    "embeddings": emb,
                    "metadatas": None if metas is None else metas[start : start + step],
                    "documents": column(documents, chunk),
                    "uris": column(uris, chunk),
                }
                await self._write_to(shard, state, op, body)

        _, failures = await fan_out({shard: functools.partial(send, shard) for shard in groups})
        raise_for_failures(
            op,
            failures,
            unwritten_ids={s: [ids[i] for i in groups[s]] for s in failures},
            all_failed=len(failures) == len(groups),
        )
        if embeddings is not None and len(embeddings) and state.dimension is None:
            state.dimension = len(embeddings[0])

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
        groups = self._group(state, self._routing_values(state, ids, metadatas))
        await self._write(
            "add", state, ids, groups, embeddings, metadatas, documents, uris, sequence="all"
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
        groups = self._group(state, self._routing_values(state, ids, metadatas))
        known: set[int] | None = None
        if state.routing_key is not None:
            # Under a metadata routing key a record may live on any shard: every shard must
            # answer before anything is written.
            existing = await self._locate(state, ids)
            known = {i for pos in existing.values() for i in pos}
            for shard, pos in existing.items():
                moved = [ids[i] for i in pos if i not in set(groups.get(shard, ()))]
                if moved:
                    raise ValueError(
                        f"upsert would move {moved[:5]} to another shard by changing the routing "
                        f"key {state.routing_key!r}; moving records is not supported yet, "
                        "nothing was written"
                    )
        await self._write(
            "upsert",
            state,
            ids,
            groups,
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
        if state.routing_key is not None and metadatas is not None:
            for i, meta in enumerate(metadatas):
                if meta is not None and state.routing_key in meta:
                    raise ValueError(
                        f"update of {ids[i]!r} changes the routing key {state.routing_key!r}; "
                        "moving records is not supported yet, nothing was written"
                    )
        if groups:
            await self._write(
                "update",
                state,
                ids,
                groups,
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
        if ids is not None:
            groups = await self._locate(state, ids)
            targets = {s: [ids[i] for i in pos] for s, pos in groups.items()}
        else:
            targets = {s: None for s in self.shard_names}  # type: ignore[misc]
        if not targets:
            return DeleteResult(deleted=0)

        async def delete(shard: str) -> int:
            body = {"ids": targets[shard], "where": where, "where_document": where_document}
            resp = await self._write_to(shard, state, "delete", body)
            return int(resp.get("deleted", 0)) if isinstance(resp, dict) else 0

        results, failures = await fan_out({s: functools.partial(delete, s) for s in targets})
        raise_for_failures(
            "delete",
            failures,
            unwritten_ids={s: list(targets[s] or ()) for s in failures},
            all_failed=len(failures) == len(targets),
        )
        return DeleteResult(deleted=sum(results.values()))
