"""HintLog: a durable, bounded log of writes a replica missed, replayed in order when it is back,
and the durable state of every node (see ``_hintdb`` for the file).

A hint stands for a write the cluster already acknowledged to the caller, so losing one silently
would leave a replica diverged with nobody knowing. Hence SQLite with ``synchronous=FULL``: every
``append`` is on disk when it returns, at the price of one fsync per hint. Whatever drops a hint
without replaying it (expiry, quarantine) marks its node needs-repair in the same transaction.

Every method is blocking and thread-safe; the async client calls the slow ones through
``anyio.to_thread.run_sync``. Several processes may open the same file: SQLite serialises their
writes, and every count is read from the file, never from a copy in memory.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from ._errors import ClientClosedError, HintLogFullError
from ._hintdb import connect, mark_repair, transaction
from ._nodeconfig import redact_url as _redact

__all__ = ["OPS", "Hint", "HintLog"]

logger = logging.getLogger("sharded_chroma.hints")

OPS = frozenset({"add", "upsert", "update", "delete"})

_COLUMNS = (
    "id, node, tenant, database, collection_id, collection_name, op, body, created_at,"
    " version, attempts, path"
)


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
    version: int | None = None
    """The write's version, for deletes (records carry their own in their metadata)."""
    attempts: int = 0
    """Times the node refused this hint with a Chroma error."""
    path: str | None = None
    """The request path on the node (its physical collection id in it), when it was known."""


