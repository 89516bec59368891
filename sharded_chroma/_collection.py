"""ShardedCollection: chromadb's own AsyncCollection, bound to the sharded backend.

Reusing chromadb's collection class gives its exact validation, embedding-function handling,
argument normalisation and result shaping; only the "server" underneath is ours. Additions are
keyword-only (``on_shard_error=``) or new methods (``scan``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, cast

from chromadb.api.models.AsyncCollection import AsyncCollection
from chromadb.api.types import (
    ID,
    URI,
    Document,
    Embedding,
    GetResult,
    Image,
    Include,
    OneOrMany,
    PyEmbedding,
    QueryResult,
    Where,
    WhereDocument,
)

from ._fanout import OnShardError
from ._timebuckets import TimeValueError, parse_time

if TYPE_CHECKING:
    from .api._server import ShardedServer

__all__ = ["ShardedCollection"]

_GET_INCLUDE: Include = ["metadatas", "documents"]
_QUERY_INCLUDE: Include = ["metadatas", "documents", "distances"]


def _check_mode(on_shard_error: str) -> OnShardError:
    if on_shard_error not in ("raise", "partial"):
        raise ValueError(f"on_shard_error must be 'raise' or 'partial', got {on_shard_error!r}")
    return cast(OnShardError, on_shard_error)


class ShardedCollection(AsyncCollection):
    """A logical collection spread over every shard of the cluster.

    Behaves as ``chromadb.api.models.AsyncCollection.AsyncCollection`` does against one server.
    ``get()`` and ``query()`` also take ``on_shard_error="partial"``, which returns what the
    answering shards hold plus a ``"coverage"`` entry (a ``Coverage``) instead of raising when
    some shards fail.
    """

    @property
    def _server(self) -> ShardedServer:
        return cast("ShardedServer", self._client)

    async def get(
        self,
        ids: OneOrMany[ID] | None = None,
        where: Where | None = None,
        limit: int | None = None,
        offset: int | None = None,
        where_document: WhereDocument | None = None,
        include: Include = _GET_INCLUDE,
        *,
        on_shard_error: OnShardError = "raise",
    ) -> GetResult:
        """Records in the cluster's insertion order; see ``AsyncCollection.get``."""
        mode = _check_mode(on_shard_error)
        request = self._validate_and_prepare_get_request(
            ids=ids, where=where, where_document=where_document, include=include
        )
        response = await self._server._get(
            collection_id=self.id,
            ids=request["ids"],
            where=request["where"],
            where_document=request["where_document"],
            include=request["include"],
            limit=limit,
            offset=offset,
            tenant=self.tenant,
            database=self.database,
            on_shard_error=mode,
        )
        result = self._transform_get_response(response=response, include=request["include"])
        if "coverage" in response:
            result["coverage"] = response["coverage"]  # type: ignore[typeddict-item]
        return result

    async def query(
        self,
        query_embeddings: OneOrMany[Embedding] | OneOrMany[PyEmbedding] | None = None,
        query_texts: OneOrMany[Document] | None = None,
        query_images: OneOrMany[Image] | None = None,
        query_uris: OneOrMany[URI] | None = None,
        ids: OneOrMany[ID] | None = None,
        n_results: int = 10,
        where: Where | None = None,
        where_document: WhereDocument | None = None,
        include: Include = _QUERY_INCLUDE,
        *,
        on_shard_error: OnShardError = "raise",
    ) -> QueryResult:
        """Nearest neighbours across all shards, merged exactly by (distance, id)."""
        mode = _check_mode(on_shard_error)
        request = self._validate_and_prepare_query_request(
            query_embeddings=query_embeddings,
            query_texts=query_texts,
            query_images=query_images,
            query_uris=query_uris,
            ids=ids,
            n_results=n_results,
            where=where,
            where_document=where_document,
            include=include,
        )
        response = await self._server._query(
            collection_id=self.id,
            ids=request["ids"],
            query_embeddings=request["embeddings"],
            n_results=request["n_results"],
            where=request["where"],
            where_document=request["where_document"],
            include=request["include"],
            tenant=self.tenant,
            database=self.database,
            on_shard_error=mode,
        )
        result = self._transform_query_response(response=response, include=request["include"])
        if "coverage" in response:
            result["coverage"] = response["coverage"]  # type: ignore[typeddict-item]
        return result

    async def scan(
        self,
        batch_size: int = 1000,
        *,
        where: Where | None = None,
        where_document: WhereDocument | None = None,
        include: Include = _GET_INCLUDE,
    ) -> AsyncIterator[GetResult]:
        """Iterate over the whole collection in pages of at most ``batch_size`` records, in
        ``get()`` order, holding at most one page per shard in memory.

        Each part is paged by ranges of its records' hidden sequence values, not by offset:
        every record present for the whole scan is yielded exactly once, whichever copy
        answers each page and whatever is deleted meanwhile (a record deleted or written
        during the scan appears at most once).
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        request = self._validate_and_prepare_get_request(
            ids=None, where=where, where_document=where_document, include=include
        )
        pages = self._server.scan(
            self.id,
            batch_size=batch_size,
            where=request["where"],
            where_document=request["where_document"],
            include=request["include"],
            tenant=self.tenant,
            database=self.database,
        )
        async for page in pages:
            yield self._transform_get_response(response=page, include=request["include"])

    async def get_policy(self) -> Any:
        """The placement policy stored with this collection (the same for every client)."""
        return await self._server.policy(self.id, self.tenant, self.database)

    async def drop_partitions(
        self, before: datetime | float | str, *, dry_run: bool = False
    ) -> list[tuple[str, str]]:
        """Delete, under a time policy, every bucket that ends at or before ``before``.

        ``before`` is a datetime (naive means UTC), epoch seconds or an ISO-8601 string. A
        bucket that straddles ``before`` is kept whole. Each bucket is deleted as one physical
        collection on every copy of its shard, so the time taken does not grow with its size.
        Returns ``(shard, bucket)`` pairs, oldest first; with ``dry_run`` nothing is deleted.
        """
        if isinstance(before, datetime):
            moment = before if before.tzinfo else before.replace(tzinfo=timezone.utc)
            cutoff = moment.timestamp()
        else:
            try:
                cutoff = parse_time(before)
            except TimeValueError as exc:
                raise ValueError(f"before: {exc}") from None
        return await self._server.drop_partitions(
            self.id, self.tenant, self.database, cutoff, dry_run=dry_run
        )

    async def fork(self, new_name: str) -> AsyncCollection:
        raise NotImplementedError("fork is a Chroma Cloud feature; a sharded cluster has no fork")

    async def fork_count(self) -> int:
        raise NotImplementedError("fork is a Chroma Cloud feature; a sharded cluster has no fork")

    async def search(self, searches: Any, read_level: Any = None) -> Any:
        raise NotImplementedError(
            "search() is a Chroma Cloud feature; use query() on a sharded cluster"
        )

    async def get_indexing_status(self) -> Any:
        raise NotImplementedError("indexing status is a Chroma Cloud feature")
