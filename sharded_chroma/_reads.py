"""Record reads across shards: routed by id where possible, fanned out otherwise, merged."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar
from uuid import UUID

import numpy as np
from chromadb.api.types import (
    Embeddings,
    GetResult,
    IDs,
    Include,
    QueryResult,
    Where,
    WhereDocument,
)
from chromadb.errors import InvalidArgumentError, NotFoundError

from ._backend import SEQ_KEY, CollectionState, reject_reserved
from ._fanout import Coverage, OnShardError, fan_out, raise_for_failures
from ._merge import merge_get, merge_query, strip_seq
from ._parts import PartOps, Plan, Target
from ._replicas import Node

__all__ = ["ReadOps", "check_where", "dimension_error"]

T = TypeVar("T")


def check_where(where: Any, what: str = "where") -> None:
    """Reserved keys are invisible: filtering on them is refused like an unknown operator."""
    if isinstance(where, Mapping):
        reject_reserved(where, f"{what} filter")
        for value in where.values():
            check_where(value, what)
    elif isinstance(where, list):
        for item in where:
            check_where(item, what)


def dimension_error(expected: int, got: int) -> InvalidArgumentError:
    # Same text as a Chroma server's, so the error reads the same whichever shard it came from.
    return InvalidArgumentError(
        f"Collection expecting embedding with dimension of {expected}, got {got}"
    )


def _get_result(columns: Mapping[str, Any], include: Include) -> GetResult:
    return GetResult(
        ids=columns["ids"],
        embeddings=columns["embeddings"],
        metadatas=columns["metadatas"],
        documents=columns["documents"],
        uris=columns["uris"],
        data=None,
        included=include,
    )


# Well under the 32,766 records a Chroma 1.5.9 server can return from one get.
_GET_PAGE = 10_000
_GET_COLUMNS = ("ids", "embeddings", "metadatas", "documents", "uris")


class ReadOps(PartOps):
    """Routing helpers and the read methods chromadb's AsyncCollection calls."""

    # -- routing ----------------------------------------------------------------------------

    async def _locate(self, state: CollectionState, ids: IDs) -> dict[str, list[int]]:
        """Where existing ids are: positions per part key, ids found nowhere left out.

        Under hash of the id this is pure (every owner is named, whether it holds the id or
        not). Otherwise every part is asked; an id may be found in two parts while a move is
        being finished."""
        if self.ids_routed(state):
            groups, _ = self.group_placements(state, self.place_records(state, ids, None))
            return groups
        parts = await self.all_parts(state, "locate")

        async def look(target: Target) -> Any:
            return await self._read_from(
                target.shard, target.state, "/get", {"ids": list(ids), "include": []}
            )

        found, failures = await fan_out({k: functools.partial(look, t) for k, t in parts.items()})
        raise_for_failures("locate", failures)
        position = {record_id: i for i, record_id in enumerate(ids)}
        return {
            k: sorted(position[i] for i in r["ids"]) for k, r in sorted(found.items()) if r["ids"]
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
                raise dimension_error(expected, len(emb))
        if not finite:
            return
        matrix = np.asarray(embeddings, dtype=np.float64)
        ok = np.isfinite(matrix)
        if not ok.all():
            row, col = np.argwhere(~ok)[0]
            value = matrix[row, col]
            text = "NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")
            raise InvalidArgumentError(f"Non-finite float value at embedding index {col}: {text}")

    # -- node access ------------------------------------------------------------------------

    async def _node_get(self, state: CollectionState, node: Node, suffix: str) -> Any:
        return await node.transport.request("GET", await self.node_path(state, node, suffix))

    async def _read_from(self, shard: str, state: CollectionState, suffix: str, body: Any) -> Any:
        """POST a read to one caught-up copy of a shard (with failover)."""

        async def op(node: Node) -> Any:
            path = await self.node_path(state, node, suffix)
            return await node.transport.request("POST", path, body=body)

        return await self.shards[shard].read(op)

    # -- reads ------------------------------------------------------------------------------

    async def _read_query(self, shard: str, state: CollectionState, body: Any) -> Any:
        return await self._read_from(shard, state, "/query", body)

    async def get_pages(
        self, shard: str, state: CollectionState, body: Mapping[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        """One shard's get() as pages of at most ``_GET_PAGE`` records, all from one copy
        while it answers (offsets are positions in one node's stored order); ``body["limit"]``,
        if set, bounds the total.

        A Chroma 1.5.9 server refuses a get matching more than 32,766 records ("too many SQL
        variables"), which a whole-collection get() of a large shard would hit. Results that
        fit one page are a single request.
        """
        want = body.get("limit")
        sticky: dict[str, Node] = {}
        got = 0
        while True:
            take = _GET_PAGE if want is None else min(_GET_PAGE, want - got)
            page_body = {**body, "limit": take, "offset": got}

            async def op(node: Node, page_body: Mapping[str, Any] = page_body) -> Any:
                path = await self.node_path(state, node, "/get")
                page = await node.transport.request("POST", path, body=page_body)
                sticky["node"] = node
                return page

            page: dict[str, Any] = await self.shards[shard].read(op, prefer=sticky.get("node"))
            yield page
            n = len(page["ids"])
            got += n
            if n < take or (want is not None and got >= want):
                return

    async def _read_get_paged(
        self, shard: str, state: CollectionState, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """One shard's get(), its pages (see ``get_pages``) joined."""
        out: dict[str, Any] = {}
        async for page in self.get_pages(shard, state, body):
            if not out:
                out = dict(page)
                continue
            for key in _GET_COLUMNS:
                if out.get(key) is not None and page.get(key) is not None:
                    out[key].extend(page[key])
        return out

    async def read_part(self, target: Target, read: Callable[[], Awaitable[T]]) -> T | None:
        """Run one read of a part. A time bucket that does not exist (never made, or dropped
        since it was listed) reads as None; one dropped and made again has new physical ids,
        learnt again by name, once."""
        known = bool(target.state.physical)
        try:
            return await read()
        except NotFoundError:
            if target.state.bucket is None:
                raise
            if not known:
                return None  # looked up by name just now: the bucket does not exist
        target.state.physical.clear()
        try:
            return await read()
        except NotFoundError:
            return None

    async def _gather(
        self, op: str, plan: Plan, body_for: Any, on_shard_error: OnShardError
    ) -> tuple[list[Any], Coverage]:
        """Ask every part of a plan; failures are reported per shard."""
        read = self._read_get_paged if op == "get" else self._read_query
        targets = plan.targets

        async def ask(target: Target) -> Any:
            return await self.read_part(
                target, lambda: read(target.shard, target.state, body_for(target))
            )

        results, failed_parts = await fan_out(
            {k: functools.partial(ask, t) for k, t in targets.items()}
        )
        failures: dict[str, Exception] = dict(plan.failed)
        for key, exc in failed_parts.items():
            failures.setdefault(targets[key].shard, exc)
        if on_shard_error == "raise" or (not results and failures):
            raise_for_failures(op, failures)
        asked = tuple(s for s in self.shard_names if s not in plan.skipped)
        coverage = Coverage(
            asked=asked,
            answered=tuple(s for s in asked if s not in failures),
            failed={s: f"{type(e).__name__}: {e}" for s, e in failures.items()},
            skipped=plan.skipped,
        )
        answers = [results[k] for k in targets if results.get(k) is not None]
        return answers, coverage

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
        check_where(where)
        if (offset is not None and offset < 0) or (limit is not None and limit < 0):
            # Let a server refuse it, so the error is the one a single server gives.
            await self._read_from(
                self.catalog_shard, state, "/get", {"limit": limit, "offset": offset}
            )
        start = offset or 0
        fields = [f for f in include if f != "data"]
        wire_include = sorted({*fields, "metadatas"})
        shard_limit = None if limit is None else start + limit
        plan = await self.plan(state, ids, where, direct=True)
        if limit == 0 or (not plan.targets and not plan.failed):
            result = self._empty_get(include)
            if on_shard_error == "partial":
                result["coverage"] = self._coverage(plan)  # type: ignore[typeddict-unknown-key]
            return result

        def body(target: Target) -> dict[str, Any]:
            return {
                "ids": target.ids,
                "where": where,
                "where_document": where_document,
                "limit": shard_limit,
                "offset": None,
                "include": wire_include,
            }

        responses, coverage = await self._gather("get", plan, body, on_shard_error)
        merged = merge_get(responses, seq_key=SEQ_KEY, offset=start, limit=limit, fields=fields)
        result = _get_result(merged, include)
        if on_shard_error == "partial":
            result["coverage"] = coverage  # type: ignore[typeddict-unknown-key]
        return result

    def _coverage(self, plan: Plan) -> Coverage:
        """Coverage of a plan that asked no part (the filter pruned every shard)."""
        return Coverage(asked=(), answered=(), skipped=plan.skipped)

    def _empty_get(self, include: Include) -> GetResult:
        columns: dict[str, list[Any] | None] = {
            k: ([] if k == "ids" or k in include else None) for k in _GET_COLUMNS
        }
        return _get_result(columns, include)

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
        return sum((await self.part_counts(state)).values())

    async def part_counts(self, state: CollectionState) -> dict[str, int]:
        """Record count of every part (see ``_parts``) by part key; all must answer."""
        parts = await self.all_parts(state, "count")

        async def count(target: Target) -> int:
            n = await self.read_part(
                target,
                lambda: self.shards[target.shard].read(
                    lambda node: self._node_get(target.state, node, "/count")
                ),
            )
            return 0 if n is None else int(n)

        counts, failures = await fan_out({k: functools.partial(count, t) for k, t in parts.items()})
        raise_for_failures("count", failures)
        return counts

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
        check_where(where)
        if state.dimension is not None:
            # Non-finite query values are left to the servers, which refuse them as one would.
            self._check_embeddings(state, query_embeddings, finite=False)
        fields = [f for f in include if f != "data"]
        plan = await self.plan(state, ids, where, direct=True)
        n_queries = len(query_embeddings)
        if not plan.targets and not plan.failed:
            # query(ids=[]) asks no shard: one empty row list per query, as one server answers.
            merged: dict[str, Any] = {
                k: ([[] for _ in range(n_queries)] if k == "ids" or k in fields else None)
                for k in ("ids", "distances", "embeddings", "metadatas", "documents", "uris")
            }
            coverage = self._coverage(plan)
        else:
            matrix = np.asarray(query_embeddings, dtype=np.float32)
            wire_include = sorted({*fields, "distances"})

            def body(target: Target) -> dict[str, Any]:
                return {
                    "ids": target.ids,
                    "query_embeddings": matrix,
                    "n_results": n_results,
                    "where": where,
                    "where_document": where_document,
                    "include": wire_include,
                }

            responses, coverage = await self._gather("query", plan, body, on_shard_error)
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
        check_where(where)
        fields = [f for f in include if f != "data"]
        wire_include = sorted({*fields, "metadatas"})
        from ._scan import merged_rows

        plan = await self.plan(state, None, where)
        raise_for_failures("scan", plan.failed)
        targets = plan.targets
        # Offsets are positions in one node's stored order, so each part's pages come from
        # the same copy for the whole scan while it answers.
        sticky: dict[str, Node] = {}

        async def fetch(key: str, offset: int) -> Mapping[str, Any]:
            target = targets[key]
            body = {
                "where": where,
                "where_document": where_document,
                "limit": batch_size,
                "offset": offset,
                "include": wire_include,
            }

            async def op(node: Node) -> Any:
                page = await node.transport.request(
                    "POST", await self.node_path(target.state, node, "/get"), body=body
                )
                sticky[key] = node
                return page

            page: Mapping[str, Any] = await self.shards[target.shard].read(
                op, prefer=sticky.get(key)
            )
            return page

        async for page in merged_rows(tuple(targets), fetch, batch_size, SEQ_KEY, fields):
            yield _get_result(page, include)
