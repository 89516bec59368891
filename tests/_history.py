"""A pure checker for per-id histories of concurrent writes (no servers, no clock of its own).

A history is a list of ``Op``: what was called, on which ids, with which values, when it
started and ended (``time.monotonic()`` right before the call and right after it returned; on
Linux that clock is system-wide, so threads and processes share it) and how it ended: ``ok``
(acknowledged), ``failed`` (known not to have applied) or ``unknown`` (raised: may or may not
have applied). Every written value carries a token unique to its write, under metadata key
``w`` (``TOKEN``), so a stored record names the write that produced it.

The rule, per id. Writes that are ``ok`` or ``unknown`` are *possible*; ``ok`` ones are
*acknowledged*. An acknowledged add or upsert is a *creator*: once it returns, the id exists.

- Present at the end with token ``t``: ``t`` must belong to a possible add/upsert/update ``W`` of
  this id, and no acknowledged upsert, update or delete ``V`` may wholly follow ``W``
  (``V.start > W.end``): it would have replaced, changed or removed ``W``'s value. An
  acknowledged add that follows ``W`` is no constraint (the id existed, so it was a no-op).
  If ``W`` is an add, the id must have been able to be absent just before it: no creator may
  wholly precede ``W`` unless some possible delete can fall between them. If ``W`` is an update
  (a no-op on a missing id), some possible add/upsert must have started before ``W`` ended.
  No acknowledged delete may wholly follow every possible add/upsert: nothing could have
  created the record again after it (updates never create), so the value is a resurrection.
  The stored metadata must hold ``W``'s keys and values (a None value: key removed); any other
  key must hold a value some possible write of the id that started before ``W`` ended wrote
  (upserts and updates merge metadata); the document is ``W``'s, or an earlier write's if
  ``W`` set none.
- Absent at the end: fine if no creator exists; otherwise some possible delete ``D`` must be
  able to come after every creator (each creator started no later than ``D`` ended).
- Every id at most once across all parts, and parts hold exactly the ids the final read saw.
- Reads never return one id twice, and return only values some possible write of that id
  produced, a write that started before the read ended.
- Reads are not stale: a read never returns the value of a write ``P`` when an acknowledged
  upsert, update or delete of that id began after ``P`` ended and ended before the read began
  (it replaced or removed ``P``'s value before the read was asked). Only values are checked:
  a read does not record which ids it asked for, so a missing id is not judged.

Each check only flags what no order of the operations within their intervals explains, so the
checker is sound (a correct system never fails it) but not complete (some anomalies pass).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["TOKEN", "Op", "Value", "check"]

TOKEN = "w"
"""Metadata key of the per-write unique token."""

Kind = Literal["add", "upsert", "update", "delete", "get"]
Outcome = Literal["ok", "failed", "unknown"]
_CREATES = ("add", "upsert")
_SETS = ("add", "upsert", "update")
_REPLACES = ("upsert", "update", "delete")


@dataclass(frozen=True)
class Value:
    """A record as written or read: user-visible metadata (with its token) and document."""

    metadata: Mapping[str, Any]
    document: str | None = None

    @property
    def token(self) -> str | None:
        token = self.metadata.get(TOKEN)
        return None if token is None else str(token)


@dataclass(frozen=True)
class Op:
    """One call. Writes give one ``Value`` per id in ``values`` (deletes give none); reads
    give what came back, in order, in ``seen``."""

    kind: Kind
    ids: tuple[str, ...]
    start: float
    end: float
    outcome: Outcome = "ok"
    values: tuple[Value, ...] = ()
    seen: tuple[tuple[str, Value], ...] = ()

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"{self.kind} ends before it starts")
        if self.kind in _SETS and len(self.values) != len(self.ids):
            raise ValueError(f"{self.kind} needs one value per id")
        if any(v.token is None for v in self.values):
            raise ValueError(f"every value written needs a {TOKEN!r} token")


@dataclass(frozen=True)
class _Write:
    """One id's share of a write call."""

    kind: Kind
    start: float
    end: float
    outcome: Outcome
    value: Value | None

    def __str__(self) -> str:
        token = "" if self.value is None else f" w={self.value.token}"
        return f"{self.kind}{token} [{self.start:.4f}, {self.end:.4f}] {self.outcome}"


def _shown(writes: Iterable[_Write]) -> str:
    return "; ".join(str(w) for w in sorted(writes, key=lambda w: (w.start, w.end))) or "none"


def _value_text(value: Value | None) -> str:
    return "absent" if value is None else f"{dict(value.metadata)} doc={value.document!r}"


def _check_absent(rid: str, writes: Sequence[_Write]) -> list[str]:
    possible = [w for w in writes if w.outcome != "failed"]
    creators = [w for w in possible if w.outcome == "ok" and w.kind in _CREATES]
    deletes = [w for w in possible if w.kind == "delete"]
    if not creators or any(all(c.start <= d.end for c in creators) for d in deletes):
        return []
    last = max(deletes, key=lambda d: d.end, default=None)
    after = [c for c in creators if last is None or c.start > last.end]
    return [
        f"{rid}: expected present (acknowledged {_shown(after)} follows every possible delete), "
        f"found absent; candidate writes: {_shown(possible)}"
    ]


