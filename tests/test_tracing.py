"""OpenTelemetry: the span tree of calls against real servers, collected with the SDK's
in-memory exporter; attributes by the database semantic conventions; error paths (a node
down, a refused query); W3C trace context as it reaches a real proxy; the duration histogram;
and nothing installed globally."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from chromadb.errors import NotFoundError
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import sharded_chroma
from sharded_chroma import Topology
from tests._nginx import LocalNginx, make_certs, nginx_executable
from tests._proxy import FaultProxy

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("official_pools")]


@pytest.fixture
def exporter() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    yield provider, spans
    provider.shutdown()


def roots(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is None]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


async def test_a_query_is_one_client_span_with_a_child_per_shard(
    shard_urls: list[str], exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, spans = exporter
    before = trace.get_tracer_provider()
    client = await sharded_chroma.AsyncHttpClient(shards=shard_urls, tracer_provider=provider)
    try:
        col = await client.create_collection("traced", embedding_function=None)
        await col.add(ids=[f"i{k}" for k in range(30)], embeddings=[[k, 1.0] for k in range(30)])
        spans.clear()
        await col.query(query_embeddings=[[1.0, 1.0], [2.0, 1.0]], n_results=3)
    finally:
        await client.aclose()
    assert trace.get_tracer_provider() is before  # nothing installed globally
    got = list(spans.get_finished_spans())
    (root,) = roots(got)
    assert root.name == "query traced"
    assert root.kind is SpanKind.CLIENT
    attrs = dict(root.attributes or {})
    assert attrs["db.system.name"] == "chroma"
    assert attrs["db.namespace"] == "default_tenant|default_database"
    assert attrs["db.collection.name"] == "traced"
    assert attrs["db.operation.name"] == "query"
    assert attrs["db.operation.batch.size"] == 2
    assert (attrs["sharded_chroma.shards.asked"], attrs["sharded_chroma.shards.answered"]) == (3, 3)
    assert attrs["sharded_chroma.shards.failed"] == 0
    assert "error.type" not in attrs
    assert root.status.status_code is not StatusCode.ERROR
    shard_spans = [s for s in children(got, root) if s.name == "POST query"]
    assert len(shard_spans) == 3
    seen = set()
    for span in shard_spans:
        a = dict(span.attributes or {})
        assert span.kind is SpanKind.CLIENT
        assert span.context is not None and root.context is not None
        assert span.context.trace_id == root.context.trace_id
        assert f"http://{a['server.address']}:{a['server.port']}" in shard_urls
        assert a["sharded_chroma.node.role"] == "primary"
        assert (a["sharded_chroma.attempt"], a["sharded_chroma.hedged"]) == (1, False)
        assert a["http.response.status_code"] == 200
        seen.add(a["sharded_chroma.shard"])
    assert seen == {"s0", "s1", "s2"}
    # Every span of the call is in its tree.
    assert all(s.context is not None and s.context.trace_id == root.context.trace_id for s in got)


async def test_write_batch_size_and_a_missing_collection(
    shard_urls: list[str], exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, spans = exporter
    client = await sharded_chroma.AsyncHttpClient(shards=shard_urls, tracer_provider=provider)
    try:
        col = await client.create_collection("gone", embedding_function=None)
        spans.clear()
        await col.upsert(ids=["a", "b", "c"], embeddings=[[1.0], [2.0], [3.0]])
        (upsert,) = roots(list(spans.get_finished_spans()))
        assert upsert.name == "upsert gone"
        assert dict(upsert.attributes or {})["db.operation.batch.size"] == 3
        await client.delete_collection("gone")
        spans.clear()
        with pytest.raises(NotFoundError):
            await col.count()
    finally:
        await client.aclose()
    (failed,) = roots(list(spans.get_finished_spans()))
    assert failed.status.status_code is StatusCode.ERROR
    assert dict(failed.attributes or {})["error.type"] == "chromadb.errors.NotFoundError"


async def test_failover_and_hinted_copies_are_on_the_spans(
    request: pytest.FixtureRequest,
    shard_urls: list[str],
    tmp_path: Path,
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """A replica that is down: the write's span counts the copy it hinted; a read that tried
    it first shows two requests, attempt 1 failed on the replica and attempt 2 answered."""
    provider, spans = exporter
    proxy = FaultProxy("127.0.0.1", int(shard_urls[1].rsplit(":", 1)[1])).start()
    request.addfinalizer(proxy.stop)
    topo = Topology.build(
        {
            "shards": [{"name": "s0", "primary": shard_urls[0], "replicas": [proxy.url]}],
            "replication": {
                "write_concern": "one",
                "hints_dir": str(tmp_path / "hints"),
                "replay_in_background": False,
                "hedge_percentile": None,
                "read_selection": "round_robin",
            },
        }
    )
    client = await sharded_chroma.AsyncHttpClient(topology=topo, tracer_provider=provider)
    try:
        col = await client.create_collection("failover", embedding_function=None)
        await col.add(ids=["a"], embeddings=[[1.0]])
        proxy.cut()  # the replica goes down
        spans.clear()
        # Round robin: within two reads one starts on the replica and fails over.
        for _ in range(2):
            assert (await col.get(ids=["a"]))["ids"] == ["a"]
        reads = list(spans.get_finished_spans())
        spans.clear()
        await col.add(ids=["b"], embeddings=[[2.0]])
        (add,) = roots(list(spans.get_finished_spans()))
        assert dict(add.attributes or {})["sharded_chroma.hinted_copies"] == 1
        failed_requests = [
            s
            for s in children(list(spans.get_finished_spans()), add)
            if dict(s.attributes or {}).get("sharded_chroma.node.role") == "replica"
        ]
        assert failed_requests
        assert all(
            dict(s.attributes or {})["error.type"] == "sharded_chroma.NodeUnavailableError"
            for s in failed_requests
        )
    finally:
        await client.aclose()
    got = reads
    retried = []
    for root in roots(got):
        reqs = sorted(
            (dict(s.attributes or {}) for s in children(got, root) if s.name == "POST get"),
            key=lambda a: a["sharded_chroma.attempt"],
        )
        if len(reqs) == 2:
            retried.append(reqs)
    assert retried, "no read met the dead replica first"
    first, second = retried[0]
    assert (first["sharded_chroma.attempt"], first["sharded_chroma.node.role"]) == (1, "replica")
    assert first["error.type"] == "sharded_chroma.NodeUnavailableError"
    assert (second["sharded_chroma.attempt"], second["http.response.status_code"]) == (2, 200)


async def test_duration_histogram(shard_urls: list[str]) -> None:
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    client = await sharded_chroma.AsyncHttpClient(shards=shard_urls, meter_provider=meters)
    try:
        col = await client.create_collection("timed", embedding_function=None)
        await col.add(ids=["a"], embeddings=[[1.0]])
        for _ in range(4):
            await col.get(ids=["a"])
    finally:
        await client.aclose()
    data = reader.get_metrics_data()
    points: dict[str, Any] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == "db.client.operation.duration":
                    assert metric.unit == "s"
                    for p in metric.data.data_points:
                        points[p.attributes["db.operation.name"]] = p
    assert points["get"].count == 4 and points["add"].count == 1
    assert points["get"].attributes["db.collection.name"] == "timed"
    assert 0 < points["get"].sum < 10


async def test_trace_context_reaches_the_server(
    shard_urls: list[str],
    tmp_path: Path,
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """The ``traceparent`` each request carries, as a real nginx in front of the node logged
    it: the call's trace id and the request span's own id as parent."""
    nginx_executable()
    certs = make_certs(tmp_path / "certs")
    log_snippet = "log_format traceparent '$http_traceparent';\n"
    log_snippet += "access_log @RUN@/traceparent.log traceparent;\n"
    with LocalNginx(
        tmp_path / "nginx",
        upstream=shard_urls[0].removeprefix("http://"),
        certs=certs,
        snippets={"http-trace-log.conf": log_snippet},
    ) as proxy:
        provider, spans = exporter
        topo = Topology.build(
            {"shards": [{"name": "s0", "primary": {"url": proxy.url, "ca_file": str(certs.ca)}}]}
        )
        client = await sharded_chroma.AsyncHttpClient(topology=topo, tracer_provider=provider)
        try:
            col = await client.create_collection("ctx", embedding_function=None)
            spans.clear()
            await col.add(ids=["a"], embeddings=[[1.0]])
        finally:
            await client.aclose()
        got = list(spans.get_finished_spans())
        (root,) = roots(got)
        sent = {
            (f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}")
            for s in children(got, root)
            if s.context is not None
        }
        # nginx logs a request once it has finished it, which can be just after the client
        # has its answer.
        deadline = time.monotonic() + 5.0
        while True:
            logged = (proxy.run_dir / "traceparent.log").read_text().split()
            received = {tuple(v.split("-")[1:3]) for v in logged if v.startswith("00-")}
            if sent <= received or time.monotonic() > deadline:
                break
            await anyio.sleep(0.05)
    assert sent and sent <= received


async def test_collection_management_calls_are_spans(
    shard_urls: list[str], exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, spans = exporter
    client = await sharded_chroma.AsyncHttpClient(shards=shard_urls, tracer_provider=provider)
    try:
        spans.clear()
        col = await client.create_collection("ddl", embedding_function=None)
        await client.get_collection("ddl", embedding_function=None)
        await client.get_collection_by_id(col.id, embedding_function=None)
        await client.get_or_create_collection("ddl", embedding_function=None)
        assert await client.count_collections() == 1
        await client.list_collections()
        await client.delete_collection("ddl")
    finally:
        await client.aclose()
    got = list(spans.get_finished_spans())
    names = [s.name for s in sorted(roots(got), key=lambda s: s.start_time or 0)]
    assert names == [
        "create_collection ddl",
        "get_collection ddl",
        "get_collection ddl",
        "get_or_create_collection ddl",
        "count_collections",
        "list_collections",
        "delete_collection ddl",
    ]
    create = next(s for s in roots(got) if s.name == "create_collection ddl")
    # Created on every shard: one request span per shard at least, all under the call.
    shards = {dict(s.attributes or {})["sharded_chroma.shard"] for s in children(got, create)}
    assert shards == {"s0", "s1", "s2"}


async def test_a_hedged_read_and_the_epoch_are_on_the_spans(
    request: pytest.FixtureRequest,
    shard_urls: list[str],
    tmp_path: Path,
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """Both copies answer slowly: the read is hedged to the other copy, whose request span
    says ``hedged``; the metrics count the hedge sent. With a control store the call carries
    its map's epoch."""
    provider, spans = exporter
    slow = [FaultProxy("127.0.0.1", int(u.rsplit(":", 1)[1])).start() for u in shard_urls[:2]]
    for proxy in slow:
        request.addfinalizer(proxy.stop)
    topo = Topology.build(
        {
            "shards": [{"name": "s0", "primary": slow[0].url, "replicas": [slow[1].url]}],
            "replication": {
                "hints_dir": str(tmp_path / "hints"),
                "hedge_after": 0.05,
                "hedge_percentile": None,
                "hedge_budget": 1.0,
            },
            "control": {"backend": "sqlite", "path": str(tmp_path / "control.db")},
        }
    )
    client = await sharded_chroma.AsyncHttpClient(topology=topo, tracer_provider=provider)
    try:
        col = await client.create_collection("hedged", embedding_function=None)
        await col.add(ids=["a"], embeddings=[[1.0]])
        for _ in range(2):  # physical ids looked up on both copies before the delay
            await col.get(ids=["a"])
        for proxy in slow:
            proxy.set_latency(0.3)
        spans.clear()
        assert (await col.get(ids=["a"]))["ids"] == ["a"]
        metrics = {n.role: n for n in client.metrics().nodes}
    finally:
        await client.aclose()
    got = list(spans.get_finished_spans())
    (root,) = roots(got)
    assert dict(root.attributes or {})["sharded_chroma.epoch"] == 0
    reqs = [dict(s.attributes or {}) for s in children(got, root) if s.name == "POST get"]
    hedged = [a for a in reqs if a["sharded_chroma.hedged"]]
    first = [a for a in reqs if not a["sharded_chroma.hedged"]]
    assert len(hedged) == 1 and len(first) == 1
    roles = {hedged[0]["sharded_chroma.node.role"], first[0]["sharded_chroma.node.role"]}
    assert roles == {"primary", "replica"}
    assert hedged[0]["sharded_chroma.attempt"] == first[0]["sharded_chroma.attempt"] == 1
    assert sum(n.hedges_sent for n in metrics.values()) == 1
