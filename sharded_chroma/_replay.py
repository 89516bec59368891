"""Replaying a node's missed writes from the hint log: in order, exclusive per node across
tasks, threads and processes (a lease row in the log, renewed before every batch and given up
the moment it cannot be), and never older over newer (versions decide).

Two processes of a host write the same ids in their own order, so a hint may be older than what
the node already holds (written directly by a process that had not yet seen the node behind, or
by an earlier hint of another process). A record write is therefore sent only for records the
node holds no newer version of, and a delete removes only copies no newer than the delete.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import orjson
from chromadb.errors import ChromaError, NotFoundError

from ._errors import NodeAccessError, NodeUnavailableError
from ._hintruns import Run, coalesce
from ._hints import Hint, HintLog
from ._merge import take_rows
from ._node import HintTarget, Node
from ._nodeconfig import redact_url
from .catalog._state import VERSION_KEY

__all__ = ["HintReplayer", "ReplayTarget"]

logger = logging.getLogger("sharded_chroma.replicas")

ReplayTarget = Callable[[Node, HintTarget], Awaitable[str]]
"""Resolves the request path of a hinted write on a node (the physical ids' owner does)."""

# A batch stops well within its lease, so a replayer never writes on a lease it may have lost.
_LEASE_TTL = 30.0
_BATCH = 200
# While another host's older hints for a node come first: how often and how long to look
# again for its progress within one replay (seconds, tries).
_BOUND_POLL = 0.02
_BOUND_WAITS = 100
# Server errors on one hint: after this many, it is set aside rather than block the node.
_MAX_ATTEMPTS = 3
# Records per merged replay request: well under any server's batch limit.
_RUN_RECORDS = 500


def _version(meta: Any) -> int | None:
    value = meta.get(VERSION_KEY) if isinstance(meta, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _upto(batch: Sequence[Hint], limit: int) -> list[Hint]:
    """The hints before the first one newer than ``limit`` (no version counts as 0)."""
    return list(itertools.takewhile(lambda h: (h.version or 0) <= limit, batch))


class HintReplayer:
    """Replays the hints of one shard's nodes."""

    def __init__(
        self,
        shard: str,
        hints: HintLog,
        replay_target: ReplayTarget,
        clock: Callable[[], float] = time.monotonic,
        bound: Callable[[str], Awaitable[int | None]] | None = None,
    ) -> None:
        self.name = shard
        self._hints = hints
        self._replay_target = replay_target
        self._clock = clock
        # The newest version a node may be given now (other hosts' older hints first).
        self._bound = bound
        self._owner = f"{os.getpid()}-{uuid.uuid4().hex}"

    async def replay(self, node: Node, *, rate: float | None = None, wait: bool = False) -> int:
        """Apply a node's hints in order, at most ``rate`` per second if given; the node
        serves reads again once none are left (and it needs no repair).

        Returns how many hints were applied; 0 at once when another process is replaying
        this node, or another task or thread of this one (unless ``wait``: then after it).
        A replay cut short (lease lost, the node failing, a deadline of the caller) keeps
        what it applied: it is progress, not a failure.
        """
        if not node.replay_lock.acquire(blocking=False):
            if not wait:
                return 0
            # Polled, never a thread blocked on the lock: a blocked worker thread would hold
            # one of the loop's thread tokens (the holder needs one to finish) and could take
            # the lock after its caller was cancelled, leaving it taken for good.
            while not node.replay_lock.acquire(blocking=False):  # noqa: ASYNC110 - a thread lock
                await anyio.sleep(0.01)
        try:
            replayed = await self._replay_locked(node, rate)
        finally:
            node.replay_lock.release()
        if replayed:
            logger.info("shard %s node %s: replayed %d hint(s)", self.name, node.url, replayed)
            node.succeeded()
        return replayed

    async def _replay_locked(self, node: Node, rate: float | None) -> int:
        log = self._hints
        replayed = 0
        leased = False
        try:
            expired = await anyio.to_thread.run_sync(log.expire)
            for url, n in expired.items():
                logger.error(
                    "shard %s node %s: %d hint(s) expired before they could be replayed; "
                    "the node is marked for `sharded-chroma repair`",
                    self.name,
                    url,
                    n,
                )
            waits = 0
            while True:
                # Fenced: the lease is renewed before each batch, and a replayer that lost it
                # to another (after a stall longer than the lease) stops here.
                leased = await anyio.to_thread.run_sync(
                    log.lease, node.url, self._owner, _LEASE_TTL
                )
                if not leased:
                    break
                batch = await anyio.to_thread.run_sync(
                    functools.partial(
                        log.pending, node.url, _BATCH, by_version=self._bound is not None
                    )
                )
                limit = None if self._bound is None or not batch else await self._bound(node.url)
                if limit is not None:
                    # In order, up to the first hint another host's older ones must precede.
                    batch = _upto(batch, limit)
                    if not batch and waits < _BOUND_WAITS:
                        # Hosts' versions interleave: the other goes on meanwhile and says
                        # so within a publishing tick, so look again soon, not a probe later.
                        waits += 1
                        await anyio.sleep(_BOUND_POLL)
                        continue
                    waits = 0
                if not batch:
                    if limit is not None:
                        logger.debug(
                            "shard %s node %s: hints wait for another host's older ones",
                            self.name,
                            redact_url(node.url),
                        )
                    break
                applied, finished = 0, False
                with anyio.move_on_after(_LEASE_TTL / 2):
                    applied, finished = await self._apply(node, batch, log, rate)
                replayed += applied
                node.transport.stats.replayed += applied
                if not finished:
                    break
        finally:
            if leased:
                with anyio.CancelScope(shield=True):
                    try:
                        await anyio.to_thread.run_sync(log.release, node.url, self._owner)
                    except Exception as exc:  # it expires on its own; another may then take it
                        logger.warning("replay lease of %s not released: %s", node.url, exc)
        return replayed

    async def _apply(
        self, node: Node, batch: Sequence[Hint], log: HintLog, rate: float | None
    ) -> tuple[int, bool]:
        """Apply ``batch`` in order, runs of record writes as one request each; (how many
        were applied or set aside, whether all were)."""
        done: list[int] = []
        applied = 0
        started = time.perf_counter()
        try:
            for run in await self._runs(node, batch):
                if not await self._apply_run(node, run, log):
                    return applied, False
                done.extend(h.id for h in run.hints)
                applied += len(run.hints)
                if rate:
                    ahead = applied / rate - (time.perf_counter() - started)
                    if ahead > 0:
                        await anyio.sleep(ahead)
        except (NodeUnavailableError, NodeAccessError):
            # Refused credentials are the client's configuration, not the hint's fault: the
            # hint stays for a client configured right.
            node.failed(self._clock())
            return applied, False
        finally:
            if done:
                # Shielded: an applied hint that is not acknowledged would be applied again.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(log.ack_ids, node.url, done)
        return applied, True

    async def _runs(self, node: Node, batch: Sequence[Hint]) -> list[Run]:
        items: list[tuple[Hint, str, dict[str, Any]]] = []
        for hint in batch:
            target = HintTarget(
                hint.tenant, hint.database, hint.collection_id, hint.collection_name, hint.op
            )
            # The path the write was meant for, if known: a collection made again since has
            # another physical id there, and the hint then has nothing to apply to.
            try:
                path = hint.path or await self._replay_target(node, target)
            except NotFoundError:
                path = ""  # the collection was deleted since: nothing to apply to
            items.append((hint, path, orjson.loads(hint.body)))
        return coalesce(items, _RUN_RECORDS)

    async def _apply_run(self, node: Node, run: Run, log: HintLog) -> bool:
        """Apply one run; False when the node failed (the run is left for later)."""
        if len(run.hints) > 1:
            try:
                await self._send(node, run.op, run.path, run.body(), None)
                return True
            except NotFoundError:
                logger.info("%d hint(s) for a deleted collection skipped", len(run.hints))
                return True
            except ChromaError:
                pass  # one of them is refused: apply them one by one to find which
        for hint, body in zip(run.hints, run.bodies, strict=True):
            try:
                if run.path:
                    await self._send(node, hint.op, run.path, body, hint.version)
                else:
                    logger.info("hint %d for a deleted collection skipped", hint.id)
            except NotFoundError:
                logger.info("hint %d for a deleted collection skipped", hint.id)
            except ChromaError as exc:
                if not await self._refused(node, hint, exc, log):
                    node.failed(self._clock())
                    return False
        return True

    async def _refused(self, node: Node, hint: Hint, exc: ChromaError, log: HintLog) -> bool:
        """Count a refusal; True when the hint was set aside (quarantined) and replay goes on.
        A client error will never succeed; a server error gets a few tries first."""
        server = exc.code() >= 500
        final = not server or hint.attempts + 1 >= _MAX_ATTEMPTS
        error = f"{type(exc).__name__}: {exc}"
        await anyio.to_thread.run_sync(lambda: log.refused(hint, error, quarantine=final))
        if final:
            logger.error(
                "shard %s node %s refused hint %d (%s); kept aside, node marked for repair",
                self.name,
                node.url,
                hint.id,
                error,
            )
        return final

    async def _send(
        self, node: Node, op: str, path: str, body: dict[str, Any], version: int | None
    ) -> None:
        if op == "delete":
            content: bytes | None = self._bounded_delete(body, version)
        else:
            content = await self._not_older(node, path, body)
        if content is not None:
            await node.transport.request("POST", path, content=content)

    @staticmethod
    def _bounded_delete(body: dict[str, Any], version: int | None) -> bytes:
        if version is not None:
            cond = {VERSION_KEY: {"$lte": version}}
            where = body.get("where")
            body = {**body, "where": {"$and": [where, cond]} if where else cond}
        return orjson.dumps(body)

    async def _not_older(self, node: Node, path: str, body: dict[str, Any]) -> bytes | None:
        """The body's records the node holds no newer version of (None: none left)."""
        ids = body.get("ids") or []
        metas = body.get("metadatas")
        ours = [_version(m) for m in metas] if isinstance(metas, list) else [None] * len(ids)
        if not ids or all(v is None for v in ours):
            return orjson.dumps(body)
        base = path.rsplit("/", 1)[0]
        got = await node.transport.request(
            "POST", f"{base}/get", body={"ids": ids, "include": ["metadatas"]}
        )
        theirs = {
            i: _version(m) for i, m in zip(got["ids"], got.get("metadatas") or [], strict=False)
        }
        keep = [
            k
            for k, record_id in enumerate(ids)
            if ours[k] is None or (theirs.get(record_id) or 0) <= (ours[k] or 0)
        ]
        if not keep:
            return None
        return orjson.dumps(body if len(keep) == len(ids) else take_rows(body, keep))
