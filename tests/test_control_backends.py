"""Congruence of the control-store backends: one suite, run against the SQLite file and a real
etcd, for the primitives everything else stands on (compare-and-swap, leases, waits)."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from sharded_chroma import ControlUnavailableError
from sharded_chroma.control import ControlBackend, EtcdControl, SqliteControl
from sharded_chroma.testing._etcd import LocalEtcd

pytestmark = pytest.mark.anyio

BACKENDS = ["sqlite", "etcd"]


def make_backend(kind: str, where: str, namespace: str) -> ControlBackend:
    if kind == "sqlite":
        return SqliteControl(Path(where) / "control.db")
    return EtcdControl([where], namespace=namespace)


@pytest.fixture(params=BACKENDS)
def backend_spec(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str, str]:
    """(kind, where, namespace): enough for another process to open the same store."""
    kind = request.param
    namespace = f"/test-{uuid.uuid4().hex}/"
    if kind == "sqlite":
        return kind, str(tmp_path), namespace
    server: LocalEtcd = request.getfixturevalue("etcd")
    return kind, server.endpoint, namespace


@pytest.fixture
async def backend(backend_spec: tuple[str, str, str]) -> AsyncIterator[ControlBackend]:
    store = make_backend(*backend_spec)
    try:
        yield store
    finally:
        await store.aclose()


async def test_compare_and_swap(backend: ControlBackend) -> None:
    first = await backend.put("k", b"1", expect=None)
    assert first is not None
    assert await backend.put("k", b"again", expect=None) is None
    assert await backend.put("k", b"stale", expect=first - 1) is None
    second = await backend.put("k", b"2", expect=first)
    assert second is not None and second > first
    entry = await backend.get("k")
    assert entry is not None and (entry.value, entry.revision) == (b"2", second)
    assert not await backend.delete("k", expect=first)
    assert not await backend.delete("k", expect=None)
    assert await backend.delete("k", expect=second)
    assert await backend.get("k") is None
    assert not await backend.delete("k")
    assert await backend.revision() >= second


async def test_list_is_by_prefix_in_key_order(backend: ControlBackend) -> None:
    for key in ["a/2", "a/10", "ab/1", "a/1", "b/1"]:
        assert await backend.put(key, key.encode()) is not None
    assert [e.key for e in await backend.list("a/")] == ["a/1", "a/10", "a/2"]
    assert [e.key for e in await backend.list("")] == ["a/1", "a/10", "a/2", "ab/1", "b/1"]


async def test_lease_expiry_deletes_its_keys_and_wakes_waiters(backend: ControlBackend) -> None:
    lease = await backend.grant(1.0)
    assert await backend.put("live/me", b"x", lease=lease) is not None
    assert await backend.put("live/other", b"y") is not None
    before = await backend.revision()
    started = time.monotonic()
    # etcd's minimum lease is a couple of seconds; the wait must end on the expiry, not later.
    revision = before
    while await backend.get("live/me") is not None and time.monotonic() - started < 10:
        revision = await backend.wait("live/", revision, 10.0)
    assert await backend.get("live/me") is None
    assert time.monotonic() - started < 8.0
    assert revision > before
    assert [e.key for e in await backend.list("live/")] == ["live/other"]
    assert not await backend.refresh(lease)
    assert await backend.put("live/late", b"z", lease=lease) is None


async def test_refresh_keeps_a_lease_and_revoke_ends_it(backend: ControlBackend) -> None:
    # 3 s (etcd rounds up and has its own minimum); renewed every 0.5 s for 3.6 s in all.
    lease = await backend.grant(3.0)
    assert await backend.put("held", b"x", lease=lease) is not None
    for _ in range(6):
        await anyio.sleep(0.6)
        assert await backend.refresh(lease)
    entry = await backend.get("held")
    assert entry is not None and entry.lease == lease
    await backend.revoke(lease)
    await backend.revoke(lease)  # a lease already gone is not an error
    assert await backend.get("held") is None


async def test_wait_wakes_on_another_clients_write(backend_spec: tuple[str, str, str]) -> None:
    reader, writer = make_backend(*backend_spec), make_backend(*backend_spec)
    try:
        revision = await reader.revision()
        woke: list[float] = []

        async def wait() -> None:
            started = time.monotonic()
            await reader.wait("maps/", revision, 10.0)
            woke.append(time.monotonic() - started)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.5)
            await writer.put("maps/c", b"1")
        assert woke and 0.4 < woke[0] < 1.5
        started = time.monotonic()
        quiet = await reader.wait("maps/", await reader.revision(), 0.3)
        assert time.monotonic() - started >= 0.25
        assert quiet == await reader.revision()
    finally:
        await reader.aclose()
        await writer.aclose()


def _increments(spec: tuple[str, str, str], rounds: int, out: Any) -> None:
    """Child process: add one to a shared counter ``rounds`` times by read-then-CAS."""

    async def run() -> list[tuple[int, float, float]]:
        store = make_backend(*spec)
        seen = []
        try:
            for _ in range(rounds):
                started = time.monotonic()
                while True:
                    entry = await store.get("counter")
                    value = 0 if entry is None else int(entry.value)
                    expect = None if entry is None else entry.revision
                    if await store.put("counter", str(value + 1).encode(), expect=expect):
                        seen.append((value + 1, started, time.monotonic()))
                        break
        finally:
            await store.aclose()
        return seen

    out.put(anyio.run(run))


async def test_cas_counter_across_processes_loses_no_increment(
    backend_spec: tuple[str, str, str],
) -> None:
    """Two processes and a local task race read-then-CAS increments: every success saw a value
    nobody else saw, and the counter ends at the number of successes."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    rounds = 40
    children = [ctx.Process(target=_increments, args=(backend_spec, rounds, out)) for _ in "ab"]
    for child in children:
        child.start()
    results = [out.get(timeout=120) for _ in children]
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    values = sorted(v for seen in results for v, _, _ in seen)
    assert values == list(range(1, 2 * rounds + 1))
    store = make_backend(*backend_spec)
    try:
        entry = await store.get("counter")
        assert entry is not None and int(entry.value) == 2 * rounds
    finally:
        await store.aclose()


