"""The cluster: one replica set per shard, the host's hint log, fan-out over shards and nodes,
and the facts every server of the cluster shares (batch limit, version)."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio

from .._catchup import CatchUp
from .._errors import ClientClosedError
from .._fanout import fan_out, raise_for_failures
from .._hintfile import claim_hint_file
from .._hints import HintLog
from .._node import Node
from .._nodeconfig import redact_url
from .._nodestate import NodeStates, OwnedNodeStore, SqliteNodeStore
from .._replay import ReplayTarget
from .._replicas import ReplicaSet
from .._topology import Topology
from ..observe._metrics import NodeMetrics

__all__ = ["Cluster"]

logger = logging.getLogger("sharded_chroma.client")

T = TypeVar("T")


class Cluster:
    """Shards, their nodes and transports; owns the hint log and every connection pool.

    ``replay_target`` resolves where a hinted write goes on a node; it is handed to every
    replica set at construction. ``share``, when given, makes the node-state store that
    shares this host's (in the hint log) with every other host; it then owns the local one.
    """

    def __init__(
        self,
        topology: Topology,
        replay_target: ReplayTarget,
        share: Callable[[SqliteNodeStore, Sequence[str]], OwnedNodeStore] | None = None,
    ) -> None:
        self.topology = topology
        self.shard_names: tuple[str, ...] = tuple(s.name for s in topology.shards)
        self.catalog_shard = self.shard_names[0]
        self.replication = topology.replication
        self.hints: HintLog | None = None
        self._store: OwnedNodeStore | None = None
        if any(s.replicas for s in topology.shards):
            self.hints = _open_hint_log(topology)
            local = SqliteNodeStore(self.hints.path)
            try:
                urls = [n.url for s in topology.shards for n in s.nodes]
                self._store = local if share is None else share(local, urls)
            except BaseException:
                local.close()
                self.hints.close()
                raise
        self.node_states = NodeStates(self._store)
        self.node_states.refresh()
        self.shards: dict[str, ReplicaSet] = {}
        for shard in topology.shards:
            self.shards[shard.name] = ReplicaSet(
                shard,
                topology.replication,
                self.hints,
                self.node_states,
                replay_target=replay_target,
            )
        self._preflight: dict[str, dict[str, Any]] = {}
        self.closed = False
        self.catch_up: CatchUp | None = None
        if self.hints is not None and topology.replication.replay_in_background:
            cfg = topology.replication
            self.catch_up = CatchUp(
                [rs for rs in self.shards.values() if len(rs.nodes) > 1],
                self.node_states,
                interval=cfg.replay_interval,
                probe=cfg.replay_probe,
                rate=cfg.replay_rate,
            )
            self.catch_up.start()

    @property
    def catalog_node(self) -> Node:
        return self.shards[self.catalog_shard].primary

    def all_nodes(self) -> list[Node]:
        return [n for rs in self.shards.values() for n in rs.nodes]

    def node_metrics(self) -> tuple[NodeMetrics, ...]:
        """Every node's counters now, with its hints pending as this host's state says."""
        self.node_states.refresh()
        out = []
        for rs in self.shards.values():
            for node in rs.nodes:
                stats = node.stats
                out.append(
                    NodeMetrics(
                        shard=rs.name,
                        url=redact_url(node.url),
                        role=node.role,
                        requests=stats.requests,
                        errors=stats.errors_now(),
                        in_flight=stats.in_flight,
                        latency=stats.latency.snapshot(),
                        hedges_sent=node.hedges_sent,
                        hedges_won=node.hedges_won,
                        hints_pending=self.node_states.get(node.url).pending,
                        hints_replayed=stats.replayed,
                    )
                )
        return tuple(out)

    def check_open(self) -> None:
        if self.closed:
            raise ClientClosedError("the client was closed; create a new one")

    async def call_all(
        self,
        operation: str,
        make: Callable[[str, Node], Awaitable[T]],
        shards: Sequence[str] | None = None,
    ) -> dict[str, T]:
        """Read facts (not records) from one copy of every (or the named) shard, caught up
        or not; raise if any shard failed."""
        self.check_open()
        names = self.shard_names if shards is None else shards

        def call(name: str) -> Callable[[], Awaitable[T]]:
            return lambda: self.shards[name].read(functools.partial(make, name), current=False)

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
        self.check_open()
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
                lambda node: node.transport.request("GET", "/pre-flight-checks"), current=False
            )
            cached = self._preflight[shard] = dict(answer)
        return cached

    async def get_max_batch_size(self) -> int:
        """The cluster's figure: the smallest limit of any shard, since a batch may land on one."""
        sizes = await self.call_all("get_max_batch_size", lambda n, _t: self.preflight(n))
        return _smallest_limit(sizes.values())

    async def batch_limit(self) -> int:
        """The batch limit for validating writes. Shards that cannot answer now are left out
        (all shards of a cluster normally share one limit), so a write whose records route to
        live shards is not refused because another shard is down."""
        missing = [n for n in self.shard_names if n not in self._preflight]
        if missing:
            _, failures = await fan_out({n: functools.partial(self.preflight, n) for n in missing})
            if len(failures) == len(self.shard_names):
                raise_for_failures("get_max_batch_size", failures)
        return _smallest_limit(self._preflight.values())

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

    async def reset(self) -> None:
        """Reset every node (the servers must allow it) and drop every pending hint."""
        await self.on_every_node("reset", lambda node: node.transport.request("POST", "/reset"))
        if self.hints is not None:
            for node in self.all_nodes():
                await anyio.to_thread.run_sync(self.hints.drop_node, node.url)
                await anyio.to_thread.run_sync(self.node_states.clear_repair, node.url)

    async def pending_hints(self) -> dict[str, int]:
        """Pending hint count per node URL (empty without replicas)."""
        if self.hints is None:
            return {}
        return await anyio.to_thread.run_sync(self.hints.nodes)

    async def replay_hints(self) -> int:
        """Replay every pending hint (any process's) to every node that answers now; the
        number replayed by this call (0 for a node another replayer is draining)."""
        total = 0
        for rs in self.shards.values():
            total += await rs.catch_up()
        return total

    async def aclose(self) -> None:
        self.closed = True
        # A write cut off after its concern was met is still keeping its hints: the log must
        # outlive it, or the copy would lose the write with nothing on disk to say so.
        with anyio.move_on_after(self.replication.write_grace + 10.0):
            while any(rs.writes_in_flight for rs in self.shards.values()):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        if self.catch_up is not None:
            await anyio.to_thread.run_sync(self.catch_up.close)
        for rs in self.shards.values():
            await rs.aclose()
        if self.hints is not None:
            self.hints.close()
        if self._store is not None:
            # A shared store joins its thread and revokes its lease: off the caller's loop.
            await anyio.to_thread.run_sync(self._store.close)


