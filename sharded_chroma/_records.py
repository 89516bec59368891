"""Record operations across shards: writes split by owner, reads fanned out and merged."""

from __future__ import annotations

import base64
import functools
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal
from uuid import UUID

import numpy as np
import orjson
from chromadb.api.types import (
    DeleteResult,
    Documents,
    Embeddings,
    GetResult,
    IDs,
    Include,
    Metadatas,
    QueryResult,
    URIs,
    Where,
    WhereDocument,
    serialize_metadata,
    validate_batch,
)
from chromadb.errors import InvalidArgumentError

from ._backend import RESERVED_PREFIX, SEQ_KEY, BackendCore, CollectionState
from ._fanout import Coverage, OnShardError, fan_out, raise_for_failures
from ._merge import merge_get, merge_query, strip_seq
from ._options import current_options
from ._replicas import HintTarget, Node

__all__ = ["RecordOps"]

_Row = dict[str, Any]


def _check_where(where: Any, what: str = "where") -> None:
    """Reserved keys are invisible: filtering on them is refused like an unknown operator."""
    if isinstance(where, Mapping):
        for key, value in where.items():
            if isinstance(key, str) and key.startswith(RESERVED_PREFIX):
                raise ValueError(
                    f"{what} filter key {key!r} uses the prefix {RESERVED_PREFIX!r}, "
                    "which sharded_chroma reserves"
                )
            _check_where(value, what)
    elif isinstance(where, list):
        for item in where:
            _check_where(item, what)


def _check_metadatas(metadatas: Metadatas | None) -> None:
    for meta in metadatas or ():
        for key in meta or {}:
            if key.startswith(RESERVED_PREFIX):
                raise ValueError(
                    f"metadata key {key!r} uses the prefix {RESERVED_PREFIX!r}, "
                    "which sharded_chroma reserves"
                )


def _b64(matrix: np.ndarray[Any, Any]) -> list[str]:
    """Chroma's base64 wire form: little-endian float32 per vector."""
    data = np.ascontiguousarray(matrix, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in data]


def _dimension_error(expected: int, got: int) -> InvalidArgumentError:
    # Same text as a Chroma server's, so the error reads the same whichever shard it came from.
    return InvalidArgumentError(
        f"Collection expecting embedding with dimension of {expected}, got {got}"
    )


