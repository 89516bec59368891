"""The composition root: builds every component of a client once, bottom up, and closes them.

Each component owns its state and is handed the components below it at construction; none
calls upward and none is wired after construction. A request flows down once:

    ShardedCollection (chromadb's) -> ShardedServer -> Reader | WritePath -> Router, Locator,
    RecordSender, Mover -> PartIO -> Cluster -> ReplicaSet -> NodeTransport

with the catalog (DDL, collection states), the part layouts (time buckets) and the physical
ids beside them.
"""

from __future__ import annotations

import functools

import anyio.to_thread

from ._topology import Topology
from .api._server import ShardedServer
from .catalog._catalog import Catalog
from .catalog._generations import Generations
from .catalog._layouts import PartLayouts
from .catalog._physical import PhysicalIds
from .catalog._state import StateCache
from .cluster._cluster import Cluster
from .control._epochs import Epochs
from .control._nodes import SharedNodeStore
from .control._open import open_backend
from .control._served import NO_EPOCHS, NoEpochs
from .observe import NO_TRACING, Tracing
from .observe._metrics import FanOutCounter
from .ops._clock import HybridClock
from .ops._locator import Locator
from .ops._moves import Mover
from .ops._ordering import IdOrdering
from .ops._partio import PartIO
from .ops._reader import Reader
from .ops._removal import Remover
from .ops._repair import ReadRepair
from .ops._router import Router
from .ops._sender import RecordSender
from .ops._tombstones import Tombstones
from .ops._writepath import WritePath
from .rebalance._service import Rebalancing

__all__ = ["Runtime"]


class Runtime:
    """Every component of one client; ``aclose`` closes what they hold (pools, hint log)."""

    def __init__(self, topology: Topology, tracing: Tracing = NO_TRACING) -> None:
        self.topology = topology
        self.tracing = tracing
        self.states = StateCache()
        catalog_url = topology.shards[0].nodes[0].url
        self.physical = PhysicalIds(catalog_url, self.states)
        share = None
        if topology.control is not None:
            # Every host's node state (stale, needs repair) through the control store.
            share = functools.partial(
                SharedNodeStore,
                open_backend=functools.partial(open_backend, topology),
                lease_ttl=topology.control.lease_ttl,
                timeout=topology.control.timeout,
            )
        self.cluster = Cluster(topology, self.physical.replay_path, share)
        self.layouts = PartLayouts(self.cluster, self.physical)
        self.catalog = Catalog(self.cluster, self.physical, self.layouts, self.states)
        self.clock = HybridClock()
        self.router = Router(self.cluster.shard_names, self.layouts)
        self.io = PartIO(self.cluster, self.physical, self.clock)
        self.fan_outs = FanOutCounter()
        self.reader = Reader(
            self.cluster,
            self.router,
            self.io,
            ReadRepair(self.io, self.clock, topology.repair_after),
            self.fan_outs,
        )
        self.locator = Locator(self.router, self.layouts, self.io, self.clock)
        sender = RecordSender(self.cluster, self.layouts, self.physical, self.io, self.clock)
        remover = Remover(self.io)
        # Marks outlive any move in flight by far; reads wait repair_after before cleaning up.
        keep = max(300.0, 2 * topology.repair_after)
        tombstones = Tombstones(
            self.cluster, self.layouts, self.physical, self.io, self.clock, keep
        )
        mover = Mover(self.router, self.layouts, self.locator, sender, remover, tombstones)
        self.writer = WritePath(
            self.cluster,
            self.router,
            self.layouts,
            self.locator,
            sender,
            mover,
            remover,
            tombstones,
            self.reader,
            IdOrdering(),
        )
        self.epochs: Epochs | NoEpochs = NO_EPOCHS
        if topology.control is not None:
            self.epochs = Epochs(
                lambda: open_backend(topology), lease_ttl=topology.control.lease_ttl
            )
        self.rebalancing = Rebalancing(
            topology,
            self.catalog,
            self.io,
            self.cluster,
            self.layouts,
            Generations(self.cluster, self.physical),
        )
        self.server = ShardedServer(
            self.catalog, self.layouts, self.reader, self.writer, self.epochs, tracing
        )

    async def reset(self) -> bool:
        """Reset every node and forget every collection this client knew."""
        await self.cluster.reset()
        self.states.clear()
        return True

    async def aclose(self) -> None:
        # Joins the follower's thread, which revokes the lease: off the caller's loop.
        await anyio.to_thread.run_sync(self.epochs.close)
        await self.cluster.aclose()