def _check_present(rid: str, found: Value, writes: Sequence[_Write]) -> list[str]:
    possible = [w for w in writes if w.outcome != "failed"]
    cands = f"candidate writes: {_shown(possible)}"
    found_text = _value_text(found)
    winners = [w for w in possible if w.value is not None and w.value.token == found.token]
    if not winners:
        return [f"{rid}: expected a value some write produced, found {found_text}; {cands}"]
    win = winners[0]
    assert win.value is not None
    out = []
    later = [
        v
        for v in possible
        if v.outcome == "ok" and v.kind in ("upsert", "update", "delete") and v.start > win.end
    ]
    if later:
        gone = any(v.kind == "delete" for v in later)
        what = "absent (resurrected delete)" if gone else "a later value"
        out.append(
            f"{rid}: expected {what}: acknowledged {_shown(later)} wholly followed {win}; "
            f"found {found_text}; {cands}"
        )
    deletes = [w for w in possible if w.kind == "delete"]
    creators = [c for c in possible if c.kind in _CREATES]
    final_deletes = [
        d for d in deletes if d.outcome == "ok" and all(c.end < d.start for c in creators)
    ]
    if final_deletes and not later:
        out.append(
            f"{rid}: expected absent (resurrected delete): acknowledged {_shown(final_deletes)} "
            f"followed every add/upsert; found {found_text}; {cands}"
        )
    if win.kind == "add":
        blocking = [
            c
            for c in possible
            if c.outcome == "ok"
            and c.kind in _CREATES
            and c.end < win.start
            and not any(d.end > c.start and d.start < win.end for d in deletes)
        ]
        if blocking:
            out.append(
                f"{rid}: expected {win} to be a no-op (acknowledged {_shown(blocking)} created "
                f"the id before it and no delete can come between), found {found_text}; {cands}"
            )
    if win.kind == "update" and not any(c.start < win.end for c in creators):
        out.append(f"{rid}: expected {win} to be a no-op on a missing id, found it; {cands}")
    out.extend(_check_content(rid, found, win, possible, cands))
    return out


def _check_content(
    rid: str, found: Value, win: _Write, possible: Sequence[_Write], cands: str
) -> list[str]:
    """The stored record is the winner's value merged over what earlier writes left."""
    assert win.value is not None
    earlier = [w.value for w in possible if w.value is not None and w.start < win.end]
    wrong = []
    for key, value in win.value.metadata.items():
        if found.metadata.get(key) != value:
            wrong.append(key)
    for key, value in found.metadata.items():
        if key not in win.value.metadata and not any(v.metadata.get(key) == value for v in earlier):
            wrong.append(key)
    if win.value.document is not None:
        doc_ok = found.document == win.value.document
    else:
        doc_ok = found.document is None or any(v.document == found.document for v in earlier)
    if not wrong and doc_ok:
        return []
    what = ", ".join(f"metadata {k!r}" for k in sorted(set(wrong))) or ""
    what += ("; " if what and not doc_ok else "") + ("" if doc_ok else "document")
    return [
        f"{rid}: expected the value of {win} ({_value_text(win.value)}) merged over earlier "
        f"writes, found {_value_text(found)} (wrong: {what}); {cands}"
    ]


def _check_reads(
    reads: Iterable[Op], writes: Mapping[str, Sequence[_Write]], *, values: bool = True
) -> list[str]:
    """No id twice per read; with ``values``, each value some write begun before produced."""
    out = []
    for read in reads:
        twice = sorted(rid for rid, n in Counter(rid for rid, _ in read.seen).items() if n > 1)
        if twice:
            out.append(f"read [{read.start:.4f}, {read.end:.4f}] returned ids twice: {twice}")
        for rid, value in read.seen if values else ():
            producers = [
                w
                for w in writes.get(rid, ())
                if w.outcome != "failed"
                and w.value is not None
                and w.value.token == value.token
                and w.start < read.end
            ]
            if not producers:
                out.append(
                    f"{rid}: read [{read.start:.4f}, {read.end:.4f}] expected a value some "
                    f"earlier write produced, found {_value_text(value)}; candidate writes: "
                    f"{_shown(writes.get(rid, ()))}"
                )
                continue
            newer = [
                w
                for w in writes.get(rid, ())
                if w.outcome == "ok"
                and w.kind in _REPLACES
                and all(w.start > p.end for p in producers)
                and w.end < read.start
            ]
            if newer:
                out.append(
                    f"{rid}: read [{read.start:.4f}, {read.end:.4f}] returned "
                    f"{_value_text(value)}, which {newer[0]} had replaced before it began"
                )
    return out


def check(
    history: Iterable[Op],
    final: Sequence[tuple[str, Value]],
    parts: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Violations of the rule in the module docstring; an empty list means the history is OK.

    ``final`` is a read of everything after the run (id, value) in the order returned;
    ``parts`` is every physical part's raw id listing (part name -> ids), if checked."""
    ops = list(history)
    writes: dict[str, list[_Write]] = defaultdict(list)
    for op in ops:
        if op.kind == "get":
            continue
        for n, rid in enumerate(op.ids):
            value = op.values[n] if op.kind in _SETS else None
            writes[rid].append(_Write(op.kind, op.start, op.end, op.outcome, value))
    out = _check_reads((op for op in ops if op.kind == "get"), writes)
    end = max((op.end for op in ops), default=0.0)
    # The final read's values are checked per id below, with the full rule.
    out += _check_reads([Op("get", (), end, end, seen=tuple(final))], writes, values=False)
    found = dict(final)
    for rid in sorted(set(writes) | set(found)):
        if rid in found:
            out.extend(_check_present(rid, found[rid], writes.get(rid, ())))
        else:
            out.extend(_check_absent(rid, writes[rid]))
    if parts is not None:
        holders: dict[str, list[str]] = defaultdict(list)
        for part, ids in sorted(parts.items()):
            for rid in ids:
                holders[rid].append(part)
        for rid, where in sorted(holders.items()):
            if len(where) > 1:
                out.append(f"{rid}: expected in one part, found in {where}")
            if rid not in found:
                out.append(f"{rid}: held by {where} but not returned by the final read")
        out.extend(
            f"{rid}: returned by the final read but in no part"
            for rid in found
            if rid not in holders
        )
    return out