def _non_empty(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {type(value).__name__}")
    return value


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class HintLog:
    """Durable per-node queues of missed writes and per-node state, in one SQLite file.

    Bounds: ``max_hints`` pending hints and ``max_bytes`` of bodies in total (over all nodes);
    ``append`` raises :class:`HintLogFullError` rather than exceed them. ``expire`` drops hints
    and tombstones older than ``max_age`` seconds, measured with ``clock``.
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
        self._full = False
        self._conn: sqlite3.Connection | None = connect(self.path, migrate=True)
        logger.debug("hint log %s opened with %d pending hint(s)", self.path, self.count())

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ClientClosedError("hint log used after close()")
        return self._conn

    # -- hints ----------------------------------------------------------------------------------

    def append(
        self,
        node: str,
        tenant: str,
        database: str,
        collection_id: str,
        collection_name: str,
        op: str,
        body: bytes,
        *,
        version: int | None = None,
        deleted_ids: Sequence[str] = (),
        deleted_version: int | None = None,
        path: str | None = None,
    ) -> Hint:
        """Durably record that ``node`` missed a write; return the stored hint.

        A delete names its ``version`` and the ``deleted_ids`` it surely removes (up to
        ``deleted_version``, default ``version``), kept as ``node``'s tombstones as long as
        hints are, and while any node needs repair. Raises :class:`HintLogFullError` (no hint
        stored; the tombstones are) if the hint would exceed ``max_hints`` or ``max_bytes``.
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
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise ValueError(f"version must be an integer, got {version!r}")
        data = bytes(body)
        size = len(data)
        hint: Hint | None = None
        with self._lock:
            conn = self._connection()
            with transaction(conn):
                total, total_bytes = conn.execute(
                    "SELECT COALESCE(SUM(pending), 0), COALESCE(SUM(bytes), 0) FROM node_state"
                ).fetchone()
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
                        " collection_name, op, body, created_at, size, version, path)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (*fields, created_at, size, version, path),
                    )
                    assert cur.lastrowid is not None
                    hint = Hint(cur.lastrowid, *fields, created_at, version, 0, path)
                # Tombstones even when the hint does not fit (they are small and unbounded by
                # the hint bounds): the copy is then marked for repair, which needs them.
                upto = version if deleted_version is None else deleted_version
                if upto is not None and deleted_ids:
                    self._tombstones(conn, node, collection_id, deleted_ids, upto)
            if hint is not None:
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

    def _tombstones(
        self,
        conn: sqlite3.Connection,
        node: str,
        collection_id: str,
        ids: Sequence[str],
        version: int,
    ) -> None:
        now = float(self._clock())
        conn.executemany(
            "INSERT INTO tombstones (node, collection_id, record_id, version, created_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
            " version = MAX(version, excluded.version), created_at = excluded.created_at",
            [(node, collection_id, i, version, now) for i in ids],
        )

    def pending(self, node: str, limit: int = 500, *, by_version: bool = False) -> list[Hint]:
        """Up to ``limit`` of ``node``'s hints, oldest (lowest id) first; ``by_version``:
        lowest version first (none counts as 0), as hosts replaying to one node must."""
        _non_empty("node", node)
        _positive_int("limit", limit)
        order = "version, id" if by_version else "id"  # NULLs first, by the index
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    f"SELECT {_COLUMNS} FROM hints WHERE node = ? ORDER BY {order} LIMIT ?",
                    (node, limit),
                )
                .fetchall()
            )
        return [Hint(*row) for row in rows]

    def last_id(self) -> int:
        """The newest pending hint's id (0 if none): ids only grow, so a hint appended after
        this call, by any process, has a larger one."""
        with self._lock:
            row = self._connection().execute("SELECT COALESCE(MAX(id), 0) FROM hints").fetchone()
        return int(row[0])

    def pending_upto(self, nodes: Sequence[str], upto_id: int) -> dict[str, int]:
        """Per node of ``nodes``, how many of its hints with ``id <= upto_id`` are pending."""
        marks = ", ".join("?" * len(nodes))
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    f"SELECT node, COUNT(*) FROM hints WHERE id <= ? AND node IN ({marks})"
                    " GROUP BY node",
                    (upto_id, *nodes),
                )
                .fetchall()
            )
        return {str(node): int(n) for node, n in rows}

    def ack(self, node: str, upto_id: int) -> int:
        """Delete ``node``'s hints with ``id <= upto_id`` (replayed in order); return how many."""
        _non_empty("node", node)
        if isinstance(upto_id, bool) or not isinstance(upto_id, int):
            raise ValueError(f"upto_id must be an integer, got {upto_id!r}")
        return self._delete("node = ? AND id <= ?", (node, upto_id)).get(node, 0)

    def ack_ids(self, node: str, ids: Sequence[int]) -> int:
        """Delete those of ``node``'s hints (replayed); return how many were still pending."""
        _non_empty("node", node)
        done = 0
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            done += self._delete(f"node = ? AND id IN ({marks})", (node, *chunk)).get(node, 0)
        return done

    def refused(self, hint: Hint, error: str, *, quarantine: bool) -> int:
        """Count one refusal of ``hint`` by its node; with ``quarantine`` move it out of the
        queue (kept, with ``error``) and mark the node needs-repair. Returns its attempts."""
        with self._lock:
            conn = self._connection()
            with transaction(conn):
                row = conn.execute(
                    "UPDATE hints SET attempts = attempts + 1 WHERE id = ? RETURNING attempts",
                    (hint.id,),
                ).fetchone()
                if row is None:  # acknowledged or dropped meanwhile
                    return hint.attempts
                if quarantine:
                    now = float(self._clock())
                    conn.execute(
                        "INSERT INTO quarantine SELECT id, node, tenant, database,"
                        " collection_id, collection_name, op, body, size, created_at, version,"
                        " path, ?, ? FROM hints WHERE id = ?",
                        (error[:500], now, hint.id),
                    )
                    conn.execute("DELETE FROM hints WHERE id = ?", (hint.id,))
                    conn.execute(
                        "UPDATE node_state SET quarantined = quarantined + 1 WHERE node = ?",
                        (hint.node,),
                    )
                    mark_repair(conn, hint.node, f"hint {hint.id} refused: {error[:200]}", now)
                return int(row[0])

    def count(self, node: str | None = None) -> int:
        """Pending hints of ``node``, or of every node when ``node`` is None."""
        if node is not None:
            _non_empty("node", node)
        counts = self.nodes()
        return sum(counts.values()) if node is None else counts.get(node, 0)

    def nodes(self) -> dict[str, int]:
        """Pending hint count per node, for nodes that have any."""
        with self._lock:
            rows = (
                self._connection()
                .execute("SELECT node, pending FROM node_state WHERE pending > 0")
                .fetchall()
            )
        return dict(rows)

    def expire(self) -> dict[str, int]:
        """Drop hints older than ``max_age``; return how many were dropped per node. A node
        that lost hints missed writes nobody will replay: it is marked needs-repair in the same
        transaction. Tombstones older than ``max_age`` go too, but none while any node needs
        repair: the repair needs them to tell a missed delete from a missed add."""
        cutoff = float(self._clock()) - self.max_age
        return self._delete("created_at < ?", (cutoff,), lost="hints expired before replay")

    def drop_node(self, node: str) -> int:
        """Forget every hint of ``node`` (after a full repair made them moot); return how many."""
        _non_empty("node", node)
        return self._delete("node = ?", (node,)).get(node, 0)

    def _delete(
        self, where: str, params: tuple[str | int | float, ...], *, lost: str | None = None
    ) -> dict[str, int]:
        """Delete the hints matching ``where``; return how many per node. With ``lost``, the
        nodes concerned are marked needs-repair (their missed writes are gone)."""
        with self._lock:
            conn = self._connection()
            with transaction(conn):
                rows = conn.execute(
                    f"SELECT node, COUNT(*), SUM(size) FROM hints WHERE {where} GROUP BY node",
                    params,
                ).fetchall()
                if rows:
                    conn.execute(f"DELETE FROM hints WHERE {where}", params)
                for node, n, _size in rows:
                    if lost is not None:
                        mark_repair(conn, node, f"{n} {lost}", float(self._clock()))
                if lost is not None:
                    conn.execute(
                        f"DELETE FROM tombstones WHERE {where} AND NOT EXISTS"
                        " (SELECT 1 FROM node_state WHERE needs_repair = 1)",
                        params,
                    )
        return {node: n for node, n, _ in rows}

    # -- leases ---------------------------------------------------------------------------------

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
            with transaction(conn):
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
            with transaction(conn):
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
