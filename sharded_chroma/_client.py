"""The client facade: chromadb's AsyncClientAPI data-plane methods over the composed runtime."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, cast
from uuid import UUID

from chromadb.api.collection_configuration import (
    CreateCollectionConfiguration,
    validate_embedding_function_conflict_on_create,
    validate_embedding_function_conflict_on_get,
)
from chromadb.api.types import (
    CollectionMetadata,
    DataLoader,
    DefaultEmbeddingFunction,
    Embeddable,
    EmbeddingFunction,
    Loadable,
    Schema,
)
from chromadb.types import Collection as CollectionModel

from ._collection import ShardedCollection
from ._errors import ClientClosedError
from ._layout import CollectionLayout, collection_layout
from ._policies import PolicyLike, build_policy
from ._runtime import Runtime
from ._status import ShardStatus, cluster_status
from ._topology import Topology
from ._transport import NodeStats
from .api._arguments import refuse_metadata_like_server, refuse_unaddressable
from .backup import ExportReport, ImportReport, export_collection, import_collection
from .control._maps import PartitionMap
from .observe import CallTrace, make_tracing
from .observe._metrics import ClientMetrics
from .rebalance._engine import MigrationReport

__all__ = ["ShardedClient"]

_DEFAULT_EF: Any = DefaultEmbeddingFunction()


class ShardedClient:
    """An async client for a cluster of Chroma servers, shaped like ``chromadb.AsyncClientAPI``.

    Create it with ``await sharded_chroma.AsyncHttpClient(...)``. Safe to share between tasks.
    Close it with ``await client.aclose()`` or use it as ``async with``; any use after closing
    raises ``ClientClosedError``.
    """

    def __init__(
        self, topology: Topology, *, tracer_provider: Any = None, meter_provider: Any = None
    ) -> None:
        self._topology = topology
        self._runtime = Runtime(topology, make_tracing(tracer_provider, meter_provider))
        self.tenant = topology.tenant
        self.database = topology.database
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def topology(self) -> Topology:
        """The validated topology this client routes by."""
        return self._topology

    def _live(self) -> Runtime:
        if self._closed:
            raise ClientClosedError("the client was closed; create a new one")
        return self._runtime

    async def aclose(self) -> None:
        """Close every connection pool. Idempotent."""
        if not self._closed:
            self._closed = True
            await self._runtime.aclose()

    async def __aenter__(self) -> ShardedClient:
        self._live()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def status(
        self, *, node_deadline: float = 10.0, probes: int = 1
    ) -> tuple[ShardStatus, ...]:
        """One entry per node (primary first within each shard): role, health, version,
        latency (p50 and p99 of ``probes`` heartbeats, and how many failed), whether it is
        behind (stale) with how many hints pending, whether it needs repair (and why) with how
        many hints are quarantined, and record counts per collection.
        The node state is the host's durable one, re-read now, so it shows what any process
        found. Unreachable nodes are reported (``healthy=False``), never raised.
        """
        return await cluster_status(
            self._live().cluster, self.tenant, self.database, node_deadline, probes
        )

    async def layout(self, name: str) -> CollectionLayout:
        """Record counts of a collection per partition (time bucket, field partition, or shard
        under hash) and per shard, with the skew between shards. Under a field or composite
        policy this reads every record's routing value once."""
        runtime = self._live()
        model = await runtime.catalog.get_collection(name, self.tenant, self.database)
        state = await runtime.catalog.state(model.id, self.tenant, self.database)
        async with runtime.epochs.serving(state, writes=False):
            return await collection_layout(runtime.router, runtime.reader, runtime.io, state)

    async def rebalance(
        self, name: str, policy: PolicyLike | None = None, **options: Any
    ) -> MigrationReport:
        """Move a collection to ``policy`` while it stays in use (None: resume the migration
        a killed run left). Needs ``[control]`` in the topology; see ``rebalance._engine``.
        Options: ``batch`` (records per page), ``rate`` (records/s per source shard),
        ``concurrency`` (source shards copied at once), ``progress`` (called with a step and a
        record count), ``ack_timeout``."""
        goal = None if policy is None else build_policy(policy)
        return await self._live().rebalancing.run(name, goal, **options)

    async def rebuild(
        self, name: str, hnsw: Mapping[str, Any] | None = None, **options: Any
    ) -> MigrationReport:
        """Copy a collection into fresh physical collections on the same shards, built with
        the index parameters in ``hnsw`` changed (``{}``: the same ones, a fresh index), and
        swap them in while it stays in use; None resumes a killed rebuild (``rebalance``
        without a policy does too). Options as for ``rebalance``; ``abort_rebalance`` rolls
        one back before it cuts over."""
        changes = None if hnsw is None else {"hnsw": dict(hnsw)}
        return await self._live().rebalancing.rebuild(name, changes, **options)

    async def abort_rebalance(self, name: str) -> MigrationReport:
        """Roll back a collection's migration (or rebuild) that has not cut over."""
        return await self._live().rebalancing.abort(name)

    async def partition_map(self, name: str) -> PartitionMap:
        """The collection's current partition map (epoch, policy, phase)."""
        return await self._live().rebalancing.current_map(name)

    async def export_collection(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        since: str | os.PathLike[str] | None = None,
        batch_size: int = 1000,
        progress: Callable[[int], None] | None = None,
        since_margin: float = 60.0,
    ) -> ExportReport:
        """Write collection ``name`` (every record of every part: ids, embeddings as float32,
        documents, metadata, uris, hidden sequence and version; the collection's metadata,
        configuration and policy) to the JSON-lines file ``path``, read in copy-proof pages
        of ``batch_size`` (bounded memory). With ``since`` (a previous export of the same
        collection), only records written after ``since_margin`` seconds before it began,
        plus the ids present now, so an import of the chain also removes deletions. Not a
        point-in-time snapshot (README, "Backups"). ``progress`` gets the records read."""
        return await export_collection(
            self,
            name,
            path,
            since=since,
            batch_size=batch_size,
            progress=progress,
            since_margin=since_margin,
        )

    async def import_collection(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        name: str | None = None,
        policy: PolicyLike | None = None,
        batch_size: int = 500,
        cursor: str | os.PathLike[str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> ImportReport:
        """Restore a chain of exports (a full one, then incremental ones in order) into
        ``name`` (default: the exported name) with ``policy`` or the exported one (a hash
        policy is re-spread over this topology's shards). Files are checked whole first: bad
        ones raise ``BackupFileError`` before anything is written. Idempotent; a killed run
        resumes from ``cursor`` (default: a file beside the first export)."""
        return await import_collection(
            self,
            paths,
            name=name,
            policy=policy,
            batch_size=batch_size,
            cursor=cursor,
            progress=progress,
        )

    def node_stats(self) -> dict[str, NodeStats]:
        """Request counters per node URL (requests, failures, latency, in flight)."""
        return {n.url: n.stats for n in self._runtime.cluster.all_nodes()}

    def metrics(self) -> ClientMetrics:
        """A snapshot of this client's counters: per node requests, errors by kind, latency
        histogram and p50/p99, in flight, hedges, hints pending and replayed; per read
        operation the shards asked and skipped (see ``sharded_chroma.prometheus_collector``)."""
        runtime = self._runtime
        return ClientMetrics(runtime.cluster.node_metrics(), runtime.fan_outs.snapshot())

    async def replay_hints(self) -> int:
        """Replay missed writes to every copy that answers now; returns how many were applied.

        Replays also happen by themselves when a copy that missed writes is used again."""
        return await self._live().cluster.replay_hints()

    def __repr__(self) -> str:
        names = ", ".join(self._runtime.cluster.shard_names)
        return (
            f"ShardedClient(shards=[{names}], tenant={self.tenant!r}, database={self.database!r})"
        )

    # -- server-wide ------------------------------------------------------------------------

    async def heartbeat(self) -> int:
        """Nanosecond heartbeat of the catalog shard, after every shard has answered."""
        return await self._live().cluster.heartbeat()

    async def get_version(self) -> str:
        return await self._live().cluster.get_version()

    async def get_max_batch_size(self) -> int:
        """The largest batch every shard accepts (the smallest shard limit)."""
        return await self._live().cluster.get_max_batch_size()

    async def reset(self) -> bool:
        """Reset every shard (the servers must allow it)."""
        return await self._live().reset()

    # -- collections ------------------------------------------------------------------------

    def _traced(self, operation: str) -> contextlib.AbstractContextManager[CallTrace]:
        """A CLIENT span for a collection-management call (a null one with tracing off)."""
        tracing = self._live().tracing
        return tracing.call(operation, tenant=self.tenant, database=self.database)

    def _wrap(
        self,
        model: CollectionModel,
        embedding_function: Any = None,
        data_loader: DataLoader[Loadable] | None = None,
    ) -> ShardedCollection:
        return ShardedCollection(
            client=cast(Any, self._runtime.server),
            model=model,
            embedding_function=embedding_function,
            data_loader=data_loader,
        )

    async def list_collections(
        self, limit: int | None = None, offset: int | None = None
    ) -> Sequence[ShardedCollection]:
        with self._traced("list_collections"):
            models = await self._live().catalog.list_collections(
                limit, offset, self.tenant, self.database
            )
        return [self._wrap(m, _DEFAULT_EF) for m in models]

    async def count_collections(self) -> int:
        with self._traced("count_collections"):
            return await self._live().catalog.count_collections(self.tenant, self.database)

    async def create_collection(
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
    ) -> ShardedCollection:
        """Create the collection on every shard; see ``AsyncClientAPI.create_collection``.

        ``policy`` places its records (``HashPolicy``, ``FieldPolicy``, ``CompositePolicy``,
        ``TimePolicy``, or a mapping with a ``kind``); without it, the topology's entry for
        this name, else a hash of the id (or of the topology's ``routing_key``). The policy is
        stored with the collection; opening it with a different one raises
        ``ConfigurationError``."""
        catalog = self._live().catalog
        if configuration is None:
            configuration = {}
        # Read before copying, as the official client reads it: a configuration that is not a
        # mapping fails here as it does there, rather than being copied into an empty one.
        configured_ef = configuration.get("embedding_function")
        configuration = cast(CreateCollectionConfiguration, dict(configuration))
        validate_embedding_function_conflict_on_create(embedding_function, configured_ef)
        if embedding_function is not None and configured_ef is None:
            configuration["embedding_function"] = embedding_function
        refuse_metadata_like_server(name, schema, configuration, metadata, get_or_create)
        with self._traced(
            "get_or_create_collection" if get_or_create else "create_collection"
        ) as t:
            t.named(name)
            model = await catalog.create_collection(
                name,
                schema,
                configuration,
                metadata,
                get_or_create,
                self.tenant,
                self.database,
                policy=policy,
            )
        if get_or_create:
            validate_embedding_function_conflict_on_get(
                embedding_function, model.configuration_json.get("embedding_function")
            )
        return self._wrap(model, embedding_function, data_loader)

    async def get_or_create_collection(
        self,
        name: str,
        schema: Schema | None = None,
        configuration: CreateCollectionConfiguration | None = None,
        metadata: CollectionMetadata | None = None,
        embedding_function: EmbeddingFunction[Embeddable] | None = _DEFAULT_EF,
        data_loader: DataLoader[Loadable] | None = None,
        *,
        policy: PolicyLike | None = None,
    ) -> ShardedCollection:
        """Get the collection, creating it (or repairing a shard missing it) if needed.

        An existing collection keeps its stored policy; a ``policy`` that differs from it
        raises ``ConfigurationError``."""
        return await self.create_collection(
            name,
            schema,
            configuration,
            metadata,
            embedding_function,
            data_loader,
            get_or_create=True,
            policy=policy,
        )

    async def get_collection(
        self,
        name: str,
        embedding_function: EmbeddingFunction[Embeddable] | None = _DEFAULT_EF,
        data_loader: DataLoader[Loadable] | None = None,
    ) -> ShardedCollection:
        catalog = self._live().catalog
        refuse_unaddressable(name)
        with self._traced("get_collection") as t:
            t.named(name)
            model = await catalog.get_collection(name, self.tenant, self.database)
        return self._opened(model, embedding_function, data_loader)

    async def get_collection_by_id(
        self,
        id: UUID,
        embedding_function: EmbeddingFunction[Embeddable] | None = _DEFAULT_EF,
        data_loader: DataLoader[Loadable] | None = None,
    ) -> ShardedCollection:
        """By the cluster's collection id (``collection.id``), stable across processes."""
        with self._traced("get_collection") as t:
            model = await self._live().catalog.get_collection_by_id(id, self.tenant, self.database)
            t.named(model.name)
        return self._opened(model, embedding_function, data_loader)

    def _opened(
        self,
        model: CollectionModel,
        embedding_function: EmbeddingFunction[Embeddable] | None,
        data_loader: DataLoader[Loadable] | None,
    ) -> ShardedCollection:
        """An existing collection, refusing an embedding function that conflicts with its own
        (chromadb's check on get)."""
        validate_embedding_function_conflict_on_get(
            embedding_function, model.configuration_json.get("embedding_function")
        )
        return self._wrap(model, embedding_function, data_loader)

    async def delete_collection(self, name: str) -> None:
        catalog = self._live().catalog
        refuse_unaddressable(name)
        with self._traced("delete_collection") as t:
            t.named(name)
            await catalog.delete_collection(name, self.tenant, self.database)
