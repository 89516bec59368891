"""FaultProxy in front of a real Chroma server: forwarding, latency, cut, blackhole, shutdown."""

from __future__ import annotations

import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.client import HTTPException
from urllib.parse import urlsplit

import pytest

import sharded_chroma
from tests._proxy import FaultProxy, pareto_delay

pytestmark = pytest.mark.anyio

HEARTBEAT = "/api/v2/heartbeat"
# A plain urllib opener honours http_proxy/HTTP_PROXY; loopback requests must never use one.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with _OPENER.open(url, timeout=timeout) as response:
        return response.status, response.read()


def _heartbeat_ok(base: str, timeout: float = 5.0) -> bool:
    status, body = _get(base + HEARTBEAT, timeout)
    return status == 200 and b"nanosecond heartbeat" in body


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end closed or reset ``sock`` (waits up to 5 s for it to happen)."""
    sock.settimeout(5.0)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def proxy(oracle_url: str) -> Iterator[FaultProxy]:
    target = urlsplit(oracle_url)
    assert target.hostname is not None and target.port is not None
    with FaultProxy(target.hostname, target.port) as p:
        yield p


def test_forwards_and_counts(proxy: FaultProxy) -> None:
    assert proxy.url == f"http://127.0.0.1:{proxy.port}"
    assert proxy.connections_total == 0 and proxy.bytes_up == 0 and proxy.bytes_down == 0
    for _ in range(3):
        assert _heartbeat_ok(proxy.url)
    assert proxy.connections_total == 3  # urllib opens one connection per request
    assert proxy.bytes_up > 0
    assert proxy.bytes_down > proxy.bytes_up / 3  # responses carry headers and a JSON body
    assert proxy.bytes_dropped == 0
    proxy.reset_counters()
    assert (proxy.connections_total, proxy.bytes_up, proxy.bytes_down) == (0, 0, 0)


def test_latency_delays_each_request(proxy: FaultProxy) -> None:
    assert _heartbeat_ok(proxy.url)  # warm up the server side
    proxy.set_latency(0.2)
    start = time.monotonic()
    assert _heartbeat_ok(proxy.url)
    assert time.monotonic() - start >= 0.2
    proxy.set_latency(0)
    fastest = float("inf")
    for _ in range(3):  # the best of three, so a busy machine does not make this flaky
        start = time.monotonic()
        assert _heartbeat_ok(proxy.url)
        fastest = min(fastest, time.monotonic() - start)
    assert fastest < 0.2


def test_pareto_delay_is_bounded_and_heavy_tailed() -> None:
    jitter = pareto_delay(0.01, 1.2, 0.5)
    rng = random.Random(1)
    draws = [jitter(rng) for _ in range(5000)]
    assert min(draws) >= 0.01 and max(draws) <= 0.5
    assert max(draws) == 0.5  # the tail reaches the cap
    assert sorted(draws)[len(draws) // 2] < 0.02  # while the median stays near the scale
    again = pareto_delay(0.01, 1.2, 0.5)
    assert [again(random.Random(1)) for _ in range(3)] == [jitter(random.Random(1))] * 3
    with pytest.raises(ValueError):
        pareto_delay(0.1, 1.0, 0.05)


def test_jittered_latency_uses_the_seed(proxy: FaultProxy) -> None:
    proxy.set_latency(0.0, jitter=lambda rng: rng.uniform(0.1, 0.15), seed=3)
    start = time.monotonic()
    assert _heartbeat_ok(proxy.url)
    assert time.monotonic() - start >= 0.1


def test_cut_fails_fast_and_restore_recovers(proxy: FaultProxy) -> None:
    assert _heartbeat_ok(proxy.url)
    # A connection open at the moment of the cut is reset.
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5.0)
    with sock:
        deadline = time.monotonic() + 5.0
        while proxy.open_connections < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        proxy.cut()
        assert proxy.mode == "cut"
        assert _closed_by_peer(sock)
    # New connections are refused quickly.
    start = time.monotonic()
    with pytest.raises((OSError, HTTPException)):
        _get(proxy.url + HEARTBEAT, timeout=5.0)
    assert time.monotonic() - start < 1.0
    proxy.restore()
    assert proxy.mode == "forward"
    assert _heartbeat_ok(proxy.url)


def test_blackhole_times_out_and_restore_recovers(proxy: FaultProxy) -> None:
    proxy.blackhole()
    start = time.monotonic()
    with pytest.raises((TimeoutError, urllib.error.URLError)) as caught:
        _get(proxy.url + HEARTBEAT, timeout=0.5)
    elapsed = time.monotonic() - start
    # The connection was accepted and the client gave up waiting: a timeout, not a refusal.
    assert isinstance(getattr(caught.value, "reason", caught.value), TimeoutError)
    assert 0.4 <= elapsed < 3.0
    assert proxy.bytes_dropped > 0  # the request was read
    assert proxy.bytes_up == 0 and proxy.bytes_down == 0  # and nothing went through
    proxy.restore()
    assert _heartbeat_ok(proxy.url)
    assert proxy.bytes_up > 0


def test_blackhole_hangs_an_open_connection_until_restore(proxy: FaultProxy) -> None:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5.0)
    with sock:
        request = b"GET " + HEARTBEAT.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(request)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        proxy.blackhole()
        sock.sendall(request)
        sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            sock.recv(4096)
        proxy.restore()  # the lost request spoilt this connection: it is closed
        assert _closed_by_peer(sock)
    assert _heartbeat_ok(proxy.url)


def test_stop_is_idempotent_and_frees_the_port(oracle_url: str) -> None:
    target = urlsplit(oracle_url)
    assert target.hostname is not None and target.port is not None
    threads_before = set(threading.enumerate())
    proxy = FaultProxy(target.hostname, target.port).start()
    port = proxy.port
    assert _heartbeat_ok(proxy.url)
    idle = socket.create_connection(("127.0.0.1", port), timeout=5.0)  # left open on purpose
    with idle:
        proxy.stop()
        proxy.stop()
        assert _closed_by_peer(idle)
    assert set(threading.enumerate()) <= threads_before
    assert proxy.open_connections == 0
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    with pytest.raises(OSError):
        _get(f"http://127.0.0.1:{port}{HEARTBEAT}", timeout=1.0)
    # Controls after stop are harmless.
    proxy.cut()
    proxy.restore()
    never_started = FaultProxy("127.0.0.1", target.port)
    never_started.stop()


def test_rejects_non_loopback_targets() -> None:
    for host in ("10.0.0.1", "8.8.8.8", "example.com", "0.0.0.0"):
        with pytest.raises(ValueError):
            FaultProxy(host, 8000)
    assert FaultProxy("localhost", 8000).target_host == "127.0.0.1"
    assert FaultProxy("::1", 8000).target_host == "::1"


async def test_async_client_through_proxy(proxy: FaultProxy) -> None:
    client = await sharded_chroma.AsyncHttpClient(shards=[proxy.url])
    try:
        assert await client.heartbeat() > 0
        assert proxy.connections_total >= 1
        assert proxy.bytes_down > 0
    finally:
        await client.aclose()
