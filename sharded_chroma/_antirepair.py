"""Anti-entropy repair: make every replica equal to its primary where ``verify`` (see
``_antientropy``) finds them apart, re-checking the ids it touched to settle races with
concurrent writes."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

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
from ._reports import PairRepair, PairReport, RepairReport
from .catalog._state import CollectionState

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


async def _fix_batch(
    backend: Runtime, pair: Pair, state: CollectionState, batch: list[str], round_no: int
) -> tuple[list[str], list[str]]:
    """Make ``batch`` on the replica equal to the primary; returns the ids (copied, deleted).
    Round -1 only finds what differs."""
    rs, replica = pair.rs, pair.replica
    truth, copy = await read_both(backend, pair, state, batch)
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
        await call_node(rs, replica, f"{path}/delete", {"ids": extra + swap})
    if absent or swap:
        await call_node(rs, replica, f"{path}/add", _columns(truth, absent + swap))
    if upsert:
        body = _columns(truth, upsert)
        old = _columns(copy, upsert)["metadatas"] or [None] * len(upsert)
        new = body["metadatas"] or [None] * len(upsert)
        body["metadatas"] = [_patch_metadata(p, r) for p, r in zip(new, old, strict=True)]
        await call_node(rs, replica, f"{path}/upsert", body)
    return absent + differing, extra


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
    ticker = Ticker(progress)
    replayed = await _replay_stale(backend)
    before, pairs = await verify_pairs(
        client, backend, collections, page_size, ticker, repairing=True
    )
    fixed = await each_limited(
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
