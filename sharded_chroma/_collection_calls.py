"""What the async and the sync collection share: the arguments of the sharded additions
(``on_shard_error``, ``scan``, ``drop_partitions``) and the shaping of their answers.

Both collections are chromadb's own classes; only the await differs between them, so each
method is "validate here, call the server, shape here" with the two ends written once.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, cast

from chromadb.api.models.CollectionCommon import CollectionCommon
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

__all__ = [
    "GET_INCLUDE",
    "QUERY_INCLUDE",
    "check_batch_size",
    "cutoff_of",
    "get_call",
    "query_call",
    "scan_call",
    "shaped_get",
    "shaped_query",
]

GET_INCLUDE: Include = ["metadatas", "documents"]
QUERY_INCLUDE: Include = ["metadatas", "documents", "distances"]


def _check_mode(on_shard_error: str) -> OnShardError:
    if on_shard_error not in ("raise", "partial"):
        raise ValueError(f"on_shard_error must be 'raise' or 'partial', got {on_shard_error!r}")
    return cast(OnShardError, on_shard_error)


def get_call(
    col: CollectionCommon[Any],
    ids: OneOrMany[ID] | None,
    where: Where | None,
    limit: int | None,
    offset: int | None,
    where_document: WhereDocument | None,
    include: Include,
    on_shard_error: str,
) -> tuple[Include, dict[str, Any]]:
    """The validated ``include`` and the server's ``_get`` keywords."""
    mode = _check_mode(on_shard_error)
    request = col._validate_and_prepare_get_request(
        ids=ids, where=where, where_document=where_document, include=include
    )
    return request["include"], {
        "collection_id": col.id,
        "ids": request["ids"],
        "where": request["where"],
        "where_document": request["where_document"],
        "include": request["include"],
        "limit": limit,
        "offset": offset,
        "tenant": col.tenant,
        "database": col.database,
        "on_shard_error": mode,
    }


def shaped_get(col: CollectionCommon[Any], response: GetResult, include: Include) -> GetResult:
    result = col._transform_get_response(response=response, include=include)
    if "coverage" in response:
        result["coverage"] = response["coverage"]  # type: ignore[typeddict-item]
    return result


def query_call(
    col: CollectionCommon[Any],
    query_embeddings: OneOrMany[Embedding] | OneOrMany[PyEmbedding] | None,
    query_texts: OneOrMany[Document] | None,
    query_images: OneOrMany[Image] | None,
    query_uris: OneOrMany[URI] | None,
    ids: OneOrMany[ID] | None,
    n_results: int,
    where: Where | None,
    where_document: WhereDocument | None,
    include: Include,
    on_shard_error: str,
) -> tuple[Include, dict[str, Any]]:
    """The validated ``include`` and the server's ``_query`` keywords (embeddings computed
    here, in the caller's thread, by the collection's embedding function)."""
    mode = _check_mode(on_shard_error)
    request = col._validate_and_prepare_query_request(
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
    return request["include"], {
        "collection_id": col.id,
        "ids": request["ids"],
        "query_embeddings": request["embeddings"],
        "n_results": request["n_results"],
        "where": request["where"],
        "where_document": request["where_document"],
        "include": request["include"],
        "tenant": col.tenant,
        "database": col.database,
        "on_shard_error": mode,
    }


def shaped_query(
    col: CollectionCommon[Any], response: QueryResult, include: Include
) -> QueryResult:
    result = col._transform_query_response(response=response, include=include)
    if "coverage" in response:
        result["coverage"] = response["coverage"]  # type: ignore[typeddict-item]
    return result


def check_batch_size(batch_size: object) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def scan_call(
    col: CollectionCommon[Any],
    batch_size: int,
    where: Where | None,
    where_document: WhereDocument | None,
    include: Include,
) -> tuple[Include, dict[str, Any]]:
    """The validated ``include`` and the server's ``scan`` keywords."""
    size = check_batch_size(batch_size)
    request = col._validate_and_prepare_get_request(
        ids=None, where=where, where_document=where_document, include=include
    )
    return request["include"], {
        "collection_id": col.id,
        "batch_size": size,
        "where": request["where"],
        "where_document": request["where_document"],
        "include": request["include"],
        "tenant": col.tenant,
        "database": col.database,
    }


def cutoff_of(before: datetime | float | str) -> float:
    """``drop_partitions``' ``before`` as epoch seconds (a naive datetime is UTC)."""
    if isinstance(before, datetime):
        moment = before if before.tzinfo else before.replace(tzinfo=timezone.utc)
        return moment.timestamp()
    try:
        return parse_time(before)
    except TimeValueError as exc:
        raise ValueError(f"before: {exc}") from None
