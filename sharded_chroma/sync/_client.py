"""``HttpClient(...)``: the sync client, shaped like ``chromadb.HttpClient``'s ``ClientAPI``.

It owns one portal (an event loop on a thread of its own) and one async ``ShardedClient``
living on it; every method is the async client's, called through the portal. Collections are
chromadb's sync ``Collection`` over the same server contract.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, cast
from uuid import UUID

from chromadb.api.collection_configuration import CreateCollectionConfiguration
from chromadb.api.types import (
    CollectionMetadata,
    DataLoader,
    Embeddable,
    EmbeddingFunction,
    Loadable,
    Schema,
)

from .._client import _DEFAULT_EF, ShardedClient
from .._collection import ShardedCollection
from .._errors import ClientClosedError
from .._factory import AsyncHttpClient
from .._layout import CollectionLayout
from .._policies import PolicyLike
from .._status import ShardStatus
from .._topology import Topology
from .._transport import NodeStats
from ..backup import ExportReport, ImportReport
from ..control._maps import PartitionMap
from ..observe._metrics import ClientMetrics
from ..rebalance._engine import MigrationReport
from ._collection import SyncShardedCollection
from ._portal import Portal
from ._server import SyncServer

__all__ = ["HttpClient", "SyncShardedClient"]


def HttpClient(
    shards: Sequence[str] | None = None,
    *,
    topology: Topology | str | os.PathLike[str] | None = None,
    tenant: str | None = None,
    database: str | None = None,
    routing_key: str | None = None,
    tracer_provider: Any = None,
    meter_provider: Any = None,
) -> SyncShardedClient:
    """Create a sync client for a sharded Chroma cluster: the arguments of
    ``sharded_chroma.AsyncHttpClient``, the methods of ``chromadb.HttpClient``.

    Starts one event loop on a background thread for this client; ``close()`` (or ``with``)
    stops it. Safe to use from many threads at once.
    """
    portal = Portal()
    try:
        inner = portal.call(
            AsyncHttpClient,
            shards,
            topology=topology,
            tenant=tenant,
            database=database,
            routing_key=routing_key,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
    except BaseException:
        portal.close()
        raise
    return SyncShardedClient(portal, inner)


class SyncShardedClient:
    """A sync client for a cluster of Chroma servers, shaped like ``chromadb.ClientAPI``.

    Create it with ``sharded_chroma.HttpClient(...)``. Every call runs on the client's own
    event loop thread, in a copy of the caller's context variables (``sharded_chroma.options``
    and the current OpenTelemetry span follow it). Close it with ``close()`` or ``with``; any
    use after closing raises ``ClientClosedError``.
    """

    def __init__(self, portal: Portal, inner: ShardedClient) -> None:
        self._portal = portal
        self._inner = inner
        self._server = SyncServer(portal, inner._runtime.server, inner.get_max_batch_size)
        self.tenant = inner.tenant
        self.database = inner.database

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def topology(self) -> Topology:
        """The validated topology this client routes by."""
        return self._inner.topology

    def close(self) -> None:
        """Close every connection pool and stop the client's event loop. Idempotent."""
        self._portal.close(self._inner.aclose)

    def __enter__(self) -> SyncShardedClient:
        if self._portal.closed:
            raise ClientClosedError("the client was closed; create a new one")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return "Sync" + repr(self._inner)

    def _collection(self, col: ShardedCollection) -> SyncShardedCollection:
        # The async collection was made on the loop only to run the client's own checks; its
        # model and functions are what chromadb's sync class needs.
        return SyncShardedCollection(
            client=cast(Any, self._server),
            model=col._model,
            embedding_function=col._embedding_function,
            data_loader=col._data_loader,
        )

    # -- operations ---------------------------------------------------------------------------

    def status(self, *, node_deadline: float = 10.0, probes: int = 1) -> tuple[ShardStatus, ...]:
        """See ``ShardedClient.status``."""
        return self._portal.call(self._inner.status, node_deadline=node_deadline, probes=probes)

    def layout(self, name: str) -> CollectionLayout:
        """See ``ShardedClient.layout``."""
        return self._portal.call(self._inner.layout, name)

    def rebalance(
        self, name: str, policy: PolicyLike | None = None, **options: Any
    ) -> MigrationReport:
        """See ``ShardedClient.rebalance`` (a ``progress`` callback runs on the client's
        loop thread)."""
        return self._portal.call(self._inner.rebalance, name, policy, **options)

    def rebuild(
        self, name: str, hnsw: Mapping[str, Any] | None = None, **options: Any
    ) -> MigrationReport:
        """See ``ShardedClient.rebuild``."""
        return self._portal.call(self._inner.rebuild, name, hnsw, **options)

    def abort_rebalance(self, name: str) -> MigrationReport:
        return self._portal.call(self._inner.abort_rebalance, name)

    def partition_map(self, name: str) -> PartitionMap:
        return self._portal.call(self._inner.partition_map, name)

    def export_collection(
        self, name: str, path: str | os.PathLike[str], **options: Any
    ) -> ExportReport:
        """See ``ShardedClient.export_collection`` (``progress`` runs on the loop thread)."""
        return self._portal.call(self._inner.export_collection, name, path, **options)

    def import_collection(
        self, paths: Sequence[str | os.PathLike[str]], **options: Any
    ) -> ImportReport:
        """See ``ShardedClient.import_collection`` (``progress`` runs on the loop thread)."""
        return self._portal.call(self._inner.import_collection, paths, **options)

    def node_stats(self) -> dict[str, NodeStats]:
        return self._inner.node_stats()

    def metrics(self) -> ClientMetrics:
        """See ``ShardedClient.metrics``."""
        return self._inner.metrics()

    def replay_hints(self) -> int:
        """See ``ShardedClient.replay_hints``."""
        return self._portal.call(self._inner.replay_hints)

    # -- server-wide ------------------------------------------------------------------------

    def heartbeat(self) -> int:
        return self._portal.call(self._inner.heartbeat)

    def get_version(self) -> str:
        return self._portal.call(self._inner.get_version)

    def get_max_batch_size(self) -> int:
        """The largest batch every shard accepts (the smallest shard limit)."""
        return self._portal.call(self._inner.get_max_batch_size)

    def reset(self) -> bool:
        return self._portal.call(self._inner.reset)

    # -- collections ------------------------------------------------------------------------

    def list_collections(
        self, limit: int | None = None, offset: int | None = None
    ) -> Sequence[SyncShardedCollection]:
        cols = self._portal.call(self._inner.list_collections, limit, offset)
        return [self._collection(c) for c in cols]

    def count_collections(self) -> int:
        return self._portal.call(self._inner.count_collections)

    def create_collection(
        self,
        name: str,
        schema: Schema | None = None,
        configuration: CreateCollectionConfiguration | None = None,
        metadata: CollectionMetadata | None = None,
        embedding_function: EmbeddingFunction[Embeddable] | None = _DEFAULT_EF,
        data_loader: DataLoader[Loadable] | None = None,
        get_or_create: bool = False,
        *,
        policy: PolicyLike | None = None,
    ) -> SyncShardedCollection:
        """See ``ShardedClient.create_collection``."""
        col = self._portal.call(
            self._inner.create_collection,
            name,
            schema,
            configuration,
            metadata,
            embedding_function,
            data_loader,
            get_or_create,
            policy=policy,
        )
        return self._collection(col)

    def get_or_create_collection(
        self,
        name: str,
        schema: Schema | None = None,
        configuration: CreateCollectionConfiguration | None = None,
        metadata: CollectionMetadata | None = None,
        embedding_function: EmbeddingFunction[Embeddable] | None = _DEFAULT_EF,
        data_loader: DataLoader[Loadable] | None = None,
        *,
        policy: PolicyLike | None = None,
    ) -> SyncShardedCollection:
        """See ``ShardedClient.get_or_create_collection``."""
        return self.create_collection(
            name,
            schema,
            configuration,
            metadata,
            embedding_function,
            data_loader,
            get_or_create=True,
            policy=policy,
        )

    def get_collection(
        self,
        name: str,
        embedding_function: EmbeddingFunction[Embeddable] | None = _DEFAULT_EF,
        data_loader: DataLoader[Loadable] | None = None,
    ) -> SyncShardedCollection:
        col = self._portal.call(self._inner.get_collection, name, embedding_function, data_loader)
        return self._collection(col)

    def get_collection_by_id(
        self,
        id: UUID,
        embedding_function: EmbeddingFunction[Embeddable] | None = _DEFAULT_EF,
        data_loader: DataLoader[Loadable] | None = None,
    ) -> SyncShardedCollection:
        """By the cluster's collection id (``collection.id``), stable across processes."""
        col = self._portal.call(
            self._inner.get_collection_by_id, id, embedding_function, data_loader
        )
        return self._collection(col)

    def delete_collection(self, name: str) -> None:
        self._portal.call(self._inner.delete_collection, name)
