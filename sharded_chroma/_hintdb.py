"""The hint log's SQLite file: schema, migrations and transactions.

One file per cluster per host holds the missed writes (``hints``), the durable state of every
node (``node_state``: pending counts, needs-repair marks), hints a node kept refusing
(``quarantine``), the ids deleted by hinted deletes (``tombstones``), replay leases, and which
cluster the file is for (``cluster``, ``members``: see ``_hintfile``). Every
process of the host opens the same file, which is what makes the node state shared.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._sqlitewal import enable_wal

__all__ = ["SCHEMA_VERSION", "connect", "mark_repair", "transaction"]

SCHEMA_VERSION = 2
# Another process may hold the write lock for one fsync-ed commit at a time; seconds of waiting
# only happen when the disk is stalled, and then failing loudly is better than hanging forever.
_BUSY_TIMEOUT_S = 10.0

_V1 = """
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
CREATE INDEX IF NOT EXISTS hints_created_at ON hints (created_at);
CREATE TABLE IF NOT EXISTS leases (
    node TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until REAL NOT NULL
)
"""

_V2 = """
ALTER TABLE hints ADD COLUMN version INTEGER;
ALTER TABLE hints ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
-- The request path the write was meant for, physical collection id included, when known: a
-- collection (or time bucket) dropped and made again has a new id, so an old hint never
-- lands in the new one.
ALTER TABLE hints ADD COLUMN path TEXT;
-- Counters of the hints per node, so reading every node's state is one small table however
-- many hints are pending. Kept by triggers, in the same transaction as the change they count,
-- so a process still running older code (which knows no counters) cannot make them drift.
CREATE TABLE node_state (
    node TEXT PRIMARY KEY,
    pending INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    quarantined INTEGER NOT NULL DEFAULT 0,
    needs_repair INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    since REAL,
    -- Bumped by every mark: a repair clears a mark only if none was added since it began.
    mark_gen INTEGER NOT NULL DEFAULT 0
);
INSERT INTO node_state (node, pending, bytes)
    SELECT node, COUNT(*), SUM(size) FROM hints GROUP BY node;
CREATE TABLE quarantine (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    tenant TEXT NOT NULL,
    database TEXT NOT NULL,
    collection_id TEXT NOT NULL,
    collection_name TEXT NOT NULL,
    op TEXT NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    version INTEGER,
    path TEXT,
    error TEXT NOT NULL,
    quarantined_at REAL NOT NULL
);
-- A delete a node missed: that node's copy of the record, at most that version, is deleted.
-- Keyed by the node (a record moved to another shard is not the deleted one) and the part.
CREATE TABLE tombstones (
    node TEXT NOT NULL,
    collection_id TEXT NOT NULL,
    record_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (node, collection_id, record_id)
);
CREATE INDEX tombstones_created_at ON tombstones (created_at)
"""

# Additive tables, made by any version that knows them: older code ignores them, so the file
# keeps its schema version and a process still running that code keeps opening it.
_MEMBERSHIP = """
CREATE TABLE IF NOT EXISTS cluster (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (url TEXT PRIMARY KEY, since REAL NOT NULL);
CREATE INDEX IF NOT EXISTS hints_node_version ON hints (node, version)
"""

# Trigger bodies hold semicolons: executed one by one, after _V2.
_V2_TRIGGERS = (
    """CREATE TRIGGER hints_counted AFTER INSERT ON hints BEGIN
    INSERT INTO node_state (node, pending, bytes) VALUES (NEW.node, 1, NEW.size)
        ON CONFLICT(node) DO UPDATE SET pending = pending + 1, bytes = bytes + NEW.size;
END""",
    """CREATE TRIGGER hints_uncounted AFTER DELETE ON hints BEGIN
    UPDATE node_state SET pending = pending - 1, bytes = bytes - OLD.size
        WHERE node = OLD.node;
END""",
)


def _statements(script: str) -> Iterator[str]:
    for statement in script.split(";"):
        if statement.strip():
            yield statement


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any failure. IMMEDIATE takes the write
    lock up front, so checks and the changes they guard see one state across processes."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def connect(path: Path, *, migrate: bool) -> sqlite3.Connection:
    """Open the file (created owner-only: bodies hold user data); with ``migrate``, bring the
    schema to :data:`SCHEMA_VERSION` in one transaction."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created owner-only, but never opened here once it exists: closing any descriptor of
    # the file drops every POSIX lock this process holds on it, including those of its
    # SQLite connections (WAL mode keeps one per connection), and another process may then
    # take itself for the last user, checkpoint and reset the WAL under them: a corrupt file.
    if not path.exists():
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    conn = sqlite3.connect(
        path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    try:
        enable_wal(conn, _BUSY_TIMEOUT_S)
        conn.execute("PRAGMA synchronous=FULL")
        if migrate:
            with transaction(conn):
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, 1, SCHEMA_VERSION):
                    raise ValueError(
                        f"hint log {path.name} has schema version {version}, "
                        f"this code reads versions up to {SCHEMA_VERSION}"
                    )
                if version < 1:
                    for statement in _statements(_V1):
                        conn.execute(statement)
                if version < 2:
                    for statement in (*_statements(_V2), *_V2_TRIGGERS):
                        conn.execute(statement)
                for statement in _statements(_MEMBERSHIP):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn


def mark_repair(conn: sqlite3.Connection, node: str, reason: str, now: float) -> None:
    """Mark ``node`` needs-repair, keeping the first reason and time of an open mark."""
    conn.execute(
        "INSERT INTO node_state (node, needs_repair, reason, since, mark_gen)"
        " VALUES (?, 1, ?, ?, 1) ON CONFLICT(node) DO UPDATE SET needs_repair = 1,"
        " reason = COALESCE(reason, excluded.reason), since = COALESCE(since, excluded.since),"
        " mark_gen = mark_gen + 1",
        (node, reason, now),
    )
