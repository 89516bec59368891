"""The durable, shared state of every node: how many missed writes wait for it, and whether it
lost some (needs repair). A copy is *behind* while either holds; a behind copy serves no reads.

``NodeStateStore`` is the narrow interface; ``SqliteNodeStore`` keeps the state in the host's
hint-log file, so every process of the host sees what any of them wrote, and it survives
restarts. With a control store, ``control._nodes.SharedNodeStore`` implements the same
interface over it and the control store, so every host sees every other's.
``NodeStates`` is one process's view: it re-reads the store whenever the store changed, which
costs one ``PRAGMA data_version`` per call when nothing did.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from ._errors import ClientClosedError, ControlUnavailableError
from ._hintdb import connect, mark_repair, transaction

__all__ = ["NodeState", "NodeStateStore", "NodeStates", "OwnedNodeStore", "SqliteNodeStore"]

logger = logging.getLogger("sharded_chroma.replicas")


@dataclass(frozen=True)
class NodeState:
    """What this host knows about one node."""

    pending: int = 0
    """Missed writes waiting in the hint log."""
    needs_repair: bool = False
    """It lost writes nobody will replay (a full log, an expired or quarantined hint)."""
    reason: str | None = None
    quarantined: int = 0
    """Hints it kept refusing, kept aside until a repair."""
    mark_gen: int = 0
    """Changes with every new mark; a repair clears only the marks it saw begin."""
    last_quarantined: int = 0
    """The newest quarantined hint's id (0: none)."""
    elsewhere: int = 0
    """Other hosts' hint logs holding missed writes for it (with a control store)."""
    shared_mark: int = 0
    """The control-store revision of its cluster-wide needs-repair mark (0: none)."""
    orphans: tuple[tuple[str, int], ...] = ()
    """Keys (and revisions) saying a hint log whose every client is gone holds writes for
    it: nobody may replay them, so the node needs repair; a repair clears these."""

    @property
    def behind(self) -> bool:
        return self.pending > 0 or self.needs_repair or self.elsewhere > 0


class NodeStateStore(Protocol):
    """Where node state lives. Every method is blocking and thread-safe."""

    shared: bool
    """Whether other hosts' hint logs are in it (then replays go in version order)."""

    def version(self) -> int:
        """A value that changes whenever the stored state may have changed."""

    def states(self) -> dict[str, NodeState]:
        """Every node with a non-default state."""

    def mark_needs_repair(self, node: str, reason: str) -> None: ...

    def publish(self, node: str) -> None:
        """Return once every host can see that this host holds missed writes for ``node``
        (called after a hint was kept, before the write is acknowledged); raises
        ``ControlUnavailableError`` when that cannot be made known."""

    def clear_repair(self, node: str, seen: NodeState) -> None:
        """Clear the mark and the quarantined hints ``seen`` (a state read before the repair
        began); a mark or quarantine added since stays."""

    async def fence(self) -> None:
        """Before a read of records: take in whatever any host published before now."""

    def replay_bound(self, node: str) -> int | None:
        """The newest version this host may replay to ``node`` now: other hosts' logs hold
        missed writes for it from that version on, which must land first (None: no bound)."""

    def tombstones(self, node: str, collection_id: str, ids: Iterable[str]) -> dict[str, int]:
        """Delete versions of those ``ids`` that ``node`` missed a delete of."""


class OwnedNodeStore(NodeStateStore, Protocol):
    """A store its owner closes."""

    def close(self) -> None: ...


_STATES = (
    "SELECT node, pending, needs_repair, reason, quarantined, mark_gen,"
    " (SELECT COALESCE(MAX(q.id), 0) FROM quarantine q WHERE q.node = node_state.node)"
    " FROM node_state"
)


