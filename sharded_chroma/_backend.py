"""The sharded server API: the methods chromadb's AsyncCollection calls on its "server", done
across shards. This module holds the catalog (collections) and shared plumbing; record
operations are in ``_records``.

One physical collection of the same name exists on every node (every copy of every shard). The
cluster's id for a logical collection is the id of its physical collection on the first shard's
primary (the catalog node), which is stable across processes and unique per creation, exactly
like a single server's id; the other nodes carry it in reserved metadata (``_sc_id``) so the
catalog can be read from a replica when the catalog node is down. Each node has its own physical
id for the collection; requests are addressed per node.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import anyio
from chromadb.errors import NotFoundError

from ._errors import (
    ClientClosedError,
)
from ._fanout import fan_out, raise_for_failures
from ._hints import HintLog
from ._replicas import HintTarget, Node, ReplicaSet
from ._topology import Topology
from ._transport import iter_collections

__all__ = [
    "RESERVED_PREFIX",
    "SEQ_KEY",
    "BackendCore",
    "CollectionState",
    "reject_reserved",
    "strip_reserved",
]

logger = logging.getLogger("sharded_chroma.client")

T = TypeVar("T")

RESERVED_PREFIX = "_sc_"
SEQ_KEY = "_sc_seq"
"""Hidden per-record sequence (a hybrid logical clock value): the cluster's insertion order."""
_ROUTING_META = "_sc_routing"
"""The collection's placement policy as JSON (a bare field name in collections made before
policies existed)."""
_SLOTS_META = "_sc_slots"
_ID_META = "_sc_id"
_PARENT_META = "_sc_parent"
"""On a time bucket's physical collection: the cluster id of the collection it belongs to."""
_BUCKET_META = "_sc_bucket"


def reject_reserved(keys: Iterable[Any], what: str) -> None:
    """Reserved keys are invisible: writing or filtering on one is a clear error."""
    for key in keys:
        if isinstance(key, str) and key.startswith(RESERVED_PREFIX):
            raise ValueError(
                f"{what} key {key!r} uses the prefix {RESERVED_PREFIX!r}, "
                "which sharded_chroma reserves"
            )


