"""The sync client (``sharded_chroma.HttpClient``) on its own: many threads on one client keep
the per-id ordering promises, the caller's context reaches each call, results are chromadb's
plain dicts, and the client's loop thread ends with ``close()``.

The compatibility and differential suites also run through this client (``connect``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import chromadb
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import sharded_chroma
from sharded_chroma.testing import LocalChromaServer
from sharded_chroma.testing._ports import find_free_port
from tests._syncview import SyncView
from tests.test_concurrent_writes import (
    NAME,
    POLICIES,
    REPAIR_AFTER,
    assert_busy,
    assert_clean,
    pool_of,
    violations,
    writers,
)


def _portal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sharded-chroma-portal")]


@pytest.mark.parametrize("kind", ["hash", "field"])
def test_threads_on_one_sync_client_keep_per_id_order(shard_urls: list[str], kind: str) -> None:
    """Twelve writers, each call in a thread of its own, on one sync client and a pool of 30
    ids; the history checker reads the final state and every part's raw ids afterwards."""
    topology = sharded_chroma.Topology.from_urls(shard_urls, repair_after=REPAIR_AFTER)
    with sharded_chroma.HttpClient(topology=topology) as client:
        col = SyncView(
            client.create_collection(NAME, embedding_function=None, policy=POLICIES[kind])
        )

        async def run() -> Any:
            log = await writers(col, "s", 12, pool_of(30), 5.0)
            return log, await violations(col, shard_urls, log.ops)

        log, (found, count, distinct) = asyncio.run(run())
    assert_busy(log.ops, log.errors)
    assert_clean(found, count, distinct, log.ops, log.errors)


def test_results_are_chromadbs_plain_dicts_and_collections_its_class(shard_urls: list[str]) -> None:
    with sharded_chroma.HttpClient(shards=shard_urls) as client:
        col = client.create_collection("plain", embedding_function=None)
        assert isinstance(col, chromadb.Collection)
        col.add(ids=["a", "b"], embeddings=[[1.0, 0.0], [0.0, 1.0]], metadatas=[{"k": 1}, None])
        got = col.get(include=["metadatas"])
        assert type(got) is dict
        got["ids"].append("mine")  # mutable, as chromadb's are
        res = col.query(query_embeddings=[[1.0, 0.1]], n_results=1)
        assert type(res) is dict and res["ids"] == [["a"]]
        assert col.count() == 2 and client.count_collections() == 1
        assert [c.name for c in client.list_collections()] == ["plain"]
        assert client.get_collection_by_id(col.id).name == "plain"