class SqliteNodeStore:
    """Node state in the hint-log file (see ``_hintdb``). Reads have their own connection
    and lock, so a read on a caller's event loop never waits behind a write's file lock."""

    shared = False

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = connect(path, migrate=True)
        self._read_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = connect(path, migrate=False)

    def _writer(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ClientClosedError("node state used after close()")
        return self._conn

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._read_lock:
            if self._reader is None:
                raise ClientClosedError("node state used after close()")
            return self._reader.execute(sql, params).fetchall()

    def version(self) -> int:
        # Changes on commits of every other connection, this store's writer included.
        return int(self._read("PRAGMA data_version")[0][0])

    def states(self) -> dict[str, NodeState]:
        out: dict[str, NodeState] = {}
        for node, pending, repair, reason, quarantined, gen, last in self._read(_STATES):
            if pending or quarantined or repair:
                out[str(node)] = NodeState(
                    int(pending),
                    bool(repair),
                    None if reason is None else str(reason),
                    int(quarantined),
                    int(gen),
                    int(last),
                )
        return out

    def mark_needs_repair(self, node: str, reason: str) -> None:
        with self._lock:
            conn = self._writer()
            with transaction(conn):
                mark_repair(conn, node, reason, float(self._clock()))

    def publish(self, node: str) -> None:
        """Every process of this host reads the file: nothing to do."""

    async def fence(self) -> None:
        """Reads of the file are current already."""

    def replay_bound(self, node: str) -> int | None:
        """One hint log per host: no other to wait for."""
        return None

    def oldest(self) -> dict[str, int]:
        """Per node with hints pending, the lowest version among them (0 for a hint without
        one: it must land before anything versioned another host holds)."""
        out: dict[str, int] = {}
        for (node,) in self._read("SELECT node FROM node_state WHERE pending > 0"):
            # By the (node, version) index; NULLs sort first.
            rows = self._read(
                "SELECT version FROM hints WHERE node = ? ORDER BY version LIMIT 1", (node,)
            )
            if rows:
                out[str(node)] = 0 if rows[0][0] is None else int(rows[0][0])
        return out

    def log_id(self) -> str:
        """This hint log's identity, the same for every process that opens the file and
        different for every other file (other hosts' logs)."""
        with self._lock:
            conn = self._writer()
            with transaction(conn):
                conn.execute(
                    "INSERT OR IGNORE INTO cluster (key, value) VALUES ('log_id', ?)",
                    (uuid.uuid4().hex,),
                )
                row = conn.execute("SELECT value FROM cluster WHERE key = 'log_id'").fetchone()
        return str(row[0])

    def clear_repair(self, node: str, seen: NodeState) -> None:
        with self._lock:
            conn = self._writer()
            with transaction(conn):
                conn.execute(
                    "DELETE FROM quarantine WHERE node = ? AND id <= ?",
                    (node, seen.last_quarantined),
                )
                conn.execute(
                    "UPDATE node_state SET quarantined ="
                    " (SELECT COUNT(*) FROM quarantine q WHERE q.node = node_state.node)"
                    " WHERE node = ?",
                    (node,),
                )
                conn.execute(
                    "UPDATE node_state SET needs_repair = 0, reason = NULL, since = NULL"
                    " WHERE node = ? AND mark_gen = ?",
                    (node, seen.mark_gen),
                )

    def tombstones(self, node: str, collection_id: str, ids: Iterable[str]) -> dict[str, int]:
        wanted = list(ids)
        found: dict[str, int] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._read(
                "SELECT record_id, version FROM tombstones WHERE node = ? AND collection_id = ?"
                f" AND record_id IN ({marks})",
                (node, collection_id, *chunk),
            )
            found.update({str(r): int(v) for r, v in rows})
        return found

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        with self._read_lock:
            reader, self._reader = self._reader, None
        for c in (conn, reader):
            if c is not None:
                c.close()


class NodeStates:
    """This process's view of the store, plus marks it could not store (the store failing is
    no reason to read from a copy known to be behind)."""

    def __init__(self, store: NodeStateStore | None) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._seen: int | None = None
        self._states: Mapping[str, NodeState] = {}
        self._local: dict[str, str] = {}

    def refresh(self) -> None:
        """Re-read the store if it changed since the last read."""
        store = self._store
        if store is None:
            return
        with self._lock:
            version = store.version()
            if version != self._seen:
                self._states = store.states()
                self._seen = version

    def changed(self) -> None:
        """This process wrote to the store (a hint, a mark): read it again on next refresh."""
        with self._lock:
            self._seen = None
        self.refresh()

    def get(self, node: str) -> NodeState:
        state = self._states.get(node, NodeState())
        reason = self._local.get(node)
        if reason is not None and not state.needs_repair:
            return replace(state, needs_repair=True, reason=reason)
        return state

    def behind(self, node: str) -> bool:
        return node in self._local or self.get(node).behind

    def mark_needs_repair(self, node: str, reason: str) -> None:
        """Durably if possible; otherwise in this process, loudly."""
        try:
            if self._store is None:
                raise RuntimeError("no node-state store (a shard without replicas)")
            self._store.mark_needs_repair(node, reason)
        except ControlUnavailableError:
            self.changed()  # stored on this host, not shared: the caller must not acknowledge
            raise
        except Exception as exc:  # kept in memory: never read from this copy again here
            logger.error(
                "node %s needs repair (%s) but the mark was not stored: %s", node, reason, exc
            )
            self._local[node] = reason
        self.changed()

    @property
    def shared(self) -> bool:
        """Whether the store holds other hosts' state too."""
        return self._store is not None and self._store.shared

    def publish(self, node: str) -> None:
        """See ``NodeStateStore.publish``."""
        if self._store is not None:
            self._store.publish(node)

    async def fence(self) -> None:
        """See ``NodeStateStore.fence``; then re-read."""
        if self._store is not None:
            await self._store.fence()
        self.refresh()

    async def replay_bound(self, node: str) -> int | None:
        """See ``NodeStateStore.replay_bound``; as of a fence begun now."""
        if self._store is None:
            return None
        await self._store.fence()
        return self._store.replay_bound(node)

    def clear_repair(self, node: str, seen: NodeState | None = None) -> None:
        """Clear ``node``'s mark as ``seen`` before a repair began (None: whatever it is now,
        for a reset that dropped everything)."""
        if self._store is not None:
            if seen is None:
                seen = self._store.states().get(node, NodeState())
            self._store.clear_repair(node, seen)
        self._local.pop(node, None)
        self.changed()

    def tombstones(self, node: str, collection_id: str, ids: Iterable[str]) -> dict[str, int]:
        if self._store is None:
            return {}
        return self._store.tombstones(node, collection_id, ids)
