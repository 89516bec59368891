"""Reads across parts: get, peek, count, query and scan, routed by the router, merged purely.

Under policies that place a record by anything but its id, one id can be met in two parts (a
move caught half-way here, or two processes racing). Such a read keeps the copy with the newer
version (``_sc_ver``, then the sequence) and removes the older copy, conditionally on its
version, so a newer write that reached it meanwhile is never undone (see ``_repair``).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Mapping
from typing import Any

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

from .._errors import NodeAccessError
from .._fanout import Coverage, OnShardError, fan_out, raise_for_failures
from .._merge import merge_get, merge_query, visible_metadatas
from .._scan import merged_rows
from ..catalog._layouts import Target
from ..catalog._reserved import escape_where
from ..catalog._state import SEQ_KEY, VERSION_KEY, CollectionState
from ..cluster._cluster import Cluster
from ..observe import current_call
from ..observe._metrics import FanOutCounter
from ._checks import check_embeddings
from ._partio import PartIO
from ._repair import ReadRepair, settle_get, settle_query
from ._router import Plan, Router

__all__ = ["Reader"]

_GET_COLUMNS = ("ids", "embeddings", "metadatas", "documents", "uris")
_QUERY_COLUMNS = ("ids", "distances", "embeddings", "metadatas", "documents", "uris")


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


def _empty_get(include: Include) -> GetResult:
    columns: dict[str, list[Any] | None] = {
        k: ([] if k == "ids" or k in include else None) for k in _GET_COLUMNS
    }
    return _get_result(columns, include)


def _pruned_coverage(plan: Plan) -> Coverage:
    """Coverage of a plan that asked no part (the filter pruned every shard)."""
    return Coverage(asked=(), answered=(), skipped=plan.skipped)


class Reader:
    """Read methods over the parts a plan names."""

    def __init__(
        self,
        cluster: Cluster,
        router: Router,
        io: PartIO,
        repair: ReadRepair,
        fan_outs: FanOutCounter,
    ) -> None:
        self._cluster = cluster
        self._router = router
        self._io = io
        self._repair = repair
        self._fan_outs = fan_outs

    async def _gather(
        self, op: str, plan: Plan, body_for: Any, on_shard_error: OnShardError
    ) -> tuple[list[Target], list[Any], Coverage]:
        """Ask every part of a plan; failures are reported per shard. Returns the parts that
        answered (a missing bucket does not) and their answers, in the plan's order."""
        targets = plan.targets
        io = self._io

        async def whole_get(target: Target) -> dict[str, Any]:
            out: dict[str, Any] = {}
            async for page in io.pages(target, body_for(target)):
                if not out:
                    out = dict(page)
                    continue
                for key in _GET_COLUMNS:
                    if out.get(key) is not None and page.get(key) is not None:
                        out[key].extend(page[key])
            return out

        async def ask(target: Target) -> Any:
            if op == "get":
                return await io.guarded(target, lambda: whole_get(target))
            return await io.guarded(target, lambda: io.read(target, "/query", body_for(target)))

        results, failed_parts = await fan_out(
            {k: functools.partial(ask, t) for k, t in targets.items()}
        )
        failures: dict[str, Exception] = dict(plan.failed)
        for key, exc in failed_parts.items():
            failures.setdefault(targets[key].shard, exc)
        # A refused configuration is not an outage a partial answer may skip over.
        refused = any(isinstance(e, NodeAccessError) for e in failures.values())
        if on_shard_error == "raise" or refused or (not results and failures):
            raise_for_failures(op, failures)
        shard_names = self._cluster.shard_names
        asked = tuple(s for s in shard_names if s not in plan.skipped)
        coverage = Coverage(
            asked=asked,
            answered=tuple(s for s in asked if s not in failures),
            failed={s: f"{type(e).__name__}: {e}" for s, e in failures.items()},
            skipped=plan.skipped,
        )
        self._fan_outs.record(op, len(asked), len(plan.skipped))
        trace = current_call()
        if trace is not None:
            trace.coverage(
                len(asked), len(coverage.answered), len(plan.skipped), len(coverage.failed)
            )
        keys = [k for k in targets if results.get(k) is not None]
        return [targets[k] for k in keys], [results[k] for k in keys], coverage

    async def get(
        self,
        state: CollectionState,
        ids: IDs | None,
        where: Where | None,
        limit: int | None,
        offset: int | None,
        where_document: WhereDocument | None,
        include: Include,
        on_shard_error: OnShardError,
    ) -> GetResult:
        stored_where = escape_where(where)
        if (offset is not None and offset < 0) or (limit is not None and limit < 0):
            # Let a server refuse it, so the error is the one a single server gives.
            catalog = Target(self._cluster.catalog_shard, state)
            await self._io.read(catalog, "/get", {"limit": limit, "offset": offset})
        start = offset or 0
        fields = [f for f in include if f != "data"]
        wire_include = sorted({*fields, "metadatas"})
        shard_limit = None if limit is None else start + limit
        plan = await self._router.plan(state, ids, where, direct=True)
        if limit == 0 or (not plan.targets and not plan.failed):
            result = _empty_get(include)
            if on_shard_error == "partial":
                result["coverage"] = _pruned_coverage(plan)  # type: ignore[typeddict-unknown-key]
            return result

        def body(target: Target) -> dict[str, Any]:
            return {
                "ids": target.ids,
                "where": stored_where,
                "where_document": where_document,
                "limit": shard_limit,
                "offset": None,
                "include": wire_include,
            }

        asked, responses, coverage = await self._gather("get", plan, body, on_shard_error)
        if not self._router.ids_routed(state):
            responses, losers = settle_get(responses)
            if losers:
                await self._repair.remove_older(state, asked, losers)
        merged = merge_get(responses, seq_key=SEQ_KEY, offset=start, limit=limit, fields=fields)
        result = _get_result(merged, include)
        if on_shard_error == "partial":
            result["coverage"] = coverage  # type: ignore[typeddict-unknown-key]
        return result

    async def count(self, state: CollectionState) -> int:
        return sum((await self.part_counts(state)).values())

    async def part_counts(self, state: CollectionState) -> dict[str, int]:
        """Record count of every part by part key; all must answer."""
        parts = await self._router.all_parts(state, "count")
        io = self._io

        async def count(target: Target) -> int:
            n = await io.guarded(target, lambda: io.count(target))
            return 0 if n is None else n

        counts, failures = await fan_out({k: functools.partial(count, t) for k, t in parts.items()})
        raise_for_failures("count", failures)
        return counts

    async def query(
        self,
        state: CollectionState,
        query_embeddings: Embeddings,
        ids: IDs | None,
        n_results: int,
        where: Where | None,
        where_document: WhereDocument | None,
        include: Include,
        on_shard_error: OnShardError,
    ) -> QueryResult:
        stored_where = escape_where(where)
        if state.dimension is not None:
            # Non-finite query values are left to the servers, which refuse them as one would.
            check_embeddings(state.dimension, query_embeddings, finite=False)
        fields = [f for f in include if f != "data"]
        plan = await self._router.plan(state, ids, where, direct=True)
        n_queries = len(query_embeddings)
        if not plan.targets and not plan.failed:
            # query(ids=[]) asks no shard: one empty row list per query, as one server answers.
            merged: dict[str, Any] = {
                k: ([[] for _ in range(n_queries)] if k == "ids" or k in fields else None)
                for k in _QUERY_COLUMNS
            }
            coverage = _pruned_coverage(plan)
        else:
            settle = not self._router.ids_routed(state)
            matrix = np.asarray(query_embeddings, dtype=np.float32)
            # Versions decide between two copies of one id, so they are read where that can be.
            wire = {*fields, "distances", *(["metadatas"] if settle else [])}

            def body(target: Target) -> dict[str, Any]:
                return {
                    "ids": target.ids,
                    "query_embeddings": matrix,
                    "n_results": n_results,
                    "where": stored_where,
                    "where_document": where_document,
                    "include": sorted(wire),
                }

            asked, responses, coverage = await self._gather("query", plan, body, on_shard_error)
            if settle:
                responses, losers = settle_query(responses)
                if losers:
                    await self._repair.remove_older(state, asked, losers)
            merged = merge_query(responses, n_results, fields)
        if merged["metadatas"] is not None:
            merged["metadatas"] = [visible_metadatas(m) or [] for m in merged["metadatas"]]
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

    async def scan(
        self,
        state: CollectionState,
        *,
        batch_size: int,
        where: Where | None,
        where_document: WhereDocument | None,
        include: Include,
        stamps: bool = False,
    ) -> AsyncIterator[GetResult]:
        """Pages of at most ``batch_size`` records in get() order, in bounded memory: each part
        is read page by page and the part streams are merged lazily. With ``stamps`` each
        page also has a ``"stamps"`` column: (sequence, version) per record."""
        stored_where = escape_where(where)
        fields = [f for f in include if f != "data"]
        wire_include = sorted({*fields, "metadatas"})
        plan = await self._router.plan(state, None, where)
        raise_for_failures("scan", plan.failed)
        targets = plan.targets
        body = {"where": stored_where, "where_document": where_document, "include": wire_include}
        # Each part is paged by sequence ranges (``PartIO.pages``): pages are sorted, any copy
        # may answer any of them, and deletes meanwhile shift no later page.
        streams = {k: self._io.pages(t, body, batch_size) for k, t in targets.items()}
        dedupe = not self._router.ids_routed(state)
        try:
            keep = (SEQ_KEY, VERSION_KEY) if stamps else ()
            async for page in merged_rows(streams, batch_size, SEQ_KEY, fields, dedupe, keep):
                result = _get_result(page, include)
                if stamps:
                    result["stamps"] = page["stamps"]  # type: ignore[typeddict-unknown-key]
                yield result
        finally:
            for stream in streams.values():
                await stream.aclose()