def test_the_callers_context_reaches_each_call(shard_urls: list[str]) -> None:
    """An OpenTelemetry span current in the calling thread is the parent of the client's call
    span, though the call runs on the client's own loop thread."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("app")
    with sharded_chroma.HttpClient(shards=shard_urls, tracer_provider=provider) as client:
        col = client.create_collection("ctx", embedding_function=None)

        def in_thread(n: int) -> None:
            with tracer.start_as_current_span(f"app-{n}"):
                col.add(ids=[f"x{n}"], embeddings=[[float(n), 1.0]])

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(in_thread, range(4)))
    provider.shutdown()
    finished = spans.get_finished_spans()
    apps = {s.name: s for s in finished if s.name.startswith("app-")}
    adds = [s for s in finished if s.name == "add ctx"]
    assert len(apps) == 4 and len(adds) == 4
    parents = {s.parent.span_id for s in adds if s.parent is not None}
    assert parents == {s.context.span_id for s in apps.values() if s.context is not None}


def test_options_set_in_the_calling_thread_apply(
    cluster_servers: list[LocalChromaServer], tmp_path: Path
) -> None:
    """``write_concern`` set with ``sharded_chroma.options`` around a sync call decides that
    call: one copy of the shard is down, so `all` fails and `one` succeeds."""
    primary, replica = cluster_servers[:2]
    topology = sharded_chroma.Topology.build(
        {
            "shards": [{"name": "s0", "primary": primary.url, "replicas": [replica.url]}],
            "replication": {"hints_dir": str(tmp_path), "write_concern": "all"},
        }
    )
    with sharded_chroma.HttpClient(topology=topology) as client:
        col = client.create_collection("concern", embedding_function=None)
        replica.stop()  # the next test's fixture starts it again
        with pytest.raises(sharded_chroma.PartialWriteError, match="concern 'all' not met"):
            col.upsert(ids=["a"], embeddings=[[1.0, 2.0]])

        def with_one() -> None:
            with sharded_chroma.options(write_concern="one"):
                col.upsert(ids=["b"], embeddings=[[1.0, 2.0]])

        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(with_one).result()
        # The option ended with its block: the next call is back to `all`.
        with pytest.raises(sharded_chroma.PartialWriteError, match="concern 'all' not met"):
            col.upsert(ids=["c"], embeddings=[[1.0, 2.0]])
        assert sorted(col.get(include=[])["ids"]) == ["a", "b", "c"]


def test_scan_is_a_plain_iterator_and_can_be_left_early(shard_urls: list[str]) -> None:
    with sharded_chroma.HttpClient(shards=shard_urls) as client:
        col = client.create_collection("scan", embedding_function=None)
        ids = [f"r{i:03d}" for i in range(95)]
        col.add(ids=ids, embeddings=[[float(i), 1.0] for i in range(95)])
        pages = list(col.scan(batch_size=20))
        assert [len(p["ids"]) for p in pages] == [20, 20, 20, 20, 15]
        assert [i for p in pages for i in p["ids"]] == col.get(include=[])["ids"]
        for page in col.scan(batch_size=10):
            assert len(page["ids"]) == 10
            break
        abandoned = col.scan(batch_size=10)
        next(abandoned)  # left open: close() must not wait for it
        with pytest.raises(ValueError, match="batch_size"):
            next(col.scan(batch_size=0))
        started = time.monotonic()
    assert time.monotonic() - started < 10
    assert not _portal_threads()


def test_close_ends_the_loop_thread_and_later_calls_raise(shard_urls: list[str]) -> None:
    client = sharded_chroma.HttpClient(shards=shard_urls)
    col = client.create_collection("closing", embedding_function=None)
    assert len(_portal_threads()) == 1
    client.close()
    client.close()  # idempotent
    assert not _portal_threads()
    for call in (
        client.heartbeat,
        client.list_collections,
        lambda: client.get_collection("closing"),
        col.count,
        lambda: col.add(ids=["a"], embeddings=[[1.0]]),
        lambda: list(col.scan()),
    ):
        with pytest.raises(sharded_chroma.ClientClosedError):
            call()
    with pytest.raises(sharded_chroma.ClientClosedError), client:
        pass


def test_bad_arguments_raise_before_any_thread_is_left(shard_urls: list[str]) -> None:
    with pytest.raises(sharded_chroma.ConfigurationError, match="exactly one"):
        sharded_chroma.HttpClient()
    dead = f"http://127.0.0.1:{find_free_port()}"
    with pytest.raises(sharded_chroma.ShardFailureError, match="connect failed"):
        sharded_chroma.HttpClient(shards=[shard_urls[0], dead])
    assert not _portal_threads()


def test_usable_from_sync_code_inside_an_event_loop(shard_urls: list[str]) -> None:
    """A sync call made from a coroutine (blocking that loop, as any sync client does) works:
    the client's own loop is another thread's."""

    async def handler() -> int:
        with sharded_chroma.HttpClient(shards=shard_urls) as client:
            col = client.get_or_create_collection("in_loop", embedding_function=None)
            col.upsert(ids=["a"], embeddings=[[1.0]])
            return col.count()

    assert asyncio.run(handler()) == 1


def test_backups_through_the_sync_client(shard_urls: list[str], tmp_path: Path) -> None:
    """Export and import are the async client's, with its error classes."""
    with sharded_chroma.HttpClient(shards=shard_urls) as client:
        col = client.create_collection("sync_backup", embedding_function=None)
        col.add(ids=[f"b{i}" for i in range(30)], embeddings=[[float(i), 1.0] for i in range(30)])
        path = tmp_path / "sync.jsonl"
        assert client.export_collection("sync_backup", path).records == 30
        report = client.import_collection([path], name="sync_restored")
        assert report.records == 30
        restored = client.get_collection("sync_restored", embedding_function=None)
        assert restored.get(include=[])["ids"] == col.get(include=[])["ids"]
        path.write_bytes(path.read_bytes()[:-5])
        with pytest.raises(sharded_chroma.BackupFileError, match="cut short"):
            client.import_collection([path], name="never")
        assert "never" not in [c.name for c in client.list_collections()]


def test_close_lets_calls_in_flight_finish_and_ends_iterators(shard_urls: list[str]) -> None:
    """Writes running when ``close()`` is called complete (or, if they had not started, raise
    ``ClientClosedError``); an iterator in use ends with ``ClientClosedError``; nothing else
    is raised, and what was acknowledged is stored."""
    client = sharded_chroma.HttpClient(shards=shard_urls)
    col = client.create_collection("close_busy", embedding_function=None)
    col.add(ids=[f"s{i}" for i in range(50)], embeddings=[[float(i), 1.0] for i in range(50)])
    outcomes: dict[str, Any] = {}
    started = threading.Barrier(5)

    def writer(n: int) -> None:
        started.wait()
        ids = [f"w{n}-{i}" for i in range(200)]
        try:
            col.add(ids=ids, embeddings=[[float(i), float(n)] for i in range(200)])
            outcomes[f"w{n}"] = ids
        except BaseException as exc:
            outcomes[f"w{n}"] = exc

    def reader() -> None:
        pages = col.scan(batch_size=5)
        try:
            next(pages)
            started.wait()
            for _ in pages:
                time.sleep(0.05)
            outcomes["scan"] = "finished"
        except BaseException as exc:
            outcomes["scan"] = exc

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.05)
    client.close()
    for t in threads:
        t.join(timeout=60)
    assert not _portal_threads()
    assert isinstance(outcomes["scan"], sharded_chroma.ClientClosedError), outcomes["scan"]
    acked: list[str] = []
    for n in range(3):
        got = outcomes[f"w{n}"]
        assert isinstance(got, (list, sharded_chroma.ClientClosedError)), repr(got)
        if isinstance(got, list):
            acked += got
    with sharded_chroma.HttpClient(shards=shard_urls) as again:
        stored = set(again.get_collection("close_busy").get(include=[])["ids"])
    assert set(acked) <= stored
