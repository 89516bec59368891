"""Anti-entropy: compare every replica with its primary and repair the difference.

Copies drift when a missed write's hint is lost (another host's hint log, a full log), a node
is restored from an old backup or written to directly. ``verify`` finds such drift and
``repair`` removes it, the primary being the truth.

Comparison is by content digest, not by record: a copy's records are read page by page and each
record is reduced to ``id -> 16-byte digest`` at once. The primary and the replica are read in
lockstep and a record is dropped from memory as soon as its counterpart on the other copy has
been seen; since every copy receives writes in about the same order (Chroma returns records in
insertion order), what is held at any time is the records out of step between the two copies
plus the differences, and at worst (copies in opposite orders) one digest map of a shard.

Both are safe under live traffic: paging with offsets over a collection that changes may report
records that do not really differ (and miss some that do), so ``repair`` never trusts the scan:
it reads the suspect ids from both copies by id, fixes what still differs, and re-checks the
ids it touched, up to ``rounds`` times, to settle races with concurrent writes.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from chromadb.errors import ChromaError, InternalError, NotFoundError

from ._digest import page_digests
from ._errors import NodeUnavailableError, ShardedChromaError
from ._fanout import fan_out
from ._node import Node
from ._policies import TimePolicy
from ._replicas import ReplicaSet
from ._reports import PairRepair, PairReport, RepairReport, VerifyReport
from .catalog._state import CollectionState

if TYPE_CHECKING:
    from ._client import ShardedClient
    from ._runtime import Runtime

__all__ = ["PairRepair", "PairReport", "RepairReport", "VerifyReport", "repair", "verify"]

logger = logging.getLogger("sharded_chroma.antientropy")

Progress = Callable[[int, int], None]

T = TypeVar("T")

_INCLUDE = ["embeddings", "documents", "metadatas", "uris"]
_PARALLEL = 4
"""Pairs compared (or repaired) at once; each holds about two pages of records in flight."""


# -- reports (rendered as text by the CLI; the id tuples here are complete) -------------------
class _Diff:
    """Streaming comparison of two copies: each side's records not yet seen on the other."""

    def __init__(self) -> None:
        self.only: tuple[dict[str, bytes], dict[str, bytes]] = ({}, {})
        self.differing: list[str] = []
        self.seen = [0, 0]

    def feed(self, side: int, digests: Sequence[tuple[str, bytes]]) -> None:
        mine, other = self.only[side], self.only[1 - side]
        self.seen[side] += len(digests)
        for record_id, digest in digests:
            theirs = other.pop(record_id, None)
            if theirs is None:
                mine[record_id] = digest
            elif theirs != digest:
                self.differing.append(record_id)


async def _call(rs: ReplicaSet, node: Node, path: str, body: Mapping[str, Any]) -> Any:
    """One request to a chosen node, retried on connection failures and internal errors: Chroma
    1.5 can answer a paged get that races a delete with "Error finding id". Every request here
    is idempotent (reads, deletes by id, and an add of an id that exists is ignored)."""
    for attempt in range(rs.config.retries):
        try:
            return await node.transport.request("POST", path, body=body)
        except (NodeUnavailableError, InternalError):
            await anyio.sleep(rs.config.backoff * 2**attempt)
    return await node.transport.request("POST", path, body=body)


