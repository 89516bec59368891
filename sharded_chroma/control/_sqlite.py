"""The control store in one SQLite file: the embedded default for a cluster run from one host.

Same semantics as etcd (see ``_backend``): one revision counter bumped by every change, a
key's revision set to the counter by its last write, compare-and-swap inside one ``BEGIN
IMMEDIATE`` transaction, leases as rows with an expiry on the wall clock (every process of
the host shares it). Expired leases are swept, with their keys, by the next write or wait, and
are invisible to reads before that. Blocking calls run on a worker thread.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread

from .._errors import ClientClosedError, ControlUnavailableError
from .._sqlitewal import enable_wal
from ._backend import ANY, AnyRevision, Entry

__all__ = ["SqliteControl"]

_T = TypeVar("_T")
_BUSY_TIMEOUT_S = 10.0
_POLL_S = 0.05
_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    revision INTEGER NOT NULL,
    lease INTEGER
);
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0);
"""
_LIVE = "(lease IS NULL OR lease IN (SELECT id FROM leases WHERE expires > ?))"


def _prefix_end(prefix: str) -> str | None:
    """The first key after every key starting with ``prefix`` (None: no upper bound)."""
    if not prefix:
        return None
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class SqliteControl:
    """A ``ControlBackend`` in the SQLite file at ``path`` (made with its folder if absent)."""

    name = "sqlite"

    def __init__(self, path: str | os.PathLike[str], clock: Callable[[], float] = time.time):
        self._path = Path(path)
        self.endpoint = self._path.name
        self._clock = clock
        self._lock = threading.Lock()
        conn: sqlite3.Connection | None = None
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self._path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            enable_wal(conn, _BUSY_TIMEOUT_S)
            conn.execute("PRAGMA synchronous=NORMAL")
            with _immediate(conn):
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            if conn is not None:
                conn.close()
            raise ControlUnavailableError(
                f"cannot open the file: {exc}", backend=self.name, endpoint=self.endpoint
            ) from exc
        self._conn: sqlite3.Connection | None = conn

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return await anyio.to_thread.run_sync(self._locked, fn)

    def _locked(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._lock:
            if self._conn is None:
                raise ClientClosedError("control store used after aclose()")
            try:
                return fn(self._conn)
            except sqlite3.Error as exc:
                raise ControlUnavailableError(
                    str(exc), backend=self.name, endpoint=self.endpoint
                ) from exc

    def _bump(self, conn: sqlite3.Connection) -> int:
        row = conn.execute(
            "UPDATE meta SET value = value + 1 WHERE name = 'revision' RETURNING value"
        ).fetchone()
        return int(row[0])

    def _sweep(self, conn: sqlite3.Connection) -> None:
        """Inside a write transaction: end expired leases and delete their keys."""
        now = self._clock()
        expired = [r[0] for r in conn.execute("SELECT id FROM leases WHERE expires <= ?", (now,))]
        if not expired:
            return
        marks = ",".join("?" * len(expired))
        conn.execute(f"DELETE FROM kv WHERE lease IN ({marks})", expired)
        conn.execute(f"DELETE FROM leases WHERE id IN ({marks})", expired)
        self._bump(conn)

    def _revision_of(self, conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])

    # -- the interface ----------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        def run(conn: sqlite3.Connection) -> Entry | None:
            row = conn.execute(
                f"SELECT value, revision, lease FROM kv WHERE key = ? AND {_LIVE}",
                (key, self._clock()),
            ).fetchone()
            return None if row is None else Entry(key, bytes(row[0]), int(row[1]), row[2])

        return await self._run(run)

    async def list(self, prefix: str) -> list[Entry]:
        end = _prefix_end(prefix)

        def run(conn: sqlite3.Connection) -> list[Entry]:
            sql = f"SELECT key, value, revision, lease FROM kv WHERE key >= ? AND {_LIVE}"
            args: list[object] = [prefix, self._clock()]
            if end is not None:
                sql += " AND key < ?"
                args.append(end)
            rows = conn.execute(sql + " ORDER BY key", args).fetchall()
            return [Entry(r[0], bytes(r[1]), int(r[2]), r[3]) for r in rows]

        return await self._run(run)

    async def put(
        self,
        key: str,
        value: bytes,
        *,
        expect: int | AnyRevision | None = ANY,
        lease: int | None = None,
    ) -> int | None:
        def run(conn: sqlite3.Connection) -> int | None:
            with _immediate(conn):
                self._sweep(conn)
                if lease is not None and not _lease_alive(conn, lease):
                    return None
                if not _holds(conn, key, expect):
                    return None
                revision = self._bump(conn)
                conn.execute(
                    "INSERT INTO kv (key, value, revision, lease) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                    " revision = excluded.revision, lease = excluded.lease",
                    (key, value, revision, lease),
                )
                return revision

        return await self._run(run)

    async def delete(self, key: str, *, expect: int | AnyRevision | None = ANY) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            with _immediate(conn):
                self._sweep(conn)
                if expect is None or not _holds(conn, key, expect):
                    return False
                gone = conn.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount
                if gone:
                    self._bump(conn)
                return bool(gone)

        return await self._run(run)

    async def grant(self, ttl: float) -> int:
        if not ttl > 0:
            raise ValueError(f"a lease needs a positive ttl, got {ttl}")

        def run(conn: sqlite3.Connection) -> int:
            with _immediate(conn):
                self._sweep(conn)
                row = conn.execute(
                    "INSERT INTO leases (ttl, expires) VALUES (?, ?) RETURNING id",
                    (ttl, self._clock() + ttl),
                ).fetchone()
                return int(row[0])

        return await self._run(run)

    async def refresh(self, lease: int) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            with _immediate(conn):
                self._sweep(conn)
                return bool(
                    conn.execute(
                        "UPDATE leases SET expires = ? + ttl WHERE id = ?", (self._clock(), lease)
                    ).rowcount
                )

        return await self._run(run)

    async def revoke(self, lease: int) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with _immediate(conn):
                self._sweep(conn)
                conn.execute("DELETE FROM kv WHERE lease = ?", (lease,))
                if conn.execute("DELETE FROM leases WHERE id = ?", (lease,)).rowcount:
                    self._bump(conn)

        await self._run(run)

    async def revision(self) -> int:
        return await self._run(self._revision_of)

    async def wait(self, prefix: str, after: int, within: float) -> int:
        # One counter for the whole file, so any change wakes every waiter; callers re-read.
        def poll(conn: sqlite3.Connection) -> int:
            now = self._clock()
            if conn.execute("SELECT 1 FROM leases WHERE expires <= ?", (now,)).fetchone():
                with _immediate(conn):
                    self._sweep(conn)
            return self._revision_of(conn)

        deadline = time.monotonic() + within
        while True:
            revision = await self._run(poll)
            if revision > after or time.monotonic() >= deadline:
                return revision
            await anyio.sleep(min(_POLL_S, max(deadline - time.monotonic(), 0.0)))

    async def aclose(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _lease_alive(conn: sqlite3.Connection, lease: int) -> bool:
    return conn.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is not None


def _holds(conn: sqlite3.Connection, key: str, expect: int | AnyRevision | None) -> bool:
    if expect is ANY:
        return True
    row = conn.execute("SELECT revision FROM kv WHERE key = ?", (key,)).fetchone()
    if expect is None:
        return row is None
    return row is not None and int(row[0]) == expect
