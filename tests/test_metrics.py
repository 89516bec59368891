"""The client's own counters against real servers, and the same numbers in Prometheus' text
format through a real ``prometheus_client`` registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from chromadb.errors import NotFoundError
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import sharded_chroma
from sharded_chroma import ClientMetrics, FieldPolicy, NodeMetrics, Topology
from sharded_chroma.observe._metrics import LATENCY_BUCKETS, LatencyHistogram
from tests._proxy import FaultProxy

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("official_pools")]


def by_url(metrics: ClientMetrics) -> dict[str, NodeMetrics]:
    return {n.url: n for n in metrics.nodes}


async def test_requests_latency_and_fan_out(shard_urls: list[str]) -> None:
    topo = Topology.build(
        {
            "shards": [{"name": f"s{i}", "primary": u} for i, u in enumerate(shard_urls)],
            "policies": {
                "regional": {
                    "kind": "field",
                    "field": "region",
                    "partitions": {"eu": ["s0"], "us": ["s1"], "ap": ["s2"]},
                }
            },
        }
    )
    assert isinstance(topo.policies["regional"], FieldPolicy)
    client = await sharded_chroma.AsyncHttpClient(topology=topo)
    try:
        col = await client.create_collection("regional", embedding_function=None)
        await col.add(
            ids=["a", "b", "c"],
            embeddings=[[1.0], [2.0], [3.0]],
            metadatas=[{"region": "eu"}, {"region": "us"}, {"region": "ap"}],
        )
        before = by_url(client.metrics())
        for _ in range(5):
            await col.query(query_embeddings=[[1.0]], n_results=1)  # every shard
        for _ in range(3):
            await col.query(query_embeddings=[[1.0]], n_results=1, where={"region": "eu"})
        after = client.metrics()
    finally:
        await client.aclose()
    nodes = by_url(after)
    assert set(nodes) == set(shard_urls)
    # s0 took all 8 queries, the others the 5 unfiltered ones.
    asked = {u: nodes[u].requests - before[u].requests for u in shard_urls}
    assert asked == {shard_urls[0]: 8, shard_urls[1]: 5, shard_urls[2]: 5}
    for node in nodes.values():
        assert node.role == "primary" and node.in_flight == 0 and node.errors == {}
        lat = node.latency
        assert lat.count == node.requests
        assert lat.buckets[-1] == (LATENCY_BUCKETS[-1], lat.count)  # all under 10 s
        assert lat.p50 is not None and lat.p99 is not None and 0 < lat.p50 <= lat.p99 < 10
    query = after.calls["query"]
    assert (query.calls, query.shards_asked, query.shards_skipped) == (8, 5 * 3 + 3, 3 * 2)
    assert dict(query.fan_out)[1] == 3 and dict(query.fan_out)[4] == 8


async def test_errors_by_kind_and_prometheus_text(
    shard_urls: list[str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    proxy = FaultProxy("127.0.0.1", int(shard_urls[1].rsplit(":", 1)[1])).start()
    request.addfinalizer(proxy.stop)
    topo = Topology.build(
        {
            "shards": [{"name": "s0", "primary": shard_urls[0], "replicas": [proxy.url]}],
            "replication": {
                "write_concern": "one",
                "hints_dir": str(tmp_path / "hints"),
                "replay_in_background": False,
                "read_selection": "primary_only",
            },
        }
    )
    client = await sharded_chroma.AsyncHttpClient(topology=topo)
    try:
        col = await client.create_collection("errs", embedding_function=None)
        proxy.cut()
        await col.add(ids=["a"], embeddings=[[1.0]])  # the replica misses it: hinted
        proxy.restore()
        assert await client.replay_hints() == 1
        await client.delete_collection("errs")
        with pytest.raises(NotFoundError):
            await col.count()
        snapshot = client.metrics()
        registry = CollectorRegistry()
        registry.register(sharded_chroma.prometheus_collector(client))
        text = generate_latest(registry).decode()
    finally:
        await client.aclose()
    nodes = by_url(snapshot)
    replica = nodes[proxy.url]
    assert replica.role == "replica"
    # Cut: a pooled connection is reset, a new one refused (the write's and the replay's
    # probes may meet either).
    cut = {k: v for k, v in replica.errors.items() if k != "NotFoundError"}
    assert cut, replica
    assert set(cut) <= {
        "ClientOSError",
        "ClientConnectorError",
        "ServerDisconnectedError",
    }
    assert replica.hints_replayed == 1 and replica.hints_pending == 0
    # The count of the deleted collection: answered NotFoundError, counted by its class.
    assert nodes[shard_urls[0]].errors.get("NotFoundError", 0) >= 1

    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    labels = (("node", proxy.url), ("role", "replica"), ("shard", "s0"))
    assert samples[("sharded_chroma_node_requests_total", labels)] == replica.requests
    assert samples[("sharded_chroma_node_hints_replayed_total", labels)] == 1
    for kind, n in replica.errors.items():
        key = tuple(sorted((*labels, ("kind", kind))))
        assert samples[("sharded_chroma_node_errors_total", key)] == n
    count = ("sharded_chroma_node_request_duration_seconds_count", labels)
    assert samples[count] == replica.latency.count
    assert families["sharded_chroma_node_request_duration_seconds"].type == "histogram"
    assert families["sharded_chroma_read_fan_out_shards"].type == "histogram"


async def test_histogram_buckets_and_percentiles() -> None:
    hist = LatencyHistogram()
    for ms in range(1, 101):
        hist.observe(ms / 1000)
    snap = hist.snapshot()
    assert snap.count == 100 and snap.sum == pytest.approx(5.05)
    cumulative = dict(snap.buckets)
    assert cumulative[0.001] == 1 and cumulative[0.01] == 10 and cumulative[0.1] == 100
    assert snap.p50 == pytest.approx(0.0505) and snap.p99 == pytest.approx(0.09901)
    hist.observe(30.0)  # above the last bound: only in the count
    assert hist.snapshot().count == 101 and dict(hist.snapshot().buckets)[10.0] == 100
