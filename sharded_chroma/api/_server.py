"""The one adapter of the server contract (``api._contract``): chromadb's collection classes
call it, and it hands each call to the reader, the write path or the catalog."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

from chromadb.api.collection_configuration import UpdateCollectionConfiguration
from chromadb.api.types import (
    CollectionMetadata,
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
)

from .._fanout import OnShardError
from ..catalog._catalog import Catalog
from ..catalog._layouts import PartLayouts
from ..control._epochs import Epochs
from ..control._served import NO_EPOCHS, NoEpochs, served_map
from ..observe import NO_TRACING, Tracing
from ..observe._tracing import NO_CALL
from ..ops._reader import Reader
from ..ops._writepath import WritePath
from ._contract import _D, _T, CLOUD_ONLY, CollectionServer

__all__ = ["CLOUD_ONLY", "CollectionServer", "ShardedServer"]


class ShardedServer:
    """``CollectionServer`` over the cluster: resolves the collection, then hands the call to
    the reader, the write path or the catalog. Also the few additions ``ShardedCollection``
    makes (partial results, scan, policy, retention)."""

    def __init__(
        self,
        catalog: Catalog,
        layouts: PartLayouts,
        reader: Reader,
        writer: WritePath,
        epochs: Epochs | NoEpochs = NO_EPOCHS,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._catalog = catalog
        self._tracing = tracing
        self._layouts = layouts
        self._reader = reader
        self._writer = writer
        # Every call of a collection is served under one partition map (see ``Epochs``).
        self._serving = epochs.serving
        self._hold = epochs.hold

    @contextlib.asynccontextmanager
    async def _call(
        self,
        operation: str,
        collection_id: UUID,
        tenant: str,
        database: str,
        *,
        writes: bool,
        batch: int | None = None,
    ) -> AsyncIterator[Any]:
        """One traced call: the collection's state, served under one partition map."""
        with self._tracing.call(operation, tenant=tenant, database=database, batch=batch) as t:
            state = await self._catalog.state(collection_id, tenant, database)
            traced = t is not NO_CALL
            if traced:
                t.named(state.name)
            async with self._serving(state, writes=writes):
                current = served_map(state) if traced else None
                if current is not None:
                    t.epoch(current.epoch)
                yield state

    async def _add(
        self,
        ids: IDs,
        collection_id: UUID,
        embeddings: Embeddings,
        metadatas: Metadatas | None = None,
        documents: Documents | None = None,
        uris: URIs | None = None,
        tenant: str = _T,
        database: str = _D,
    ) -> bool:
        async with self._call(
            "add", collection_id, tenant, database, writes=True, batch=len(ids)
        ) as state:
            await self._writer.add(state, ids, embeddings, metadatas, documents, uris)
        return True

    async def _upsert(
        self,
        collection_id: UUID,
        ids: IDs,
        embeddings: Embeddings,
        metadatas: Metadatas | None = None,
        documents: Documents | None = None,
        uris: URIs | None = None,
        tenant: str = _T,
        database: str = _D,
    ) -> bool:
        async with self._call(
            "upsert", collection_id, tenant, database, writes=True, batch=len(ids)
        ) as state:
            await self._writer.upsert(state, ids, embeddings, metadatas, documents, uris)
        return True

    async def _update(
        self,
        collection_id: UUID,
        ids: IDs,
        embeddings: Embeddings | None = None,
        metadatas: Metadatas | None = None,
        documents: Documents | None = None,
        uris: URIs | None = None,
        tenant: str = _T,
        database: str = _D,
    ) -> bool:
        async with self._call(
            "update", collection_id, tenant, database, writes=True, batch=len(ids)
        ) as state:
            await self._writer.update(state, ids, embeddings, metadatas, documents, uris)
        return True

    async def _delete(
        self,
        collection_id: UUID,
        ids: IDs | None = None,
        where: Where | None = None,
        where_document: WhereDocument | None = None,
        limit: int | None = None,
        tenant: str = _T,
        database: str = _D,
    ) -> DeleteResult:
        batch = None if ids is None else len(ids)
        async with self._call(
            "delete", collection_id, tenant, database, writes=True, batch=batch
        ) as state:
            return await self._writer.delete(state, ids, where, where_document, limit)

    async def _get(
        self,
        collection_id: UUID,
        ids: IDs | None = None,
        where: Where | None = None,
        limit: int | None = None,
        offset: int | None = None,
        where_document: WhereDocument | None = None,
        include: Include = ["metadatas", "documents"],  # noqa: B006 - chromadb's signature
        tenant: str = _T,
        database: str = _D,
        on_shard_error: OnShardError = "raise",
    ) -> GetResult:
        async with self._call("get", collection_id, tenant, database, writes=False) as state:
            return await self._reader.get(
                state, ids, where, limit, offset, where_document, include, on_shard_error
            )

    async def _peek(
        self, collection_id: UUID, n: int = 10, tenant: str = _T, database: str = _D
    ) -> GetResult:
        # chromadb's peek order of columns
        include: Include = ["metadatas", "documents", "embeddings"]
        async with self._call("peek", collection_id, tenant, database, writes=False) as state:
            return await self._reader.get(state, None, None, n, None, None, include, "raise")

    async def _count(
        self, collection_id: UUID, tenant: str = _T, database: str = _D, read_level: Any = None
    ) -> int:
        async with self._call("count", collection_id, tenant, database, writes=False) as state:
            return await self._reader.count(state)

    async def _query(
        self,
        collection_id: UUID,
        query_embeddings: Embeddings,
        ids: IDs | None = None,
        n_results: int = 10,
        where: Where | None = None,
        where_document: WhereDocument | None = None,
        include: Include = ["metadatas", "documents", "distances"],  # noqa: B006
        tenant: str = _T,
        database: str = _D,
        on_shard_error: OnShardError = "raise",
    ) -> QueryResult:
        async with self._call(
            "query", collection_id, tenant, database, writes=False, batch=len(query_embeddings)
        ) as state:
            return await self._reader.query(
                state,
                query_embeddings,
                ids,
                n_results,
                where,
                where_document,
                include,
                on_shard_error,
            )

    async def _modify(
        self,
        id: UUID,
        new_name: str | None = None,
        new_metadata: CollectionMetadata | None = None,
        new_configuration: UpdateCollectionConfiguration | None = None,
        tenant: str = _T,
        database: str = _D,
    ) -> None:
        state = await self._catalog.state(id, tenant, database)
        await self._catalog.modify(state, new_name, new_metadata, new_configuration)

    # -- Chroma Cloud features: part of the contract, not of a self-hosted cluster ----------

    async def _fork(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("fork is a Chroma Cloud feature; a sharded cluster has no fork")

    async def _fork_count(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("fork is a Chroma Cloud feature; a sharded cluster has no fork")

    async def _search(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "search() is a Chroma Cloud feature; use query() on a sharded cluster"
        )

    async def _get_indexing_status(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("indexing status is a Chroma Cloud feature")

    def attach_function(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("attached functions are a Chroma Cloud feature")

    def detach_function(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("attached functions are a Chroma Cloud feature")

    def get_attached_function(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("attached functions are a Chroma Cloud feature")

    # -- additions of ShardedCollection -------------------------------------------------------

    async def scan(
        self,
        collection_id: UUID,
        *,
        batch_size: int,
        where: Where | None,
        where_document: WhereDocument | None,
        include: Include,
        tenant: str,
        database: str,
        stamps: bool = False,
    ) -> AsyncIterator[GetResult]:
        state = await self._catalog.state(collection_id, tenant, database)
        pages = self._reader.scan(
            state,
            batch_size=batch_size,
            where=where,
            where_document=where_document,
            include=include,
            stamps=stamps,
        )
        # One map for the whole scan (a migration step waits for it to end), served only
        # while a page is read: never across a yield to the caller.
        async with self._hold(state, writes=False) as served:
            try:
                while True:
                    with contextlib.nullcontext() if served is None else served.active():
                        try:
                            page = await pages.__anext__()
                        except StopAsyncIteration:
                            return
                    yield page
            finally:
                closer = getattr(pages, "aclose", None)
                if closer is not None:
                    await closer()

    async def policy(self, collection_id: UUID, tenant: str, database: str) -> Any:
        return (await self._catalog.state(collection_id, tenant, database)).policy

    async def drop_partitions(
        self, collection_id: UUID, tenant: str, database: str, before: float, *, dry_run: bool
    ) -> list[tuple[str, str]]:
        state = await self._catalog.state(collection_id, tenant, database)
        return await self._layouts.drop_buckets(state, before, dry_run=dry_run)