class RecordOps(BackendCore):
    """Data-plane methods with the signatures chromadb's AsyncCollection calls."""

    # -- routing ----------------------------------------------------------------------------

    def _routing_values(
        self, state: CollectionState, ids: IDs, metadatas: Metadatas | None
    ) -> list[str]:
        field = state.routing_key
        if field is None:
            return list(ids)
        values = []
        for i, record_id in enumerate(ids):
            meta = metadatas[i] if metadatas is not None else None
            value = None if meta is None else meta.get(field)
            if value is None or isinstance(value, (list, dict)):
                raise ValueError(
                    f"record {record_id!r} needs a scalar metadata value for the routing key "
                    f"{field!r}; nothing was written"
                )
            values.append(str(value))
        return values

    def _group(self, state: CollectionState, keys: Sequence[str]) -> dict[str, list[int]]:
        groups = state.slot_table.group_by_shard(keys)
        return {self.shard_names[s]: pos for s, pos in sorted(groups.items())}

    async def _locate(self, state: CollectionState, ids: IDs) -> dict[str, list[int]]:
        """Owners of existing ids. Under hash-of-id this is pure; under a metadata routing key
        the shards are asked, and ids found nowhere are left out."""
        if state.routing_key is None:
            return self._group(state, ids)

        async def look(_shard: str, node: Node) -> Any:
            return await node.transport.request(
                "POST",
                await self.node_path(state, node, "/get"),
                body={"ids": list(ids), "include": []},
            )

        found = await self.call_all("locate", look)
        position = {record_id: i for i, record_id in enumerate(ids)}
        return {
            n: sorted(position[i] for i in r["ids"]) for n, r in sorted(found.items()) if r["ids"]
        }

    def _check_embeddings(
        self, state: CollectionState, embeddings: Embeddings | None, *, finite: bool = True
    ) -> None:
        """Reject what a server would reject, before any shard stores part of the batch."""
        if embeddings is None or len(embeddings) == 0:
            return
        expected = state.dimension if state.dimension is not None else len(embeddings[0])
        for emb in embeddings:
            if len(emb) != expected:
                raise _dimension_error(expected, len(emb))
        if not finite:
            return
        matrix = np.asarray(embeddings, dtype=np.float64)
        ok = np.isfinite(matrix)
        if not ok.all():
            row, col = np.argwhere(~ok)[0]
            value = matrix[row, col]
            text = "NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")
            raise InvalidArgumentError(f"Non-finite float value at embedding index {col}: {text}")

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

    # -- node access ------------------------------------------------------------------------

    async def _node_get(self, state: CollectionState, node: Node, suffix: str) -> Any:
        return await node.transport.request("GET", await self.node_path(state, node, suffix))

    async def _read_from(self, shard: str, state: CollectionState, suffix: str, body: Any) -> Any:
        """POST a read to one caught-up copy of a shard (with failover)."""

        async def op(node: Node) -> Any:
            path = await self.node_path(state, node, suffix)
            return await node.transport.request("POST", path, body=body)

        return await self.shards[shard].read(op)

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
        _check_where(where)
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

    # -- reads ------------------------------------------------------------------------------

    async def _read_shards(
        self, state: CollectionState, ids: IDs | None
    ) -> dict[str, list[str] | None]:
        """Which shards a read must ask, with the ids to ask each for (None: no id filter)."""
        if ids is not None and state.routing_key is None:
            groups = self._group(state, ids)
            return {s: [ids[i] for i in pos] for s, pos in groups.items()}
        return {s: (list(ids) if ids is not None else None) for s in self.shard_names}

    async def _gather(
        self,
        op: str,
        state: CollectionState,
        targets: Mapping[str, Any],
        body_for: Any,
        on_shard_error: OnShardError,
    ) -> tuple[list[Any], Coverage]:
        results, failures = await fan_out(
            {
                s: functools.partial(self._read_from, s, state, f"/{op}", body_for(s))
                for s in targets
            }
        )
        if on_shard_error == "raise" or not results:
            raise_for_failures(op, failures)
        coverage = Coverage(
            asked=tuple(targets),
            answered=tuple(s for s in targets if s in results),
            failed={s: f"{type(e).__name__}: {e}" for s, e in failures.items()},
        )
        return [results[s] for s in targets if s in results], coverage

    async def _get(
        self,
        collection_id: UUID,
        ids: IDs | None = None,
        where: Where | None = None,
        limit: int | None = None,
        offset: int | None = None,
        where_document: WhereDocument | None = None,
        include: Include = ["metadatas", "documents"],  # noqa: B006 - chromadb's signature
        tenant: str = "default_tenant",
        database: str = "default_database",
        on_shard_error: OnShardError = "raise",
    ) -> GetResult:
        state = await self.state(collection_id, tenant, database)
        _check_where(where)
        start = offset or 0
        fields = [f for f in include if f != "data"]
        wire_include = sorted({*fields, "metadatas"})
        shard_limit = None if limit is None else start + limit
        targets = await self._read_shards(state, ids)
        if not targets or limit == 0:
            return self._empty_get(include)

        def body(shard: str) -> dict[str, Any]:
            return {
                "ids": targets[shard],
                "where": where,
                "where_document": where_document,
                "limit": shard_limit,
                "offset": None,
                "include": wire_include,
            }

        responses, coverage = await self._gather("get", state, targets, body, on_shard_error)
        merged = merge_get(responses, seq_key=SEQ_KEY, offset=start, limit=limit, fields=fields)
        result = GetResult(
            ids=merged["ids"],
            embeddings=merged["embeddings"],
            metadatas=merged["metadatas"],
            documents=merged["documents"],
            uris=merged["uris"],
            data=None,
            included=include,
        )
        if on_shard_error == "partial":
            result["coverage"] = coverage  # type: ignore[typeddict-unknown-key]
        return result

    def _empty_get(self, include: Include) -> GetResult:
        return GetResult(
            ids=[],
            embeddings=[] if "embeddings" in include else None,
            metadatas=[] if "metadatas" in include else None,
            documents=[] if "documents" in include else None,
            uris=[] if "uris" in include else None,
            data=None,
            included=include,
        )

    async def _peek(
        self,
        collection_id: UUID,
        n: int = 10,
        tenant: str = "default_tenant",
        database: str = "default_database",
    ) -> GetResult:
        return await self._get(
            collection_id,
            limit=n,
            include=["metadatas", "documents", "embeddings"],  # chromadb's peek order
            tenant=tenant,
            database=database,
        )

    async def _count(
        self,
        collection_id: UUID,
        tenant: str = "default_tenant",
        database: str = "default_database",
        read_level: Any = None,
    ) -> int:
        state = await self.state(collection_id, tenant, database)
        counts = await self.call_all(
            "count",
            lambda _shard, node: self._node_get(state, node, "/count"),
        )
        return sum(int(c) for c in counts.values())

    async def _query(
        self,
        collection_id: UUID,
        query_embeddings: Embeddings,
        ids: IDs | None = None,
        n_results: int = 10,
        where: Where | None = None,
        where_document: WhereDocument | None = None,
        include: Include = ["metadatas", "documents", "distances"],  # noqa: B006
        tenant: str = "default_tenant",
        database: str = "default_database",
        on_shard_error: OnShardError = "raise",
    ) -> QueryResult:
        state = await self.state(collection_id, tenant, database)
        _check_where(where)
        if state.dimension is not None:
            # Non-finite query values are left to the servers, which refuse them as one would.
            self._check_embeddings(state, query_embeddings, finite=False)
        fields = [f for f in include if f != "data"]
        targets = await self._read_shards(state, ids)
        n_queries = len(query_embeddings)
        if not targets:
            # query(ids=[]) asks no shard: one empty row list per query, as one server answers.
            merged: dict[str, Any] = {
                k: ([[] for _ in range(n_queries)] if k == "ids" or k in fields else None)
                for k in ("ids", "distances", "embeddings", "metadatas", "documents", "uris")
            }
            coverage = Coverage(asked=(), answered=())
        else:
            matrix = np.asarray(query_embeddings, dtype=np.float32)
            wire_include = sorted({*fields, "distances"})

            def body(shard: str) -> dict[str, Any]:
                return {
                    "ids": targets[shard],
                    "query_embeddings": matrix,
                    "n_results": n_results,
                    "where": where,
                    "where_document": where_document,
                    "include": wire_include,
                }

            responses, coverage = await self._gather("query", state, targets, body, on_shard_error)
            merged = merge_query(responses, n_results, fields)
        if merged["metadatas"] is not None:
            merged["metadatas"] = [strip_seq(m, SEQ_KEY) or [] for m in merged["metadatas"]]
        result = QueryResult(
            ids=merged["ids"],
            distances=merged["distances"],
            embeddings=merged["embeddings"],
            metadatas=merged["metadatas"],
            documents=merged["documents"],
            uris=merged["uris"],
            data=None,
            included=include,
        )
        if on_shard_error == "partial":
            result["coverage"] = coverage  # type: ignore[typeddict-unknown-key]
        return result

    async def scan_pages(
        self,
        collection_id: UUID,
        *,
        batch_size: int,
        where: Where | None,
        where_document: WhereDocument | None,
        include: Include,
        tenant: str,
        database: str,
    ) -> AsyncIterator[GetResult]:
        """Pages of at most ``batch_size`` records in get() order, in bounded memory: each shard
        is read page by page and the shard streams are merged lazily."""
        state = await self.state(collection_id, tenant, database)
        _check_where(where)
        fields = [f for f in include if f != "data"]
        wire_include = sorted({*fields, "metadatas"})
        from ._scan import merged_rows

        # Offsets are positions in one node's stored order, so each shard's pages come from
        # the same copy for the whole scan while it answers.
        sticky: dict[str, Node] = {}

        async def fetch(shard: str, offset: int) -> Mapping[str, Any]:
            body = {
                "where": where,
                "where_document": where_document,
                "limit": batch_size,
                "offset": offset,
                "include": wire_include,
            }

            async def op(node: Node) -> Any:
                page = await node.transport.request(
                    "POST", await self.node_path(state, node, "/get"), body=body
                )
                sticky[shard] = node
                return page

            page: Mapping[str, Any] = await self.shards[shard].read(op, prefer=sticky.get(shard))
            return page

        async for page in merged_rows(self.shard_names, fetch, batch_size, SEQ_KEY, fields):
            yield GetResult(
                ids=page["ids"],
                embeddings=page["embeddings"],
                metadatas=page["metadatas"],
                documents=page["documents"],
                uris=page["uris"],
                data=None,
                included=include,
            )
