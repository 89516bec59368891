"""Shared fixtures: one local cluster of real Chroma servers for the whole test session.

Server 0 is the "oracle" (a plain single-node Chroma to compare results against); servers 1..3
are the shards. Function-scoped fixtures wipe the servers they hand out, so every test starts
from empty databases without paying for a server start.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import sharded_chroma
from sharded_chroma.testing import LocalChromaServer, LocalCluster
from sharded_chroma.testing._etcd import LocalEtcd
from tests._nodes import drop_official_http_pools
from tests._syncview import sync_client

CLUSTER_SIZE = 4
# Four servers booting at once on a small CI machine take several seconds each; leave headroom.
CLUSTER_START_TIMEOUT = 180.0


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def chroma_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(CLUSTER_SIZE, tmp_path_factory.mktemp("chroma-cluster"))
    cluster.start(timeout=CLUSTER_START_TIMEOUT)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """One real etcd member on free loopback ports for the session. Tests keep apart by
    namespace; a test that stops it must start it again (``etcd`` restarts it if needed)."""
    if shutil.which("etcd") is None:
        # CI installs etcd-server (.ci/run), so there a missing etcd fails; a developer
        # machine without it skips the etcd tests and says why.
        if os.environ.get("CI"):
            pytest.fail("etcd is not installed (Debian: apt-get install etcd-server)")
        pytest.skip("etcd is not installed (Debian: apt-get install etcd-server)")
    server = LocalEtcd(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd(etcd_server: LocalEtcd) -> LocalEtcd:
    if not etcd_server.running:
        etcd_server.start()
    return etcd_server


def _fresh_one(server: LocalChromaServer) -> None:
    # A fault-injection test may have killed or stopped a server; bring it back so one test's
    # damage does not fail every test after it.
    if not server.running:
        server.restart()
    server.reset()


def _fresh(servers: list[LocalChromaServer]) -> None:
    # Resets are mostly waiting on the servers, and this runs before every test that uses them.
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        for future in [pool.submit(_fresh_one, server) for server in servers]:
            future.result()


@pytest.fixture
def oracle_url(chroma_servers: LocalCluster) -> str:
    oracle = chroma_servers.servers[0]
    _fresh([oracle])
    return oracle.url


@pytest.fixture
def shard_urls(chroma_servers: LocalCluster) -> list[str]:
    shards = chroma_servers.servers[1:]
    _fresh(shards)
    return [server.url for server in shards]


@pytest.fixture
def cluster_servers(chroma_servers: LocalCluster, shard_urls: list[str]) -> list[LocalChromaServer]:
    # Depends on shard_urls for the reset, so a test asking for both resets only once.
    return chroma_servers.servers[1:]


@pytest.fixture
async def sharded(shard_urls: list[str]) -> AsyncIterator[sharded_chroma.ShardedClient]:
    """A sharded client over the (wiped) shards, closed after the test."""
    client = await sharded_chroma.AsyncHttpClient(shards=shard_urls)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(params=["async", "sync"])
def connect(request: pytest.FixtureRequest) -> Any:
    """How a suite run through both clients connects: ``AsyncHttpClient``, or the sync
    ``HttpClient`` behind an awaitable view (``tests/_syncview.py``)."""
    return sharded_chroma.AsyncHttpClient if request.param == "async" else sync_client


@pytest.fixture
async def official_pools() -> AsyncIterator[None]:
    """For tests that use chromadb's official async client: see ``drop_official_http_pools``."""
    await drop_official_http_pools()
    yield
    await drop_official_http_pools()
