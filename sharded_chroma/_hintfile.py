"""Which hint-log file a cluster uses on this host.

A file belongs to one tenant and database and to the set of node URLs it was opened for, both
recorded inside it (``cluster`` and ``members`` tables). A topology that gained or lost a shard
still shares nodes with the one before, so it adopts that file instead of starting an empty one:
otherwise the hints and needs-repair marks pending there would be orphaned (never replayed, and
the copy they describe would serve reads as if it were current). Two clusters with no node in
common keep separate files, so neither ever replays the other's writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._errors import ConfigurationError
from ._hintdb import connect, transaction

__all__ = ["claim_hint_file"]

logger = logging.getLogger("sharded_chroma.hints")


@dataclass(frozen=True)
class _Identity:
    tenant: str | None
    database: str | None
    nodes: frozenset[str]
    recorded: bool
    """Whether the file names its cluster; a file from before the ``members`` table only
    knows the nodes it holds hints or state of, and the tenants of its hints."""
    tenants: frozenset[tuple[str, str]] = frozenset()

    def matches(self, tenant: str, database: str, nodes: frozenset[str]) -> bool:
        if not self.nodes & nodes:
            return False
        if self.recorded:
            return (self.tenant, self.database) == (tenant, database)
        return self.tenants <= {(tenant, database)}


def _exact_name(tenant: str, database: str, nodes: Sequence[str]) -> str:
    key = hashlib.sha256("\n".join([tenant, database, *sorted(nodes)]).encode())
    return f"{key.hexdigest()[:16]}.sqlite3"


def _tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {str(r[0]) for r in rows}


def _identity(path: Path) -> _Identity | None:
    """What ``path`` says it belongs to; None for a file that is not a readable hint log."""
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10.0)
    except sqlite3.Error:
        return None
    try:
        tables = _tables(conn)
        if "members" in tables and "cluster" in tables:
            meta = dict(conn.execute("SELECT key, value FROM cluster").fetchall())
            if "tenant" in meta:
                nodes = frozenset(r[0] for r in conn.execute("SELECT url FROM members"))
                return _Identity(meta.get("tenant"), meta.get("database"), nodes, True)
        if "hints" not in tables:
            return None
        known = {r[0] for r in conn.execute("SELECT DISTINCT node FROM hints")}
        if "node_state" in tables:
            known |= {r[0] for r in conn.execute("SELECT node FROM node_state")}
        tenants = frozenset(
            (str(t), str(d)) for t, d in conn.execute("SELECT DISTINCT tenant, database FROM hints")
        )
        return _Identity(None, None, frozenset(known), False, tenants)
    except sqlite3.Error as exc:
        logger.warning("hint log %s not readable, ignored when choosing one: %s", path.name, exc)
        return None
    finally:
        conn.close()


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Serialise the choice between processes of this host: two starting at once with grown
    topologies must adopt the same file, not create one each."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the choice is unserialised
        yield
        return
    fd = os.open(folder / ".choose.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def claim_hint_file(folder: Path, tenant: str, database: str, nodes: Sequence[str]) -> Path:
    """The file in ``folder`` for this cluster, its membership brought up to ``nodes``.

    The file whose name comes from exactly these nodes if it exists; else the one file whose
    nodes overlap these (same tenant and database); else a new one. Raises
    :class:`ConfigurationError` if several files overlap: their hints cannot be merged while
    other processes may be writing them, and using either would hide the other's.
    """
    wanted = frozenset(nodes)
    if not wanted:
        raise ConfigurationError("a hint log needs at least one node")
    folder.mkdir(parents=True, exist_ok=True)
    exact = folder / _exact_name(tenant, database, sorted(wanted))
    with _folder_lock(folder):
        overlapping = [
            p
            for p in sorted(folder.glob("*.sqlite3"))
            if (ident := _identity(p)) is not None and ident.matches(tenant, database, wanted)
        ]
        others = [p for p in overlapping if p != exact]
        if (exact.exists() and others) or len(others) > 1:
            names = ", ".join(p.name for p in ([exact] if exact.exists() else []) + others)
            raise ConfigurationError(
                f"hint logs {names} in {folder} each hold state of nodes of this cluster; "
                "replay them with clients of the topologies that wrote them "
                "(`sharded-chroma repair`) and remove all but one, or give this cluster "
                "another replication.hints_dir"
            )
        chosen = others[0] if others else exact
        if chosen != exact:
            logger.info(
                "hint log %s adopted: its nodes overlap this topology's (a shard was added "
                "or removed)",
                chosen.name,
            )
        conn = connect(chosen, migrate=True)
        try:
            with transaction(conn):
                conn.execute(
                    "INSERT OR IGNORE INTO cluster (key, value) VALUES ('tenant', ?), "
                    "('database', ?)",
                    (tenant, database),
                )
                now = time.time()
                conn.executemany(
                    "INSERT OR IGNORE INTO members (url, since) VALUES (?, ?)",
                    [(url, now) for url in sorted(wanted)],
                )
        finally:
            conn.close()
    return chosen
