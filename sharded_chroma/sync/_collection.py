"""SyncShardedCollection: chromadb's own sync ``Collection``, bound to the sharded backend.

chromadb's class validates arguments, runs the embedding function (in the caller's thread)
and shapes results; its server calls go to ``SyncServer`` and from there to the same async
core the async client uses. ``isinstance(collection, chromadb.Collection)`` holds, which
LlamaIndex's ``ChromaVectorStore.from_collection`` checks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from chromadb.api.models.Collection import Collection
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

from .._collection_calls import (
    GET_INCLUDE,
    QUERY_INCLUDE,
    cutoff_of,
    get_call,
    query_call,
    scan_call,
    shaped_get,
    shaped_query,
)
from .._fanout import OnShardError

if TYPE_CHECKING:
    from ._server import SyncServer

__all__ = ["SyncShardedCollection"]


class SyncShardedCollection(Collection):
    """A logical collection spread over every shard, with ``chromadb.Collection``'s methods.

    The same additions as ``ShardedCollection``: ``on_shard_error="partial"`` on ``get`` and
    ``query``, ``scan()`` (a plain iterator here), ``get_policy()`` and
    ``drop_partitions()``.
    """

    @property
    def _server(self) -> SyncServer:
        return cast("SyncServer", self._client)

    def get(
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
        """Records in the cluster's insertion order; see ``Collection.get``."""
        shown, kwargs = get_call(
            self, ids, where, limit, offset, where_document, include, on_shard_error
        )
        return shaped_get(self, self._server._get(**kwargs), shown)

    def query(
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
        return shaped_query(self, self._server._query(**kwargs), shown)

    def scan(
        self,
        batch_size: int = 1000,
        *,
        where: Where | None = None,
        where_document: WhereDocument | None = None,
        include: Include = GET_INCLUDE,
    ) -> Generator[GetResult, None, None]:
        """Iterate over the whole collection in pages of at most ``batch_size`` records, as
        ``ShardedCollection.scan`` does (every record present for the whole scan exactly
        once). The pages are read one ahead of the caller; leaving the loop early stops it."""
        shown, kwargs = scan_call(self, batch_size, where, where_document, include)
        with contextlib.closing(self._server.scan(**kwargs)) as pages:
            for page in pages:
                yield self._transform_get_response(response=page, include=shown)

    def get_policy(self) -> Any:
        """The placement policy stored with this collection (the same for every client)."""
        return self._server.policy(self.id, self.tenant, self.database)

    def drop_partitions(
        self, before: datetime | float | str, *, dry_run: bool = False
    ) -> list[tuple[str, str]]:
        """Delete, under a time policy, every bucket that ends at or before ``before``; see
        ``ShardedCollection.drop_partitions``."""
        return self._server.drop_partitions(
            self.id, self.tenant, self.database, cutoff_of(before), dry_run=dry_run
        )
