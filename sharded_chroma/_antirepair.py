"""Anti-entropy repair: make the copies of each shard equal where ``verify`` (see
``_antientropy``) finds them apart, the newest version of each record winning (a tombstone of
a missed delete counts as a version), re-checking the ids it touched to settle races with
concurrent writes."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from chromadb.errors import ChromaError

from ._antientropy import (
    Pair,
    Progress,
    Ticker,
    call_node,
    each_limited,
    read_both,
    reason_of,
    verify_pairs,
)
from ._digest import page_digests
from ._errors import ShardedChromaError
from ._node import Node
from ._reports import PairRepair, PairReport, RepairReport
from .catalog._state import VERSION_KEY, CollectionState

if TYPE_CHECKING:
    from ._client import ShardedClient
    from ._runtime import Runtime

__all__ = ["PairRepair", "RepairReport", "repair"]

logger = logging.getLogger("sharded_chroma.antientropy")


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


def _version(page: Mapping[str, Any]) -> dict[str, int]:
    """Each record's version (0 for a record written before versions existed)."""
    metas = page.get("metadatas") or [None] * len(page["ids"])
    out: dict[str, int] = {}
    for record_id, meta in zip(page["ids"], metas, strict=True):
        value = meta.get(VERSION_KEY) if isinstance(meta, dict) else None
        out[record_id] = value if isinstance(value, int) and not isinstance(value, bool) else 0
    return out


async def _write_side(
    backend: Runtime,
    pair: Pair,
    state: CollectionState,
    node: Node,
    pages: tuple[Mapping[str, Any], Mapping[str, Any]],
    fix: tuple[list[str], list[str], list[str]],
    round_no: int,
) -> None:
    """Make ``node``'s records equal to the source page (``pages[0]``; ``pages[1]`` is the
    node's own): ``absent`` added, ``differing`` fixed in place, ``delete`` removed."""
    truth, copy = pages
    absent, differing, delete = fix
    # Upsert fixes a differing record in place, so the copy never lacks it while serving
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
    rs = pair.rs
    path = await backend.physical.node_path(state, node, "")
    if delete or swap:
        await call_node(rs, node, f"{path}/delete", {"ids": delete + swap})
    if absent or swap:
        await call_node(rs, node, f"{path}/add", _columns(truth, absent + swap))
    if upsert:
        body = _columns(truth, upsert)
        old = _columns(copy, upsert)["metadatas"] or [None] * len(upsert)
        new = body["metadatas"] or [None] * len(upsert)
        body["metadatas"] = [_patch_metadata(p, r) for p, r in zip(new, old, strict=True)]
        await call_node(rs, node, f"{path}/upsert", body)


async def _fix_batch(
    backend: Runtime, pair: Pair, state: CollectionState, batch: list[str], round_no: int
) -> tuple[list[str], list[str]]:
    """Make ``batch`` equal on both copies, the newest version of each id winning (ties: the
    primary's); returns the ids (written, deleted) anywhere. Round -1 only finds them.

    An id on one copy only was either added to it or deleted from the other: a tombstone of
    this host's hint log (a delete some copy missed) at least as new as the record says
    deleted; otherwise the record is copied over."""
    truth, copy = await read_both(backend, pair, state, batch)
    pages = (truth, copy)
    digests = (dict(page_digests(truth)), dict(page_digests(copy)))
    versions = (_version(truth), _version(copy))
    nodes = (pair.rs.primary, pair.replica)
    states = backend.cluster.node_states
    # Tombstones of the copy that holds a lonely record: a delete *that copy* missed.
    tombs = [
        await anyio.to_thread.run_sync(
            states.tombstones,
            nodes[side].url,
            str(state.id),
            [i for i in batch if i in digests[side] and i not in digests[1 - side]],
        )
        for side in (0, 1)
    ]
    # Per side: (absent, differing, delete) to apply to that side.
    todo: tuple[tuple[list[str], list[str], list[str]], ...] = (([], [], []), ([], [], []))
    for i in batch:
        on = [i in d for d in digests]
        if on[0] and on[1]:
            if digests[0][i] != digests[1][i]:
                loser = 1 if versions[0][i] >= versions[1][i] else 0
                todo[loser][1].append(i)
            continue
        if not (on[0] or on[1]):
            continue
        holder = 0 if on[0] else 1
        if i in tombs[holder] and tombs[holder][i] >= versions[holder][i]:
            todo[holder][2].append(i)
        else:
            todo[1 - holder][0].append(i)
    written = sorted({*todo[0][0], *todo[0][1], *todo[1][0], *todo[1][1]})
    deleted = sorted({*todo[0][2], *todo[1][2]})
    if round_no < 0:
        return written, deleted
    for side in (0, 1):
        if any(todo[side]):
            source = (pages[1 - side], pages[side])
            await _write_side(backend, pair, state, nodes[side], source, todo[side], round_no)
    return written, deleted