def _smallest_limit(preflights: Iterable[Mapping[str, Any]]) -> int:
    positive = [int(p.get("max_batch_size", -1)) for p in preflights]
    positive = [x for x in positive if x > 0]
    return min(positive) if positive else -1


def _open_hint_log(topology: Topology) -> HintLog:
    """The hint log of this cluster on this host (see ``_hintfile`` for which file), so two
    clusters used from one host never replay each other's writes, a restarted process finds
    its hints, and a topology that gained or lost a shard keeps the ones pending."""
    cfg = topology.replication
    folder = (
        Path(cfg.hints_dir)
        if cfg.hints_dir
        else Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
        / "sharded-chroma"
        / "hints"
    )
    nodes = {n.url for s in topology.shards for n in s.nodes}
    path = claim_hint_file(folder, topology.tenant, topology.database, sorted(nodes))
    log = HintLog(
        path,
        max_hints=cfg.hint_max_count,
        max_bytes=cfg.hint_max_bytes,
        max_age=cfg.hint_max_age,
    )
    try:
        outside = {n: c for n, c in log.nodes().items() if n not in nodes and c > 0}
    except BaseException:
        log.close()
        raise
    for node, count in sorted(outside.items()):
        # Kept, not dropped: a process still on the topology that had the node may replay
        # them; a removed shard's data was moved from its copies by the migration.
        logger.warning(
            "hint log %s: %d hint(s) pending for node %s, which is not in this topology",
            path.name,
            count,
            redact_url(node),
        )
    return log
