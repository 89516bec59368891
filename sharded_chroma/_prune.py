"""Reading a ``where`` filter for what it says about one routing field.

Pruning may ask too many shards, never too few: every rule here over-approximates. A filter is
read as a tree of ``$and``/``$or`` over field conditions; a condition on another field (or an
operator that says nothing useful) is "anything", ``$and`` intersects, ``$or`` unites.

Two domains are used: sets of shard names (hash, field and composite policies) and unions of
closed time intervals in epoch seconds (time policy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

__all__ = [
    "Intervals",
    "field_conditions",
    "intersect",
    "normalize",
    "overlaps",
    "range_interval",
    "unite",
    "walk_where",
]

T = TypeVar("T")

Intervals = tuple[tuple[float, float], ...]
"""Sorted, disjoint closed intervals ``[lo, hi]``; ``()`` is the empty set."""

_LOGICAL = ("$and", "$or")


def walk_where(
    where: Mapping[str, Any] | None,
    leaf: Callable[[str, str, Any], T | None],
    both: Callable[[T, T], T],
    either: Callable[[T, T], T],
) -> T | None:
    """Fold a filter into a domain value; None means "anything" (no pruning).

    ``leaf(field, operator, operand)`` answers for one condition (None: anything), ``both``
    intersects, ``either`` unites. Unknown shapes are read as "anything", so a filter this code
    does not understand is never pruned (the server still judges whether it is valid).
    """
    if not isinstance(where, Mapping) or not where:
        return None
    parts: list[T | None] = []
    for key, value in where.items():
        if key == "$and" and isinstance(value, list):
            parts.append(_fold([walk_where(w, leaf, both, either) for w in value], both, True))
        elif key == "$or" and isinstance(value, list):
            parts.append(_fold([walk_where(w, leaf, both, either) for w in value], either, False))
        elif key.startswith("$"):
            parts.append(None)
        else:
            conds = [leaf(key, op, arg) for op, arg in field_conditions(value)]
            parts.append(_fold(conds, both, True) if conds else None)
    # Several keys in one mapping are read as their conjunction.
    return _fold(parts, both, True)


def _fold(values: list[T | None], op: Callable[[T, T], T], conjunction: bool) -> T | None:
    known = [v for v in values if v is not None]
    if not conjunction and len(known) < len(values):
        return None  # a union with "anything" is anything
    if not known:
        return None
    out = known[0]
    for v in known[1:]:
        out = op(out, v)
    return out


def field_conditions(value: Any) -> list[tuple[str, Any]]:
    """The (operator, operand) pairs of one field's condition; a bare value is ``$eq``."""
    if isinstance(value, Mapping):
        return [(str(op), arg) for op, arg in value.items()]
    return [("$eq", value)]


# -- time intervals ------------------------------------------------------------------------------


def normalize(intervals: Iterable[tuple[float, float]]) -> Intervals:
    ordered = sorted((lo, hi) for lo, hi in intervals if lo <= hi)
    out: list[tuple[float, float]] = []
    for lo, hi in ordered:
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def unite(a: Intervals, b: Intervals) -> Intervals:
    return normalize((*a, *b))


def intersect(a: Intervals, b: Intervals) -> Intervals:
    out = []
    for alo, ahi in a:
        for blo, bhi in b:
            lo, hi = max(alo, blo), min(ahi, bhi)
            if lo <= hi:
                out.append((lo, hi))
    return normalize(out)


def overlaps(intervals: Intervals, start: float, end: float) -> bool:
    """Whether the half-open bucket ``[start, end)`` meets any closed interval."""
    return any(lo < end and hi >= start for lo, hi in intervals)


def range_interval(op: str, bound: float) -> Intervals | None:
    """The closed interval a range operator allows. An open end becomes the next float inside
    it, which is exact: no float lies between a bound and its neighbour."""
    if not math.isfinite(bound):
        return None
    if op == "$gte":
        return ((bound, math.inf),)
    if op == "$gt":
        return ((math.nextafter(bound, math.inf), math.inf),)
    if op == "$lte":
        return ((-math.inf, bound),)
    if op == "$lt":
        return ((-math.inf, math.nextafter(bound, -math.inf)),)
    return None