async def _repair_pair(
    backend: Runtime, pair: Pair, found: PairReport, page_size: int, rounds: int, tick: Ticker
) -> PairRepair:
    rs, replica, state = pair.rs, pair.replica, pair.state
    copied: dict[str, None] = {}  # dicts as ordered sets: ids in the order they were fixed
    deleted: dict[str, None] = {}
    remaining: list[str] = []
    suspects = sorted({*found.missing, *found.extra, *found.differing})
    done_rounds = 0
    error = found.error if state is not None else (found.error or "collection not loaded")
    behind = [
        n.url for n in (rs.primary, replica) if backend.cluster.node_states.get(n.url).pending
    ]
    if behind:
        # Hints still waiting would land after the repair and fight it; they are replayed
        # first (see repair()), so this only happens while a copy does not answer.
        error = (
            f"missed writes of {', '.join(behind)} are still in the hint log; repair again "
            "once the node answers and they are replayed"
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
        error = reason_of(exc)
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
                    # After the background replayer's turn, if it holds the copy now.
                    count = await rs.replay(node, wait=True)
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
    """Make every replica and its primary equal, for every (or the named) collection.

    Pending hints are replayed first; then ``verify`` finds the differences, and for each id
    the newest version wins, whichever copy holds it: it is copied to the other (embedding,
    document, uri and metadata exactly, hidden sequence and version included). An id on one
    copy only is copied to the other unless this host's hint log holds a tombstone for it at
    least as new (a delete the copy missed): then it is deleted. The touched ids
    are then read again from both copies and fixed again, up to ``rounds`` passes, so writes
    that raced with the repair are settled; what still differs is reported in ``remaining``.
    Safe while traffic continues. ``progress(done, total)`` counts records read, then fixed.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    started = time.perf_counter()
    backend = client._live()
    ticker = Ticker(progress)
    states = backend.cluster.node_states
    await anyio.to_thread.run_sync(states.refresh)
    # The marks as they stand now: one added while the repair runs (a write missed meanwhile)
    # is not cleared by it.
    seen = {n.url: states.get(n.url) for n in backend.cluster.all_nodes()}
    replayed = await _replay_stale(backend)
    before, pairs = await verify_pairs(
        client, backend, collections, page_size, ticker, repairing=True
    )
    fixed = await each_limited(
        [
            functools.partial(_repair_pair, backend, p, r, page_size, rounds, ticker)
            for p, r in zip(pairs, before.pairs, strict=True)
            if not r.clean or p.rs.primary.stale or p.replica.stale
        ]
    )
    if collections is None:
        # Every collection was compared: a copy whose every pair is clean again may serve
        # reads even if it once lost a write (a full log, an expired or refused hint).
        settled = {n.url for p in pairs for n in (p.rs.primary, p.replica)}
        unsettled = [r for r in fixed if not r.clean]
        settled -= {r.replica for r in unsettled} | {r.primary for r in unsettled}
        for rs in backend.cluster.shards.values():
            for node in rs.nodes:
                if seen[node.url].needs_repair and node.url in settled:
                    await anyio.to_thread.run_sync(rs.mark_repaired, node, seen[node.url])
    return RepairReport(
        before=before,
        pairs=tuple(fixed),
        hints_replayed=replayed,
        seconds=time.perf_counter() - started,
    )
