"""``AsyncHttpClient(...)``: build a ``ShardedClient`` and connect it, as chromadb's factory
of the same name builds and checks its client."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ._client import ShardedClient
from ._errors import ConfigurationError
from ._node import Node
from ._topology import Topology

__all__ = ["AsyncHttpClient"]


async def _connect(node: Node, tenant: str, database: str) -> Any:
    # The tenant first, as the official client asks, so a wrong tenant is named as such.
    await node.transport.request("GET", f"/tenants/{tenant}")
    return await node.transport.request("GET", f"/tenants/{tenant}/databases/{database}")


async def AsyncHttpClient(
    shards: Sequence[str] | None = None,
    *,
    topology: Topology | str | os.PathLike[str] | None = None,
    tenant: str | None = None,
    database: str | None = None,
    routing_key: str | None = None,
    tracer_provider: Any = None,
    meter_provider: Any = None,
) -> ShardedClient:
    """Create a client for a sharded Chroma cluster.

    Give either ``shards`` (one Chroma server URL per shard; records placed by hash of their id)
    or ``topology`` (a ``Topology`` or the path of a TOML topology file). ``tenant``,
    ``database`` and ``routing_key`` override the topology's. Every shard's primary is asked for
    the tenant and database before the client is returned, as chromadb's client does.

    ``tracer_provider`` and ``meter_provider`` (OpenTelemetry's, optional) turn on a CLIENT
    span per collection call with a child span per node request, and the
    ``db.client.operation.duration`` histogram; the client never installs a global provider.
    """
    if (shards is None) == (topology is None):
        raise ConfigurationError("give exactly one of shards=[urls] or topology=")
    overrides = {
        k: v
        for k, v in (("tenant", tenant), ("database", database), ("routing_key", routing_key))
        if v is not None
    }
    if shards is not None:
        topo = Topology.from_urls(shards, **overrides)
    else:
        topo = topology if isinstance(topology, Topology) else Topology.from_toml(topology)  # type: ignore[arg-type]
        if overrides:
            topo = Topology.build({**topo.model_dump(), **overrides})
    client = ShardedClient(topo, tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        await client._runtime.cluster.call_all(
            "connect",
            lambda _n, node: _connect(node, topo.tenant, topo.database),
        )
    except BaseException:
        await client.aclose()
        raise
    return client