def strip_reserved(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if metadata is None:
        return None
    clean = {k: v for k, v in metadata.items() if not k.startswith(RESERVED_PREFIX)}
    return clean or None


@dataclass
class CollectionState:
    """What one client knows about a logical collection: its physical ids and cluster facts."""

    id: UUID
    name: str
    tenant: str
    database: str
    physical: dict[str, UUID]
    """Physical collection id per node URL, filled as nodes are first addressed."""
    policy: Any
    """The placement policy (a ``_policies.Policy``), the same for every client."""
    dimension: int | None = None
    configuration: dict[str, Any] | None = None
    """The physical collections' configuration, given to time buckets as they are created."""
    bucket: str | None = None
    """Set on the state of one time bucket's physical collection (see ``_parts``)."""
    buckets: dict[str, CollectionState] = field(default_factory=dict)
    """States of this collection's time buckets by label, as this client has met them."""

    @property
    def base(self) -> str:
        return f"/tenants/{self.tenant}/databases/{self.database}/collections"


class _HybridClock:
    """Microsecond wall clock that never repeats or goes back within a process."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> int:
        with self._lock:
            base = max(time.time_ns() // 1000, self._last + 1)
            self._last = base + max(n, 1) - 1
            return base


class BackendCore:
    """Shards, their transports and the collections catalog."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.shard_names: tuple[str, ...] = tuple(s.name for s in topology.shards)
        self.catalog_shard = self.shard_names[0]
        self.replication = topology.replication
        self._hints: HintLog | None = None
        if any(s.replicas for s in topology.shards):
            self._hints = _open_hint_log(topology)
        self.shards: dict[str, ReplicaSet] = {}
        for shard in topology.shards:
            rs = ReplicaSet(shard, topology.replication, lambda: self._hints)
            rs.replay_target = self._replay_path
            if self._hints is not None:
                rs.mark_pending(self._hints.nodes())
            self.shards[shard.name] = rs
        self.clock = _HybridClock()
        self._states: dict[UUID, CollectionState] = {}
        self._preflight: dict[str, dict[str, Any]] = {}
        # Locks belong to one event loop; threads that each run their own loop (sync wrappers)
        # get their own locks, and order only matters within one loop anyway.
        self._write_locks: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[tuple[UUID, str], anyio.Lock]
        ] = weakref.WeakKeyDictionary()
        self._locks_guard = threading.Lock()
        self.closed = False

    def _write_lock(self, state: CollectionState, shard: str) -> anyio.Lock:
        loop = asyncio.get_running_loop()
        with self._locks_guard:
            locks = self._write_locks.setdefault(loop, {})
            key = (state.id, shard)
            lock = locks.get(key)
            if lock is None:
                lock = locks[key] = anyio.Lock()
            return lock

    # -- plumbing ---------------------------------------------------------------------------

    def _base(self, tenant: str, database: str) -> str:
        return f"/tenants/{tenant}/databases/{database}"

    @property
    def catalog_node(self) -> Node:
        return self.shards[self.catalog_shard].primary

    def all_nodes(self) -> list[Node]:
        return [n for rs in self.shards.values() for n in rs.nodes]

    def _check_open(self) -> None:
        if self.closed:
            raise ClientClosedError("the client was closed; create a new one")

    async def call_all(
        self,
        operation: str,
        make: Callable[[str, Node], Awaitable[T]],
        shards: Sequence[str] | None = None,
    ) -> dict[str, T]:
        """Read from one copy of every (or the named) shard; raise if any shard failed."""
        self._check_open()
        names = self.shard_names if shards is None else shards

        def call(name: str) -> Callable[[], Awaitable[T]]:
            return lambda: self.shards[name].read(functools.partial(make, name))

        results, failures = await fan_out({n: call(n) for n in names})
        raise_for_failures(operation, failures)
        return results

    async def on_every_node(
        self,
        operation: str,
        make: Callable[[Node], Awaitable[T]],
        nodes: Sequence[Node] | None = None,
        *,
        tolerate: tuple[type[BaseException], ...] = (),
    ) -> dict[str, T]:
        """Run a catalog change on every copy of every shard; all must answer, because a copy
        that missed a catalog change (a delete, a rename) would bring old data back later."""
        self._check_open()
        targets = self.all_nodes() if nodes is None else nodes
        results, failures = await fan_out({n.url: functools.partial(make, n) for n in targets})
        raise_for_failures(
            operation, {k: e for k, e in failures.items() if not isinstance(e, tolerate)}
        )
        return results

    async def preflight(self, shard: str) -> dict[str, Any]:
        cached = self._preflight.get(shard)
        if cached is None:
            answer = await self.shards[shard].read(
                lambda node: node.transport.request("GET", "/pre-flight-checks")
            )
            cached = self._preflight[shard] = dict(answer)
        return cached

    async def node_path(self, state: CollectionState, node: Node, suffix: str = "") -> str:
        """The request path of a collection on one node, looking its physical id up once."""
        pid = state.physical.get(node.url)
        if pid is None:
            pid = await self._find_on_node(
                node,
                state.tenant,
                state.database,
                state.id,
                state.name,
                # A bucket's name never changes (it is made of the cluster id and its label).
                by_name_only=state.bucket is not None,
            )
            state.physical[node.url] = pid
        return f"{state.base}/{pid}{suffix}"

    def _is_cluster_collection(self, raw: Mapping[str, Any], node: Node, cluster_id: UUID) -> bool:
        marked = (raw.get("metadata") or {}).get(_ID_META)
        if marked is not None:
            return str(marked) == str(cluster_id)
        return node is self.catalog_node and str(raw["id"]) == str(cluster_id)

    async def _find_on_node(
        self,
        node: Node,
        tenant: str,
        database: str,
        cluster_id: UUID,
        name: str,
        *,
        by_name_only: bool = False,
    ) -> UUID:
        """A node's physical id of the cluster collection ``cluster_id``.

        Found by name first, but only trusted when the cluster id matches: the collection may
        have been renamed, or deleted and re-created under the same name, since the caller
        learnt the name (hints can be days old). Raises NotFoundError when it is gone.
        """
        base = self._base(tenant, database) + "/collections"
        try:
            raw = await node.transport.request("GET", f"{base}/{name}")
            if self._is_cluster_collection(raw, node, cluster_id):
                return UUID(str(raw["id"]))
        except NotFoundError:
            pass
        if not by_name_only:
            async for raw in iter_collections(node.transport, base):
                if self._is_cluster_collection(raw, node, cluster_id):
                    return UUID(str(raw["id"]))
        raise NotFoundError(f"Collection [{cluster_id}] does not exist")

    async def _replay_path(self, node: Node, target: HintTarget) -> str:
        cluster_id = UUID(target.collection_id)
        state = self._states.get(cluster_id)
        if state is not None and node.url in state.physical:
            return await self.node_path(state, node, f"/{target.op}")
        pid = await self._find_on_node(
            node, target.tenant, target.database, cluster_id, target.collection_name
        )
        base = self._base(target.tenant, target.database)
        return f"{base}/collections/{pid}/{target.op}"

    async def get_max_batch_size(self) -> int:
        """The cluster's figure: the smallest limit of any shard, since a batch may land on one."""
        sizes = await self.call_all("get_max_batch_size", lambda n, _t: self.preflight(n))
        return self._smallest_limit(sizes.values())

    async def _batch_limit(self) -> int:
        """The batch limit for validating writes. Shards that cannot answer now are left out
        (all shards of a cluster normally share one limit), so a write whose records route to
        live shards is not refused because another shard is down."""
        missing = [n for n in self.shard_names if n not in self._preflight]
        if missing:
            _, failures = await fan_out({n: functools.partial(self.preflight, n) for n in missing})
            if len(failures) == len(self.shard_names):
                raise_for_failures("get_max_batch_size", failures)
        return self._smallest_limit(self._preflight.values())

    @staticmethod
    def _smallest_limit(preflights: Iterable[Mapping[str, Any]]) -> int:
        positive = [int(p.get("max_batch_size", -1)) for p in preflights]
        positive = [x for x in positive if x > 0]
        return min(positive) if positive else -1

    # -- server-wide ------------------------------------------------------------------------

    async def heartbeat(self) -> int:
        beats = await self.call_all(
            "heartbeat", lambda _n, node: node.transport.request("GET", "/heartbeat")
        )
        return int(beats[self.catalog_shard]["nanosecond heartbeat"])

    async def get_version(self) -> str:
        versions = await self.call_all(
            "get_version", lambda _n, node: node.transport.request("GET", "/version")
        )
        if len(set(versions.values())) > 1:
            logger.warning("shards run different Chroma versions: %s", versions)
        return str(versions[self.catalog_shard])

    async def reset(self) -> bool:
        await self.on_every_node("reset", lambda node: node.transport.request("POST", "/reset"))
        self._states.clear()
        if self._hints is not None:
            for node in self.all_nodes():
                await anyio.to_thread.run_sync(self._hints.drop_node, node.url)
                node.stale = False
        return True

    async def pending_hints(self) -> dict[str, int]:
        """Pending hint count per node URL (empty without replicas)."""
        if self._hints is None:
            return {}
        return await anyio.to_thread.run_sync(self._hints.nodes)

    async def replay_hints(self) -> int:
        """Replay every pending hint to every node that answers now; the number replayed."""
        total = 0
        for rs in self.shards.values():
            for node in rs.nodes:
                if node.stale:
                    total += await rs.replay(node)
        return total

    async def aclose(self) -> None:
        self.closed = True
        for rs in self.shards.values():
            await rs.aclose()
        if self._hints is not None:
            self._hints.close()


def _open_hint_log(topology: Topology) -> HintLog:
    """The hint log of this cluster: one SQLite file per set of nodes, so two clusters used from
    one host never replay each other's writes, and a restarted process finds its hints."""
    cfg = topology.replication
    folder = (
        Path(cfg.hints_dir)
        if cfg.hints_dir
        else Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
        / "sharded-chroma"
        / "hints"
    )
    nodes = sorted(n.url for s in topology.shards for n in s.nodes)
    key = hashlib.sha256("\n".join([topology.tenant, topology.database, *nodes]).encode())
    return HintLog(
        folder / f"{key.hexdigest()[:16]}.sqlite3",
        max_hints=cfg.hint_max_count,
        max_bytes=cfg.hint_max_bytes,
        max_age=cfg.hint_max_age,
    )
