"""ShardedCollection: chromadb's own AsyncCollection, bound to the sharded backend.

Reusing chromadb's collection class gives its exact validation, embedding-function handling,
argument normalisation and result shaping; only the "server" underneath is ours. Additions are
keyword-only (``on_shard_error=``) or new methods (``scan``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
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

from ._collection_calls import (
    GET_INCLUDE,
    QUERY_INCLUDE,
    cutoff_of,
    get_call,
    query_call,
    scan_call,
    shaped_get,
    shaped_query,
)
from ._fanout import OnShardError

if TYPE_CHECKING:
    from .api._server import ShardedServer

__all__ = ["ShardedCollection"]


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
        include: Include = GET_INCLUDE,
        *,
        on_shard_error: OnShardError = "raise",
    ) -> GetResult:
        """Records in the cluster's insertion order; see ``AsyncCollection.get``."""
        shown, kwargs = get_call(
            self, ids, where, limit, offset, where_document, include, on_shard_error
        )
        return shaped_get(self, await self._server._get(**kwargs), shown)

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
        include: Include = QUERY_INCLUDE,
        *,
        on_shard_error: OnShardError = "raise",
    ) -> QueryResult:
        """Nearest neighbours across all shards, merged exactly by (distance, id)."""
        shown, kwargs = query_call(
            self,
            query_embeddings,
            query_texts,
            query_images,
            query_uris,
            ids,
            n_results,
            where,
            where_document,
            include,
            on_shard_error,
        )
        return shaped_query(self, await self._server._query(**kwargs), shown)

    async def scan(
        self,
        batch_size: int = 1000,
        *,
        where: Where | None = None,
        where_document: WhereDocument | None = None,
        include: Include = GET_INCLUDE,
    ) -> AsyncIterator[GetResult]:
        """Iterate over the whole collection in pages of at most ``batch_size`` records, in
        ``get()`` order, holding at most one page per shard in memory.

        Each part is paged by ranges of its records' hidden sequence values, not by offset:
        every record present for the whole scan is yielded exactly once, whichever copy
        answers each page and whatever is deleted meanwhile (a record deleted or written
        during the scan appears at most once).
        """
        shown, kwargs = scan_call(self, batch_size, where, where_document, include)
        async for page in self._server.scan(**kwargs):
            yield self._transform_get_response(response=page, include=shown)

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
        cutoff = cutoff_of(before)
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
