"""One part's get() as pages keyed by the records' hidden sequence values, never by offset.

An offset names a position in one copy's stored order: another copy stores the records in
another order, and a delete before the offset shifts every later record. A range of sequence
values names the same records on every copy and is not moved by deletes, so pages here are
ranges ``lo < seq <= hi`` and a page is used only when it is proven to hold *every* record of
its range:

- an answer with fewer records than its limit is its whole range;
- a full answer (its limit reached) is the whole range up to its largest value ``m`` when an
  ids-only check of ``lo < seq <= m`` (limit one more) names no record outside it. A record
  present throughout is in the check's complete answer, hence in the page, whichever copies
  answered. Otherwise the range is cut at the page's median value and asked again.

Nothing here assumes that a part stores its records in sequence order (two processes, or a
move, can store a higher value before a lower one): a limited answer is only ever a sample.
Ranges are sized from the density the last page saw, so a part in sequence order costs one
request per page, plus a cheap check where a page comes back full.

Records without an integer sequence (written outside this library; see the design notes) are
not in any range. The first request of a part asks without a range: a part that fits one page
ends there, whatever its records carry. When that page (or a range, for a float) shows such a
record, the part's unsequenced ids are collected after the ranges by an offset sweep from one
copy (Chroma cannot select records that lack a key) and read by id, sorted by id.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from .._merge import order_key, take_rows
from ..catalog._state import SEQ_KEY

__all__ = ["seq_pages"]

Read = Callable[[Mapping[str, Any]], Awaitable[Mapping[str, Any]]]
StickyRead = Callable[[Mapping[str, Any], dict[str, Any]], Awaitable[Mapping[str, Any]]]

_LOWEST = -(2**63)  # Chroma's integers are 64-bit
_GROWTH = 64  # the most a range widens from one page to the next
_SWEEP_RESTARTS = 3


def _seq(meta: Mapping[str, Any] | None) -> int | None:
    value = None if meta is None else meta.get(SEQ_KEY)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _range(lo: int | None, hi: int | None) -> list[dict[str, Any]]:
    """Filter clauses for ``lo < seq <= hi`` (None: unbounded on that side)."""
    clauses: list[dict[str, Any]] = []
    if lo is not None:
        clauses.append({SEQ_KEY: {"$gt": lo}})
    if hi is not None:
        clauses.append({SEQ_KEY: {"$lte": hi}})
    return clauses or [{SEQ_KEY: {"$gte": _LOWEST}}]


def _where(user: Any, clauses: Sequence[Mapping[str, Any]]) -> Any:
    parts = [*([user] if user else []), *clauses]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else {"$and": parts}


def _metas(answer: Mapping[str, Any]) -> Sequence[Any]:
    return answer.get("metadatas") or [None] * len(answer["ids"])


def _sorted(answer: Mapping[str, Any], rows: Sequence[int]) -> list[int]:
    ids, metas = answer["ids"], _metas(answer)
    return sorted(rows, key=lambda r: order_key(metas[r], ids[r], SEQ_KEY))


async def seq_pages(
    read: Read,
    sticky_read: StickyRead,
    body: Mapping[str, Any],
    bound: int,
    *,
    sweep_below: int | None = None,
) -> AsyncGenerator[dict[str, Any], None]:
    """A part's get ``body`` as pages of at most ``bound`` records, in (seq, id) order, then
    records without a sequence by id; ``body["limit"]``, if set, bounds the total.

    ``read`` asks any copy that serves reads; ``sticky_read`` keeps to one copy (only the
    sweep for unsequenced records uses it). At least one page is yielded. One page can exceed
    ``bound`` only when more than ``bound`` records share one sequence value. With
    ``sweep_below`` (the records the part is known to hold), fewer sequenced records than that
    also start the sweep: anti-entropy must find records written outside this library."""
    want = body.get("limit")
    user = body.get("where") or None
    base = {k: v for k, v in body.items() if k not in ("limit", "offset", "where")}
    include = base.get("include")
    if include is not None and "metadatas" not in include:
        base["include"] = [*include, "metadatas"]
    got = 0
    yielded = False

    def left() -> int:
        return bound if want is None else min(bound, want - got)

    def emit(answer: Mapping[str, Any], rows: Sequence[int]) -> dict[str, Any]:
        nonlocal got, yielded
        ordered = _sorted(answer, rows)
        if want is not None:
            ordered = ordered[: max(0, want - got)]
        got += len(ordered)
        yielded = yielded or bool(ordered)
        return take_rows(answer, ordered)

    async def ask(clauses: Sequence[Mapping[str, Any]], limit: int | None) -> Mapping[str, Any]:
        return await read({**base, "where": _where(user, clauses), "limit": limit, "offset": None})

    async def probe(lo: int | None, hi: int, limit: int) -> list[str]:
        """Ids (at most ``limit``) of records in (lo, hi]: a cheap count."""
        body = {**base, "where": _where(user, _range(lo, hi)), "limit": limit, "offset": None}
        answer = await read({**body, "include": []})
        return list(answer["ids"])

    take = left()
    if take <= 0:
        yield take_rows({"ids": []}, [])
        return
    first = await ask((), take)
    if len(first["ids"]) < take:
        yield emit(first, range(len(first["ids"])))
        return
    unsequenced = _floats(first)

    lo: int | None = None  # every sequenced record with seq <= lo has been yielded
    asked: int | None = None  # the upper end of the range ``answer`` was asked for
    width: int | None = None  # the next range's width (None: no upper end)
    answer, full = first, True
    while True:
        metas = _metas(answer)
        rows = [r for r in range(len(answer["ids"])) if _seq(metas[r]) is not None]
        seqs = sorted(s for r in rows if (s := _seq(metas[r])) is not None)
        if not full:
            page = emit(answer, rows)  # the whole range (lo, asked]
            if page["ids"]:
                yield page
            if asked is None:
                break
            width = _next_width(lo, asked, seqs, width, take)
            lo = asked
        elif seqs:
            m = seqs[-1]
            check = await probe(lo, m, len(answer["ids"]) + 1)
            if set(check) <= set(answer["ids"]):
                yield emit(answer, rows)  # the whole range (lo, m]: never empty
                width = _next_width(lo, m, seqs, width, take)
                lo = m
            else:
                # Stored out of sequence order: the page was only a sample. Find a smaller
                # range by counting (ids only), then read it.
                hi = await _fit(probe, lo, seqs[0], m, take)
                if lo is None or hi > lo:
                    asked = hi
                    answer = await ask(_range(lo, hi), take)
                    full = len(answer["ids"]) >= take
                    unsequenced |= _floats(answer)
                    continue
                # More than a page of records share the value lo + 1: read them whole.
                whole = await ask(_range(lo, lo + 1), None)
                page = emit(whole, range(len(whole["ids"])))
                if page["ids"]:
                    yield page
                lo += 1
        # (A full page of unsequenced records only falls through: ask for sequenced ones.)
        if want is not None and got >= want:
            return
        take = left()
        asked = None if width is None or lo is None else lo + width
        answer = await ask(_range(lo, asked), take)
        full = len(answer["ids"]) >= take
        unsequenced |= _floats(answer)

    short = sweep_below is not None and got < sweep_below
    if (unsequenced or short) and (want is None or got < want):
        async for page in _unsequenced(read, sticky_read, base, user, bound, want, got):
            yielded = True
            yield page
    if not yielded:
        yield take_rows(first, [])


def _floats(answer: Mapping[str, Any]) -> bool:
    """Whether an answer holds a record without an integer sequence (in a range's answer: a
    number that is not an integer, which Chroma compares with integers but get() orders with
    the unsequenced records)."""
    return any(_seq(m) is None for m in _metas(answer))


async def _fit(
    probe: Callable[[int | None, int, int], Awaitable[list[str]]],
    lo: int | None,
    smallest: int,
    m: int,
    take: int,
) -> int:
    """An upper end h < m whose range (lo, h] holds fewer than ``take`` records (at least
    half as many where that is quick to find), by counting; lo itself when the value lo + 1
    alone holds ``take`` or more. Without lo, the search first steps down from the smallest
    value seen, doubling, to a range below that holds less than a page."""
    bad = m
    if lo is None:
        good, step = smallest - 1, max(1, m - smallest + 1)
        while len(await probe(None, good, take)) >= take:
            bad, good, step = good, max(_LOWEST, good - step), step * 2
    else:
        good = lo
    while bad - good > 1:
        mid = (good + bad) // 2
        n = len(await probe(lo, mid, take))
        if n >= take:
            bad = mid
            continue
        good = mid
        if n >= take // 2:
            break
    return good


def _next_width(
    lo: int | None, hi: int, values: Sequence[int], width: int | None, take: int
) -> int | None:
    """The width of the next range, for about three quarters of a page at the density the
    last range (lo, hi] showed; None (ask without an upper end) after an empty one."""
    if not values:
        return None
    start = lo if lo is not None else min(values) - 1
    span = max(1, hi - start)
    target = max(1, take * 3 // 4)
    new = max(1, span * target // len(values))
    cap = (width or span) * _GROWTH
    return min(new, cap)


async def _unsequenced(
    read: Read,
    sticky_read: StickyRead,
    base: Mapping[str, Any],
    user: Any,
    bound: int,
    want: int | None,
    got: int,
) -> AsyncIterator[dict[str, Any]]:
    """Records without an integer sequence, by id: their ids from an offset sweep of one copy
    (started again, up to a few times, if another copy has to answer), then read by id."""
    found: set[str] = set()
    sticky: dict[str, Any] = {}
    offset, restarts = 0, 0
    while True:
        before = list(sticky.values())
        answer = await sticky_read(
            {**base, "where": user, "limit": bound, "offset": offset, "include": ["metadatas"]},
            sticky,
        )
        metas = _metas(answer)
        found.update(i for i, m in zip(answer["ids"], metas, strict=True) if _seq(m) is None)
        after = list(sticky.values())
        moved = bool(before) and any(a is not b for a, b in zip(before, after, strict=False))
        if moved and restarts < _SWEEP_RESTARTS:
            restarts, offset = restarts + 1, 0
            continue
        offset += len(answer["ids"])
        if len(answer["ids"]) < bound:
            break
    ordered = sorted(found)
    for start in range(0, len(ordered), bound):
        if want is not None and got >= want:
            return
        chunk = ordered[start : start + bound]
        answer = await read({**base, "ids": chunk, "where": user, "limit": None, "offset": None})
        metas = _metas(answer)
        rows = [r for r in range(len(answer["ids"])) if _seq(metas[r]) is None]
        rows.sort(key=lambda r: answer["ids"][r])
        if want is not None:
            rows = rows[: want - got]
        got += len(rows)
        if rows:
            yield take_rows(answer, rows)