async def _both(
    backend: Runtime, pair: _Pair, state: CollectionState, ids: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The records ``ids`` as the primary and as the replica hold them, read concurrently."""

    async def read(node: Node) -> dict[str, Any]:
        path = await backend.physical.node_path(state, node, "/get")
        page: dict[str, Any] = await _call(pair.rs, node, path, {"ids": ids, "include": _INCLUDE})
        return page

    truth, copy = await _each([functools.partial(read, n) for n in (pair.rs.primary, pair.replica)])
    return truth, copy


async def _each(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run calls a few at a time (pairs of different shards load different servers); results
    in order, and the first failure raised as itself rather than in an exception group."""
    limiter = anyio.CapacityLimiter(_PARALLEL)

    async def run(call: Callable[[], Awaitable[T]]) -> T:
        async with limiter:
            return await call()

    done, failures = await fan_out({str(i): functools.partial(run, c) for i, c in enumerate(calls)})
    if failures:
        raise next(iter(failures.values()))
    return [done[str(i)] for i in range(len(calls))]


class _Ticker:
    """Progress in work units (records read, then fixed); the total grows as work is found."""

    def __init__(self, callback: Progress | None) -> None:
        self.callback, self.done, self.total = callback, 0, 0

    def __call__(self, *, done: int = 0, more: int = 0) -> None:
        self.done += done
        self.total = max(self.total + more, self.done)
        if self.callback is not None:
            self.callback(self.done, self.total)


def _reason(exc: BaseException) -> str:
    missing = isinstance(exc, NotFoundError)
    hint = " (missing on this node; get_or_create_collection() recreates it)" if missing else ""
    return f"{type(exc).__name__}: {exc}{hint}"


# -- verify -----------------------------------------------------------------------------------
@dataclass
class _Pair:
    collection: str
    state: CollectionState | None
    rs: ReplicaSet
    replica: Node
    error: str | None = None


async def _pairs(
    client: ShardedClient,
    backend: Runtime,
    collections: Sequence[str] | None,
    repairing: bool,
) -> tuple[list[str], list[_Pair]]:
    """Every (collection, shard, replica node) to compare."""
    named = collections is not None
    names = [c.name for c in await client.list_collections()] if collections is None else []
    names = list(collections or names)
    replicated = [rs for rs in backend.cluster.shards.values() if len(rs.nodes) > 1]
    found: list[str] = []
    pairs: list[_Pair] = []
    for name in names:
        state: CollectionState | None = None
        error = None
        try:
            model = await backend.catalog.get_collection(name, client.tenant, client.database)
            state = await backend.catalog.state(model.id, client.tenant, client.database)
        except NotFoundError:
            if named:
                raise
            # Deleted since it was listed: nothing left to compare.
            logger.info("collection %r was deleted during the run; skipped", name)
            continue
        except (ChromaError, ShardedChromaError) as exc:
            error = _reason(exc)
        found.append(name)
        for rs in replicated:
            for node in rs.nodes[1:]:
                pairs.append(_Pair(name, state, rs, node, error))
            if state is not None and isinstance(state.policy, TimePolicy):
                # Each time bucket is its own physical collection: a pair of its own.
                labels = await backend.layouts.replica_buckets(
                    state, rs.name, create_missing=repairing
                )
                for label in labels:
                    sub = backend.layouts.bucket_state(state, label)
                    for node in rs.nodes[1:]:
                        pairs.append(_Pair(f"{name}/{label}", sub, rs, node, None))
    return found, pairs


async def _count(backend: Runtime, state: CollectionState, node: Node) -> int:
    try:
        path = await backend.physical.node_path(state, node, "/count")
        return int(await node.transport.request("GET", path))
    except (ChromaError, ShardedChromaError):
        return 0  # the comparison itself reports why


async def _compare(
    backend: Runtime, pair: _Pair, page_size: int, ticker: _Ticker, pending: Mapping[str, int]
) -> PairReport:
    rs, replica = pair.rs, pair.replica
    base = PairReport(
        pair.collection,
        rs.name,
        rs.primary.url,
        replica.url,
        stale=replica.stale,
        pending_hints=pending.get(replica.url, 0),
    )
    if pair.error is not None or pair.state is None:
        return replace(base, error=pair.error or "collection not loaded")
    nodes = (rs.primary, replica)
    diff = _Diff()
    offsets = [0, 0]
    live = [True, True]

    async def pull(side: int, path: str) -> None:
        body = {"limit": page_size, "offset": offsets[side], "include": _INCLUDE}
        digests = page_digests(await _call(rs, nodes[side], path, body))
        offsets[side] += len(digests)
        live[side] = len(digests) == page_size
        diff.feed(side, digests)
        ticker(done=len(digests))

    try:
        paths = [await backend.physical.node_path(pair.state, node, "/get") for node in nodes]
        # Lockstep: both copies advance a page at a time, so records in step are matched and
        # dropped at once and memory holds only what is out of step.
        while any(live):
            await _each([functools.partial(pull, i, paths[i]) for i in (0, 1) if live[i]])
    except (ChromaError, ShardedChromaError) as exc:
        return replace(base, error=_reason(exc))
    report = replace(
        base,
        primary_records=diff.seen[0],
        replica_records=diff.seen[1],
        missing=tuple(sorted(diff.only[0])),
        extra=tuple(sorted(diff.only[1])),
        differing=tuple(sorted(diff.differing)),
    )
    if not report.clean:
        where = f"{pair.collection}/{rs.name} replica {replica.url}"
        logger.info("%s: %d difference(s)", where, report.differences)
    return report


async def _verify(
    client: ShardedClient,
    backend: Runtime,
    collections: Sequence[str] | None,
    page_size: int,
    ticker: _Ticker,
    *,
    repairing: bool = False,
) -> tuple[VerifyReport, list[_Pair]]:
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    started = time.perf_counter()
    names, pairs = await _pairs(client, backend, collections, repairing)
    pending = await backend.cluster.pending_hints()
    # Counted first so progress has a total; the counts may move under traffic, which the
    # ticker absorbs.
    counted: dict[tuple[str, str], int] = {}
    for pair in pairs:
        if pair.state is None:
            continue
        for node in (pair.rs.primary, pair.replica):
            key = (pair.collection, node.url)
            if key not in counted:
                counted[key] = await _count(backend, pair.state, node)
            ticker(more=counted[key])
    reports = await _each(
        [functools.partial(_compare, backend, p, page_size, ticker, pending) for p in pairs]
    )
    report = VerifyReport(
        collections=tuple(names),
        pairs=tuple(reports),
        records_read=sum(r.primary_records + r.replica_records for r in reports),
        seconds=time.perf_counter() - started,
    )
    return report, pairs


async def verify(
    client: ShardedClient,
    *,
    collections: Sequence[str] | None = None,
    page_size: int = 1000,
    progress: Progress | None = None,
) -> VerifyReport:
    """Compare every replica with its primary, for every (or the named) collection.

    Records are compared by id and by a digest of embedding, document, uri and metadata
    (hidden sequence key included), read ``page_size`` at a time straight from each node, stale
    replicas included. ``progress(done, total)`` is called as records are read. Nothing is
    written. A collection named in ``collections`` that does not exist raises
    ``NotFoundError``; a node that cannot be read is reported on its pair, not raised.
    """
    backend = client._live()  # the package's own client: verify needs the node layer
    report, _ = await _verify(client, backend, collections, page_size, _Ticker(progress))
    return report


# -- repair -----------------------------------------------------------------------------------
def _columns(page: Mapping[str, Any], ids: Sequence[str]) -> dict[str, Any]:
    """A write body with exactly the records ``ids`` of a get() response, fields verbatim."""
    at = {record_id: i for i, record_id in enumerate(page["ids"])}
    rows = [at[record_id] for record_id in ids]
    body: dict[str, Any] = {"ids": list(ids)}
    for name in ("embeddings", "documents", "metadatas", "uris"):
        values = page.get(name)
        body[name] = None if values is None else [values[i] for i in rows]
    return body


def _patch_metadata(primary: Mapping[str, Any] | None, replica: Mapping[str, Any] | None) -> Any:
    """Metadata that turns the replica's into the primary's under upsert, which merges keys:
    keys only the replica has are sent as None, which Chroma takes as "remove the key"."""
    patch = {**(primary or {}), **{k: None for k in replica or {} if k not in (primary or {})}}
    return patch or None


async def _fix_batch(
    backend: Runtime, pair: _Pair, state: CollectionState, batch: list[str], round_no: int
) -> tuple[list[str], list[str]]:
    """Make ``batch`` on the replica equal to the primary; returns the ids (copied, deleted).
    Round -1 only finds what differs."""
    rs, replica = pair.rs, pair.replica
    truth, copy = await _both(backend, pair, state, batch)
    want, have = dict(page_digests(truth)), dict(page_digests(copy))
    extra = [i for i in batch if i in have and i not in want]
    absent = [i for i in batch if i in want and i not in have]
    differing = [i for i in batch if i in want and i in have and want[i] != have[i]]
    if round_no < 0:
        return absent + differing, extra
    # Upsert fixes a differing record in place, so the replica never lacks it while serving
    # reads; it cannot clear a document or uri (None there means "keep"), so those records, and
    # any still different in a later round, are deleted and added instead.
    upsert: list[str] = []
    swap: list[str] = differing
    if round_no == 0 and differing:
        t, c = _columns(truth, differing), _columns(copy, differing)
        clearing = {
            differing[k]
            for name in ("documents", "uris")
            if t[name] is not None and c[name] is not None
            for k, (a, b) in enumerate(zip(t[name], c[name], strict=True))
            if a is None and b is not None
        }
        upsert = [i for i in differing if i not in clearing]
        swap = [i for i in differing if i in clearing]
    path = await backend.physical.node_path(state, replica, "")
    if extra or swap:
        await _call(rs, replica, f"{path}/delete", {"ids": extra + swap})
    if absent or swap:
        await _call(rs, replica, f"{path}/add", _columns(truth, absent + swap))
    if upsert:
        body = _columns(truth, upsert)
        old = _columns(copy, upsert)["metadatas"] or [None] * len(upsert)
        new = body["metadatas"] or [None] * len(upsert)
        body["metadatas"] = [_patch_metadata(p, r) for p, r in zip(new, old, strict=True)]
        await _call(rs, replica, f"{path}/upsert", body)
    return absent + differing, extra


async def _repair_pair(
    backend: Runtime, pair: _Pair, found: PairReport, page_size: int, rounds: int, tick: _Ticker
) -> PairRepair:
    rs, replica, state = pair.rs, pair.replica, pair.state
    copied: dict[str, None] = {}  # dicts as ordered sets: ids in the order they were fixed
    deleted: dict[str, None] = {}
    remaining: list[str] = []
    suspects = sorted({*found.missing, *found.extra, *found.differing})
    done_rounds = 0
    error = found.error if state is not None else (found.error or "collection not loaded")
    if rs.primary.stale:
        # A primary that missed writes is not the truth: copying it would undo acknowledged
        # writes that only the replicas hold.
        error = (
            "the primary has missed writes still in the hint log; it is not the truth until "
            "they are replayed (repair again once it answers)"
        )
    try:
        limit = int((await backend.cluster.preflight(rs.name)).get("max_batch_size", -1))
        step = min(page_size, limit) if limit > 0 else page_size
        # Rounds fix what differs; one more pass (round -1) only reports what is left.
        for round_no in range(rounds + 1 if error is None and state is not None else 0):
            if not suspects:
                break
            assert state is not None
            fix = round_no < rounds
            tick(more=len(suspects))
            touched: list[str] = []
            for start in range(0, len(suspects), step):
                batch = suspects[start : start + step]
                wrote, removed = await _fix_batch(
                    backend, pair, state, batch, round_no if fix else -1
                )
                if fix:
                    copied.update(dict.fromkeys(wrote))
                    deleted.update(dict.fromkeys(removed))
                touched.extend(wrote + removed)
                tick(done=len(batch))
            suspects = sorted(touched)
            done_rounds += fix and bool(touched)
            remaining = [] if fix else suspects
    except (ChromaError, ShardedChromaError) as exc:
        error = _reason(exc)
    result = PairRepair(
        pair.collection,
        rs.name,
        rs.primary.url,
        replica.url,
        copied=tuple(copied),
        deleted=tuple(deleted),
        rounds=done_rounds,
        remaining=tuple(remaining),
        error=error,
    )
    where = f"{pair.collection}/{rs.name} replica {replica.url}"
    counts = (len(copied), len(deleted), len(remaining))
    logger.info("%s: copied %d, deleted %d, %d still differ (%s)", where, *counts, error or "-")
    return result


async def _replay_stale(backend: Runtime) -> dict[str, int]:
    """Replay this host's hint log to every stale copy first, so the scan sees the copies as
    the hints will leave them and repair does not fight a later replay."""
    replayed: dict[str, int] = {}
    for rs in backend.cluster.shards.values():
        for node in rs.nodes:
            if node.stale:
                try:
                    count = await rs.replay(node)
                except (ChromaError, ShardedChromaError) as exc:
                    logger.warning("replaying hints to %s failed: %s", node.url, exc)
                    continue
                if count:
                    replayed[node.url] = count
    return replayed


async def repair(
    client: ShardedClient,
    *,
    collections: Sequence[str] | None = None,
    page_size: int = 1000,
    progress: Progress | None = None,
    rounds: int = 3,
) -> RepairReport:
    """Make every replica equal to its primary, for every (or the named) collection.

    Pending hints are replayed first; then ``verify`` finds the differences, and each replica
    is fixed from its primary: missing and differing records are copied (embedding, document,
    uri and metadata exactly, hidden sequence included), extra records deleted. The touched ids
    are then read again from both copies and fixed again, up to ``rounds`` passes, so writes
    that raced with the repair are settled; what still differs is reported in ``remaining``.
    Safe while traffic continues. ``progress(done, total)`` counts records read, then fixed.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    started = time.perf_counter()
    backend = client._live()
    ticker = _Ticker(progress)
    replayed = await _replay_stale(backend)
    before, pairs = await _verify(client, backend, collections, page_size, ticker, repairing=True)
    fixed = await _each(
        [
            functools.partial(_repair_pair, backend, p, r, page_size, rounds, ticker)
            for p, r in zip(pairs, before.pairs, strict=True)
            if not r.clean or p.rs.primary.stale
        ]
    )
    if collections is None:
        # Every collection was compared: a copy whose every pair is clean again may serve
        # reads even if it once lost a write (a full hint log).
        settled = {p.replica.url for p in pairs}
        settled -= {r.replica for r in fixed if not r.clean}
        for rs in backend.cluster.shards.values():
            for node in rs.nodes:
                if node.needs_repair and node.url in settled:
                    rs.mark_repaired(node)
    return RepairReport(
        before=before,
        pairs=tuple(fixed),
        hints_replayed=replayed,
        seconds=time.perf_counter() - started,
    )