async def test_etcd_unreachable_is_a_clear_error_without_the_password(tmp_path: Path) -> None:
    from sharded_chroma.testing import find_free_port

    port = find_free_port()
    store = EtcdControl([f"127.0.0.1:{port}"], timeout=1.0, username="u", password="s3cr3t-pw")
    started = time.monotonic()
    try:
        with pytest.raises(ControlUnavailableError) as info:
            await store.get("k")
    finally:
        await store.aclose()
    assert time.monotonic() - started < 10
    text = f"{info.value!s} {info.value!r} {info.value.__cause__!r}"
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "s3cr3t-pw" not in text
    assert info.value.backend == "etcd"


async def test_etcd_survives_a_restart_with_its_keys(etcd: LocalEtcd) -> None:
    store = EtcdControl([etcd.endpoint], namespace=f"/test-{uuid.uuid4().hex}/", timeout=2.0)
    try:
        assert await store.put("kept", b"1") is not None
        etcd.kill()
        with pytest.raises(ControlUnavailableError):
            await store.get("kept")
        etcd.start()
        # The same store object, no reconnect by the caller: it answers once the member has
        # elected itself (seconds on a loaded machine).
        deadline = time.monotonic() + 30.0
        while True:
            try:
                entry = await store.get("kept")
                break
            except ControlUnavailableError:
                assert time.monotonic() < deadline, "the store never answered after the restart"
                await anyio.sleep(0.5)
        assert entry is not None and entry.value == b"1"
    finally:
        await store.aclose()
        if not etcd.running:
            etcd.start()


def test_sqlite_open_waits_for_another_writer_on_a_file_not_yet_in_wal_mode(
    tmp_path: Path,
) -> None:
    """The switch to WAL fails at once (SQLite skips its busy handler) while another
    connection holds the write lock of a file in rollback mode, as when two processes open a
    new store together; seen in CI as "database is locked". The open waits instead."""
    import sqlite3
    import threading

    path = tmp_path / "control.db"
    plain = sqlite3.connect(path, isolation_level=None)
    plain.execute("CREATE TABLE filler (x)")
    plain.close()
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            holder.execute("BEGIN IMMEDIATE")
            locked.set()
            release.wait(0.3)
            holder.execute("COMMIT")
        finally:
            holder.close()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert locked.wait(5)
        store = SqliteControl(path)
    finally:
        release.set()
        thread.join()
    anyio.run(store.aclose)
