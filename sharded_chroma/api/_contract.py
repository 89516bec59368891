"""The narrow server contract chromadb's collection classes call.

chromadb's ``AsyncCollection`` (and the sync ``Collection``) validate and shape everything
themselves and then call a handful of private methods on their "client". ``CollectionServer``
is exactly that set; ``tests/test_server_contract.py`` reads the installed chromadb's sources
and fails when the collection classes call a name the adapter lacks, so a chromadb upgrade
that changes the contract fails loudly instead of at a user's first call.
"""

from __future__ import annotations

from typing import Any, Protocol
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

__all__ = ["CLOUD_ONLY", "CollectionServer"]

_T = "default_tenant"
_D = "default_database"

CLOUD_ONLY = ("_fork", "_fork_count", "_search", "_get_indexing_status")
"""Contract methods for Chroma Cloud features, which a self-hosted cluster does not have."""


class CollectionServer(Protocol):
    """What chromadb's ``AsyncCollection`` calls on its client (chromadb >=1.5.9,<1.6); the
    Cloud-only calls are part of it, since the class still makes them."""

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
    ) -> bool: ...

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
    ) -> bool: ...

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
    ) -> bool: ...

    async def _delete(
        self,
        collection_id: UUID,
        ids: IDs | None = None,
        where: Where | None = None,
        where_document: WhereDocument | None = None,
        limit: int | None = None,
        tenant: str = _T,
        database: str = _D,
    ) -> DeleteResult: ...

    async def _get(
        self,
        collection_id: UUID,
        ids: IDs | None = None,
        where: Where | None = None,
        limit: int | None = None,
        offset: int | None = None,
        where_document: WhereDocument | None = None,
        include: Include = ...,
        tenant: str = _T,
        database: str = _D,
    ) -> GetResult: ...

    async def _peek(
        self, collection_id: UUID, n: int = 10, tenant: str = _T, database: str = _D
    ) -> GetResult: ...

    async def _count(
        self, collection_id: UUID, tenant: str = _T, database: str = _D, read_level: Any = None
    ) -> int: ...

    async def _query(
        self,
        collection_id: UUID,
        query_embeddings: Embeddings,
        ids: IDs | None = None,
        n_results: int = 10,
        where: Where | None = None,
        where_document: WhereDocument | None = None,
        include: Include = ...,
        tenant: str = _T,
        database: str = _D,
    ) -> QueryResult: ...

    async def _modify(
        self,
        id: UUID,
        new_name: str | None = None,
        new_metadata: CollectionMetadata | None = None,
        new_configuration: UpdateCollectionConfiguration | None = None,
        tenant: str = _T,
        database: str = _D,
    ) -> None: ...

    async def _fork(self, *args: Any, **kwargs: Any) -> Any: ...

    async def _fork_count(self, *args: Any, **kwargs: Any) -> Any: ...

    async def _search(self, *args: Any, **kwargs: Any) -> Any: ...

    async def _get_indexing_status(self, *args: Any, **kwargs: Any) -> Any: ...
