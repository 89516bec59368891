"""Switching a SQLite connection to WAL mode when other processes may be opening the file.

The switch from a rollback journal takes an exclusive lock, and SQLite does not call the
busy handler when a connection that already holds the shared lock must wait for another's
reserved one (it would deadlock), so ``PRAGMA journal_mode=WAL`` fails at once with
"database is locked" while a second process runs its first transaction on a new file. The
busy timeout does not cover it; this retries until a deadline instead.
"""

from __future__ import annotations

import sqlite3
import time

__all__ = ["enable_wal"]

_PAUSE_S = 0.01


def enable_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Put ``conn``'s file in WAL mode, retrying a busy lock for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            busy = "locked" in str(exc) or "busy" in str(exc)
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(_PAUSE_S)
            continue
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"journal mode stayed {mode!r}, WAL is required")
        return
