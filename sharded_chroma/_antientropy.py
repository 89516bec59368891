"""Anti-entropy: compare every replica with its primary (``repair`` is in ``_antirepair``).

Copies drift when a missed write's hint is lost (another host's hint log, a full log), a node
is restored from an old backup or written to directly. ``verify`` finds such drift and
``repair`` removes it, the newest version of each record winning.

Comparison is by content digest, not by record: a copy's records are read page by page and each
record is reduced to ``id -> 16-byte digest`` at once. The primary and the replica are read in
lockstep, both by ranges of the hidden sequence (``ops._seqpages``, so in the same order and
never shifted by a concurrent delete), and a record is dropped from memory as soon as its
counterpart on the other copy has been seen: what is held at any time is the records out of step
between the two copies plus the differences.

Both are safe under live traffic: a record written or deleted during the pass may be reported
as different without really differing, so ``repair`` never trusts the scan: it reads the
suspect ids from both copies by id, fixes what still differs, and re-checks the ids it touched,
up to ``rounds`` times, to settle races with concurrent writes. A record present on both copies
for the whole pass is always compared.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
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
from ._reports import PairReport, VerifyReport
from .catalog._generations import generation_state, generations_on
from .catalog._state import CollectionState
from .ops._seqpages import seq_pages

if TYPE_CHECKING:
    from ._client import ShardedClient
    from ._runtime import Runtime

__all__ = ["PairReport", "VerifyReport", "verify"]

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


async def call_node(rs: ReplicaSet, node: Node, path: str, body: Mapping[str, Any]) -> Any:
    """One request to a chosen node, retried on connection failures and internal errors: Chroma
    1.5 can answer a paged get that races a delete with "Error finding id". Every request here
    is idempotent (reads, deletes by id, and an add of an id that exists is ignored)."""
    for attempt in range(rs.config.retries):
        try:
            return await node.transport.request("POST", path, body=body)
        except (NodeUnavailableError, InternalError):
            await anyio.sleep(rs.config.backoff * 2**attempt)
    return await node.transport.request("POST", path, body=body)


async def read_both(
    backend: Runtime, pair: Pair, state: CollectionState, ids: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The records ``ids`` as the primary and as the replica hold them, read concurrently."""

    async def read(node: Node) -> dict[str, Any]:
        path = await backend.physical.node_path(state, node, "/get")
        page: dict[str, Any] = await call_node(
            pair.rs, node, path, {"ids": ids, "include": _INCLUDE}
        )
        return page

    truth, copy = await each_limited(
        [functools.partial(read, n) for n in (pair.rs.primary, pair.replica)]
    )
    return truth, copy


async def each_limited(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
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


class Ticker:
    """Progress in work units (records read, then fixed); the total grows as work is found."""

    def __init__(self, callback: Progress | None) -> None:
        self.callback, self.done, self.total = callback, 0, 0

    def __call__(self, *, done: int = 0, more: int = 0) -> None:
        self.done += done
        self.total = max(self.total + more, self.done)
        if self.callback is not None:
            self.callback(self.done, self.total)


def reason_of(exc: BaseException) -> str:
    missing = isinstance(exc, NotFoundError)
    hint = " (missing on this node; get_or_create_collection() recreates it)" if missing else ""
    return f"{type(exc).__name__}: {exc}{hint}"


# -- verify -----------------------------------------------------------------------------------
@dataclass
class Pair:
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
) -> tuple[list[str], list[Pair]]:
    """Every (collection, shard, replica node) to compare."""
    named = collections is not None
    names = [c.name for c in await client.list_collections()] if collections is None else []
    names = list(collections or names)
    replicated = [rs for rs in backend.cluster.shards.values() if len(rs.nodes) > 1]
    found: list[str] = []
    pairs: list[Pair] = []
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
            error = reason_of(exc)
        found.append(name)
        for rs in replicated:
            for node in rs.nodes[1:]:
                pairs.append(Pair(name, state, rs, node, error))
            if state is not None and isinstance(state.policy, TimePolicy):
                # Each time bucket is its own physical collection: a pair of its own.
                labels = await backend.layouts.replica_buckets(
                    state, rs.name, create_missing=repairing
                )
                for label in labels:
                    sub = backend.layouts.bucket_state(state, label)
                    for node in rs.nodes[1:]:
                        pairs.append(Pair(f"{name}/{label}", sub, rs, node, None))
            elif state is not None:
                # A rebuild's generations (the one serving, and both while one runs).
                where = (state.tenant, state.database, state.id)
                listed = await rs.read(functools.partial(_generations_of, where=where))
                for number, _ in listed:
                    sub = generation_state(state, number)
                    for node in rs.nodes[1:]:
                        pairs.append(Pair(f"{name}/gen{number}", sub, rs, node, None))
    return found, pairs


async def _generations_of(node: Node, where: tuple[str, str, Any]) -> list[tuple[int, str]]:
    return await generations_on(node, *where)


async def _count(backend: Runtime, state: CollectionState, node: Node) -> int:
    try:
        path = await backend.physical.node_path(state, node, "/count")
        return int(await node.transport.request("GET", path))
    except (ChromaError, ShardedChromaError):
        return 0  # the comparison itself reports why


async def _compare(
    backend: Runtime,
    pair: Pair,
    page_size: int,
    ticker: Ticker,
    pending: Mapping[str, int],
    counted: Mapping[tuple[str, str], int],
) -> PairReport:
    rs, replica = pair.rs, pair.replica
    counts = {n.url: counted.get((pair.collection, n.url), 0) for n in (rs.primary, replica)}
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
    live = [True, True]
    streams: list[AsyncGenerator[dict[str, Any], None]] = []

    def stream(node: Node, path: str) -> AsyncGenerator[dict[str, Any], None]:
        async def read(body: Mapping[str, Any]) -> Mapping[str, Any]:
            answer: Mapping[str, Any] = await call_node(rs, node, path, body)
            return answer

        async def same_node(body: Mapping[str, Any], _sticky: dict[str, Any]) -> Any:
            return await read(body)

        return seq_pages(
            read, same_node, {"include": _INCLUDE}, page_size, sweep_below=counts.get(node.url)
        )

    async def pull(side: int) -> None:
        try:
            page = await anext(streams[side])
        except StopAsyncIteration:
            live[side] = False
            return
        digests = page_digests(page)
        diff.feed(side, digests)
        ticker(done=len(digests))

    try:
        paths = [await backend.physical.node_path(pair.state, node, "/get") for node in nodes]
        streams.extend(stream(node, path) for node, path in zip(nodes, paths, strict=True))
        # Lockstep by sequence ranges (``ops._seqpages``): both copies advance a page at a
        # time in the same order, so records in step are matched and dropped at once, and a
        # concurrent delete never shifts a page past a record.
        while any(live):
            await each_limited([functools.partial(pull, i) for i in (0, 1) if live[i]])
    except (ChromaError, ShardedChromaError) as exc:
        return replace(base, error=reason_of(exc))
    finally:
        for gen in streams:
            await gen.aclose()
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


async def verify_pairs(
    client: ShardedClient,
    backend: Runtime,
    collections: Sequence[str] | None,
    page_size: int,
    ticker: Ticker,
    *,
    repairing: bool = False,
) -> tuple[VerifyReport, list[Pair]]:
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
    reports = await each_limited(
        [
            functools.partial(_compare, backend, p, page_size, ticker, pending, counted)
            for p in pairs
        ]
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
    report, _ = await verify_pairs(client, backend, collections, page_size, Ticker(progress))
    return report
