"""HintLog: a durable, bounded log of writes a replica missed, replayed in order when it is back.

A hint stands for a write the cluster already acknowledged to the caller, so losing one silently
would leave a replica diverged with nobody knowing. Hence SQLite with ``synchronous=FULL``: every
``append`` is on disk when it returns, at the price of one fsync per hint.

Every method is blocking and thread-safe; the async client calls them through
``anyio.to_thread.run_sync``. Several processes may open the same file: SQLite serialises their
writes, and the in-memory counters are reloaded whenever another connection changed the file.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from ._errors import ClientClosedError, HintLogFullError
from ._topology import _redact

__all__ = ["OPS", "Hint", "HintLog"]

logger = logging.getLogger("sharded_chroma.hints")

OPS = frozenset({"add", "upsert", "update", "delete"})

_SCHEMA_VERSION = 1
# Another process may hold the write lock for one fsync-ed commit at a time; seconds of waiting
# only happen when the disk is stalled, and then failing loudly is better than hanging forever.
_BUSY_TIMEOUT_S = 10.0
_COLUMNS = "id, node, tenant, database, collection_id, collection_name, op, body, created_at"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS hints (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    tenant TEXT NOT NULL,
    database TEXT NOT NULL,
    collection_id TEXT NOT NULL,
    collection_name TEXT NOT NULL,
    op TEXT NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS hints_node_id ON hints (node, id);
-- Lets expire() touch only the expired rows instead of scanning up to max_bytes of bodies.
CREATE INDEX IF NOT EXISTS hints_created_at ON hints (created_at);
-- One replayer per node across every process sharing this file (see HintLog.lease).
CREATE TABLE IF NOT EXISTS leases (
    node TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Hint:
    """One write that ``node`` missed, with the exact request body to replay."""

    id: int
    node: str
    tenant: str
    database: str
    collection_id: str
    collection_name: str
    op: str
    # Bodies carry user documents and metadata: keep them out of reprs that end up in logs.
    body: bytes = field(repr=False)
    created_at: float


def _non_empty(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {type(value).__name__}")
    return value


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class HintLog:
    """Durable per-node queues of missed writes, in one SQLite file.

    Bounds: ``max_hints`` pending hints and ``max_bytes`` of bodies in total (over all nodes);
    ``append`` raises :class:`HintLogFullError` rather than exceed them. ``expire`` drops hints
    older than ``max_age`` seconds, measured with ``clock``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_hints: int = 1_000_000,
        max_bytes: int = 1 << 30,
        max_age: float = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_hints = _positive_int("max_hints", max_hints)
        self.max_bytes = _positive_int("max_bytes", max_bytes)
        if isinstance(max_age, bool) or not isinstance(max_age, (int, float)) or not max_age > 0:
            raise ValueError(f"max_age must be a positive number of seconds, got {max_age!r}")
        self.max_age = float(max_age)
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self._data_version = -1
        self._full = False
        self._conn: sqlite3.Connection | None = self._open()

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Bodies hold user data: create the file owner-only; SQLite gives -wal/-shm the same mode.
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        conn = sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            with self._transaction(conn):
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, _SCHEMA_VERSION):
                    raise ValueError(
                        f"hint log {self.path.name} has schema version {version}, "
                        f"this code reads version {_SCHEMA_VERSION}"
                    )
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
                self._reload(conn)
        except BaseException:
            conn.close()
            raise
        logger.debug("hint log %s opened with %d pending hint(s)", self.path, self._total())
        return conn

    # -- counters -------------------------------------------------------------------------------

    def _total(self) -> int:
        return sum(self._counts.values())

    def _reload(self, conn: sqlite3.Connection) -> None:
        self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
        rows = conn.execute("SELECT node, COUNT(*), SUM(size) FROM hints GROUP BY node").fetchall()
        self._counts = {node: n for node, n, _ in rows}
        self._bytes = {node: b for node, _, b in rows}

    def _refresh(self, conn: sqlite3.Connection) -> None:
        # data_version changes only for commits by *other* connections, which is exactly when
        # the in-memory counters may be stale; our own writes adjust them directly.
        if conn.execute("PRAGMA data_version").fetchone()[0] != self._data_version:
            self._reload(conn)

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; on any failure roll back and reload the counters
        next time, since what the file holds is then uncertain."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            self._data_version = -1
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ClientClosedError("hint log used after close()")
        return self._conn

    # -- public API -----------------------------------------------------------------------------

    def append(
        self,
        node: str,
        tenant: str,
        database: str,
        collection_id: str,
        collection_name: str,
        op: str,
        body: bytes,
    ) -> Hint:
        """Durably record that ``node`` missed a write; return the stored hint.

        Raises :class:`HintLogFullError` (nothing stored) if the hint would exceed ``max_hints``
        or ``max_bytes``.
        """
        for name, value in (
            ("node", node),
            ("tenant", tenant),
            ("database", database),
            ("collection_id", collection_id),
            ("collection_name", collection_name),
        ):
            _non_empty(name, value)
        if op not in OPS:
            raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise ValueError(f"body must be bytes, got {type(body).__name__}")
        data = bytes(body)
        size = len(data)
        hint: Hint | None = None
        with self._lock:
            conn = self._connection()
            # IMMEDIATE takes the write lock up front, so the bound check and the insert see the
            # same state even with another process appending to the same file.
            with self._transaction(conn):
                self._refresh(conn)
                total = self._total()
                total_bytes = sum(self._bytes.values())
                if total + 1 > self.max_hints:
                    bound = f"max_hints={self.max_hints} reached ({total} hints pending)"
                elif total_bytes + size > self.max_bytes:
                    bound = (
                        f"max_bytes={self.max_bytes} would be exceeded ({total_bytes} bytes "
                        f"pending, hint of {size} bytes)"
                    )
                else:
                    fields = (node, tenant, database, collection_id, collection_name, op, data)
                    created_at = float(self._clock())
                    cur = conn.execute(
                        "INSERT INTO hints (node, tenant, database, collection_id,"
                        " collection_name, op, body, created_at, size)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (*fields, created_at, size),
                    )
                    assert cur.lastrowid is not None
                    hint = Hint(cur.lastrowid, *fields, created_at)
            if hint is not None:
                self._counts[node] = self._counts.get(node, 0) + 1
                self._bytes[node] = self._bytes.get(node, 0) + size
                self._full = False
                return hint
            # A full log rejects every missed write until replays drain it: warn once per
            # episode, not once per write.
            log = logger.debug if self._full else logger.warning
            self._full = True
        log("hint log full, missed %s for node %s not recorded: %s", op, _redact(node), bound)
        raise HintLogFullError(
            f"hint log full, cannot record missed {op} for node {_redact(node)}: {bound}",
            node=node,
        )

    def pending(self, node: str, limit: int = 500) -> list[Hint]:
        """Up to ``limit`` of ``node``'s hints, oldest (lowest id) first."""
        _non_empty("node", node)
        _positive_int("limit", limit)
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    f"SELECT {_COLUMNS} FROM hints WHERE node = ? ORDER BY id LIMIT ?",
                    (node, limit),
                )
                .fetchall()
            )
        return [Hint(*row) for row in rows]

    def ack(self, node: str, upto_id: int) -> int:
        """Delete ``node``'s hints with ``id <= upto_id`` (replayed in order); return how many."""
        _non_empty("node", node)
        if isinstance(upto_id, bool) or not isinstance(upto_id, int):
            raise ValueError(f"upto_id must be an integer, got {upto_id!r}")
        return self._delete("node = ? AND id <= ?", (node, upto_id)).get(node, 0)

    def count(self, node: str | None = None) -> int:
        """Pending hints of ``node``, or of every node when ``node`` is None."""
        if node is not None:
            _non_empty("node", node)
        with self._lock:
            self._refresh(self._connection())
            return self._total() if node is None else self._counts.get(node, 0)

    def nodes(self) -> dict[str, int]:
        """Pending hint count per node, for nodes that have any."""
        with self._lock:
            self._refresh(self._connection())
            return dict(self._counts)

    def expire(self) -> dict[str, int]:
        """Drop hints older than ``max_age``; return how many were dropped per node.

        A node that lost hints has missed writes nobody will replay: the caller must mark it for
        repair.
        """
        cutoff = float(self._clock()) - self.max_age
        return self._delete("created_at < ?", (cutoff,))

    def drop_node(self, node: str) -> int:
        """Forget every hint of ``node`` (after a full repair made them moot); return how many."""
        _non_empty("node", node)
        return self._delete("node = ?", (node,)).get(node, 0)

    def _delete(self, where: str, params: tuple[str | int | float, ...]) -> dict[str, int]:
        """Delete the rows matching ``where``; return how many per node."""
        with self._lock:
            conn = self._connection()
            with self._transaction(conn):
                self._refresh(conn)
                rows = conn.execute(
                    f"SELECT node, COUNT(*), SUM(size) FROM hints WHERE {where} GROUP BY node",
                    params,
                ).fetchall()
                if rows:
                    conn.execute(f"DELETE FROM hints WHERE {where}", params)
            for node, n, size in rows:
                left = self._counts.get(node, 0) - n
                if left > 0:
                    self._counts[node] = left
                    self._bytes[node] -= size
                else:
                    self._counts.pop(node, None)
                    self._bytes.pop(node, None)
        return {node: n for node, n, _ in rows}

    def lease(self, node: str, owner: str, ttl: float) -> bool:
        """Take (or renew) the right to replay ``node``'s hints for ``ttl`` seconds.

        Two processes replaying the same hints could interleave and leave an older write
        last, so replay is exclusive per node across every process sharing this file. False
        when another owner holds an unexpired lease.
        """
        _non_empty("node", node)
        _non_empty("owner", owner)
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        with self._lock:
            conn = self._connection()
            with self._transaction(conn):
                now = self._clock()
                row = conn.execute(
                    "SELECT owner, until FROM leases WHERE node = ?", (node,)
                ).fetchone()
                if row is not None and row[0] != owner and row[1] > now:
                    return False
                conn.execute(
                    "INSERT OR REPLACE INTO leases (node, owner, until) VALUES (?, ?, ?)",
                    (node, owner, now + ttl),
                )
                return True

    def release(self, node: str, owner: str) -> None:
        """Give up a lease taken with :meth:`lease` (no-op if another owner holds it)."""
        with self._lock:
            conn = self._connection()
            with self._transaction(conn):
                conn.execute("DELETE FROM leases WHERE node = ? AND owner = ?", (node, owner))

    def close(self) -> None:
        """Close the file. Idempotent; any other call afterwards raises ClientClosedError."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> HintLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
