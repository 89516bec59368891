"""The local-cluster machinery: real ``chroma run`` processes on loopback."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sharded_chroma.testing import LocalChromaServer, LocalCluster, _ports, find_free_port
from tests._servers import pid_alive

COLLECTIONS = "/api/v2/tenants/default_tenant/databases/default_database/collections"
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with _opener.open(req, timeout=10) as resp:
        return json.loads(resp.read())


def _collection_names(url: str) -> list[str]:
    return sorted(c["name"] for c in _request("GET", url + COLLECTIONS))


def _loopback_listener_addresses(port: int) -> set[str] | None:
    """Hex local addresses of sockets listening on ``port`` per /proc (Linux only)."""
    table = Path("/proc/net/tcp")
    if not table.exists():
        return None
    found = set()
    for row in table.read_text().splitlines()[1:]:
        fields = row.split()
        address, hex_port = fields[1].split(":")
        if fields[3] == "0A" and int(hex_port, 16) == port:
            found.add(address)
    return found


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port with a listener on it that is not a Chroma server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_find_free_port_is_bindable() -> None:
    port = find_free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_cluster_servers_listen_on_loopback_and_answer_heartbeat(
    chroma_servers: LocalCluster,
) -> None:
    servers = chroma_servers.servers
    assert len(servers) == 4
    assert len({s.port for s in servers}) == 4
    assert len({s.data_dir for s in servers}) == 4
    assert chroma_servers.urls == [s.url for s in servers]
    for server in servers:
        assert server.running and server.pid is not None
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert "nanosecond heartbeat" in _request("GET", server.url + "/api/v2/heartbeat")
        listeners = _loopback_listener_addresses(server.port)
        if listeners is not None:
            assert listeners == {"0100007F"}, "server must bind 127.0.0.1 only"


@pytest.mark.parametrize("round_", [1, 2])
def test_fixtures_hand_out_empty_servers(
    round_: int, oracle_url: str, shard_urls: list[str], cluster_servers: list[LocalChromaServer]
) -> None:
    # Whichever round runs second sees what the first left behind unless the fixtures reset.
    assert len(shard_urls) == 3
    assert [s.url for s in cluster_servers] == shard_urls
    assert oracle_url not in shard_urls
    for url in [oracle_url, *shard_urls]:
        assert _collection_names(url) == []
        _request("POST", url + COLLECTIONS, {"name": f"leftover-{round_}"})


def test_kill_and_restart_keep_data_and_port(cluster_servers: list[LocalChromaServer]) -> None:
    server = cluster_servers[0]
    port, first_pid = server.port, server.pid
    assert first_pid is not None
    _request("POST", server.url + COLLECTIONS, {"name": "abc"})
    server.kill()
    assert not server.running and server.pid is None
    assert not pid_alive(first_pid)
    server.restart()
    assert server.running and server.pid != first_pid
    assert server.port == port
    assert _collection_names(server.url) == ["abc"]


def test_stop_ends_the_process(cluster_servers: list[LocalChromaServer]) -> None:
    # Leaves the server stopped on purpose: the next test checks the fixtures bring it back.
    server = cluster_servers[1]
    pid = server.pid
    assert pid is not None and pid_alive(pid)
    server.stop()
    assert not server.running and server.pid is None
    assert not pid_alive(pid)
    assert not server.heartbeat(timeout=0.5)
    server.stop()  # idempotent
    server.kill()


def test_fixtures_revive_stopped_servers(
    shard_urls: list[str], cluster_servers: list[LocalChromaServer]
) -> None:
    assert all(s.running for s in cluster_servers)
    for url in shard_urls:
        assert _collection_names(url) == []


def test_explicit_port_already_taken_is_a_clear_error(tmp_path: Path, held_port: int) -> None:
    server = LocalChromaServer(tmp_path / "srv", port=held_port)
    with pytest.raises(RuntimeError, match=f"port {held_port} .*already in use"):
        server.start(timeout=20)
    assert not server.running


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc socket tables")
def test_auto_port_retries_when_the_port_is_taken(
    tmp_path: Path,
    held_port: int,
    chroma_servers: LocalCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two races in one server start, to boot Chroma as few times as possible:
    # 1. the first picked port is taken before launch (caught by the pre-flight bind);
    # 2. the second is grabbed by another Chroma after the pre-flight check (simulated by making
    #    the check pass): the other server answers the heartbeat while ours boots and then dies
    #    with AddrInUse, and ours must not be reported ready on the other's port.
    other = chroma_servers.servers[0]
    picks = [held_port, other.port]
    real_claim = _ports.claim_port
    real_bindable = _ports.port_is_bindable
    monkeypatch.setattr(
        _ports, "claim_port", lambda host: picks.pop(0) if picks else real_claim(host)
    )
    monkeypatch.setattr(
        _ports,
        "port_is_bindable",
        lambda host, port: port == other.port or real_bindable(host, port),
    )
    server = LocalChromaServer(tmp_path / "srv")
    assert server.port == held_port
    with server:
        assert not picks
        assert server.port not in (held_port, other.port)
        pid = server.pid
        assert pid is not None
        assert _ports.pid_listens_on(pid, server.port) is True
        assert server.heartbeat()
    assert other.running and other.heartbeat()


def test_process_exiting_during_startup_raises_with_log(tmp_path: Path) -> None:
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` executable")
    server = LocalChromaServer(tmp_path / "srv", chroma_executable=false)
    with pytest.raises(RuntimeError, match="exited with code 1 during startup"):
        server.start(timeout=10)
    assert not server.running


def test_missing_executable_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not found"):
        LocalChromaServer(tmp_path / "srv", chroma_executable=str(tmp_path / "no-such-chroma"))


def test_cluster_start_failure_stops_the_started_servers(
    tmp_path: Path, held_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = LocalCluster(2, tmp_path)
    second = cluster.servers[1]
    # Pin the second server to a taken port so it fails after the first has launched.
    monkeypatch.setattr(second, "_port", held_port)
    monkeypatch.setattr(second, "_port_fixed", True)
    with pytest.raises(RuntimeError, match="already in use"):
        cluster.start(timeout=30)
    assert not any(s.running for s in cluster.servers)


@pytest.mark.anyio
async def test_official_async_client_talks_to_the_oracle(oracle_url: str) -> None:
    import chromadb
    import numpy as np

    port = int(oracle_url.rsplit(":", 1)[1])
    client = await chromadb.AsyncHttpClient(host="127.0.0.1", port=port)
    collection = await client.create_collection("abc")
    await collection.add(ids=["a"], embeddings=np.array([[1.0, 2.0, 3.0]], dtype=np.float32))
    assert await collection.count() == 1
    assert [c.name for c in await client.list_collections()] == ["abc"]
