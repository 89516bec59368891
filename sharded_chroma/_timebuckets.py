"""Time values and calendar buckets, in UTC.

A time value is either a number (seconds since the Unix epoch) or an ISO-8601 string; a string
without a zone is read as UTC. Buckets are half-open intervals ``[start, end)`` in epoch
seconds, named by labels that are valid in Chroma collection names (so a bucket can be a
physical collection): ``2026-11-26T17`` (hour), ``2026-11-26`` (day), ``2026-W48`` (ISO week),
``2026-11`` (month).
"""

from __future__ import annotations

import math
import re
from datetime import date, datetime, timedelta, timezone
from typing import Literal

__all__ = [
    "GRANULARITIES",
    "Granularity",
    "TimeValueError",
    "bucket_interval",
    "bucket_label",
    "parse_time",
]

Granularity = Literal["hour", "day", "week", "month"]
GRANULARITIES: tuple[str, ...] = ("hour", "day", "week", "month")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_LABEL = {
    "hour": re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2})"),
    "day": re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})"),
    "week": re.compile(r"([0-9]{4})-W([0-9]{2})"),
    "month": re.compile(r"([0-9]{4})-([0-9]{2})"),
}
_SPAN = {"hour": 3600.0, "day": 86400.0, "week": 7 * 86400.0}


class TimeValueError(ValueError):
    """A value is not a usable time (wrong type, not finite, malformed, out of range)."""


def parse_time(value: object) -> float:
    """Epoch seconds of a time value; raises TimeValueError saying what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TimeValueError(
            f"expected epoch seconds (int or float) or an ISO-8601 string, "
            f"got {type(value).__name__}"
        )
    if isinstance(value, str):
        seconds = _parse_iso(value)
    else:
        seconds = float(value)
        if not math.isfinite(seconds):
            raise TimeValueError(f"expected a finite number of epoch seconds, got {value!r}")
    try:
        _utc(seconds)
    except (OverflowError, ValueError):
        raise TimeValueError(f"{value!r} is outside years 1..9999 (UTC)") from None
    return seconds


def _parse_iso(text: str) -> float:
    raw = text.strip()
    # Python 3.10's fromisoformat does not read a "Z" zone designator.
    if raw.endswith(("Z", "z")):
        raw = raw[:-1] + "+00:00"
    try:
        if len(raw) == 10:
            moment = datetime.combine(date.fromisoformat(raw), datetime.min.time())
        else:
            moment = datetime.fromisoformat(raw)
    except ValueError:
        raise TimeValueError(f"{text!r} is not an ISO-8601 date or date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH).total_seconds()


def _utc(seconds: float) -> datetime:
    return _EPOCH + timedelta(seconds=seconds)


def bucket_label(seconds: float, granularity: str) -> str:
    """The label of the bucket holding ``seconds``: ``bucket_interval`` of the label contains
    ``seconds`` exactly. Bucket boundaries are whole seconds, so the label of a time is the
    label of its floor, which is exact for floats (no rounding up across a boundary)."""
    moment = _EPOCH + timedelta(seconds=math.floor(seconds))
    y, m, d = moment.year, moment.month, moment.day
    if granularity == "hour":
        return f"{y:04d}-{m:02d}-{d:02d}T{moment.hour:02d}"
    if granularity == "day":
        return f"{y:04d}-{m:02d}-{d:02d}"
    if granularity == "week":
        year, week, _ = moment.isocalendar()
        return f"{year:04d}-W{week:02d}"
    if granularity == "month":
        return f"{y:04d}-{m:02d}"
    raise ValueError(f"unknown granularity {granularity!r}; known: {list(GRANULARITIES)}")


def bucket_interval(label: str, granularity: str) -> tuple[float, float] | None:
    """``[start, end)`` in epoch seconds of a bucket label, or None if ``label`` is not one."""
    pattern = _LABEL.get(granularity)
    match = pattern.fullmatch(label) if pattern else None
    if match is None:
        return None
    parts = [int(p) for p in match.groups()]
    try:
        if granularity == "hour":
            start = datetime(parts[0], parts[1], parts[2], parts[3], tzinfo=timezone.utc)
        elif granularity == "day":
            start = datetime(parts[0], parts[1], parts[2], tzinfo=timezone.utc)
        elif granularity == "week":
            monday = date.fromisocalendar(parts[0], parts[1], 1)
            start = datetime.combine(monday, datetime.min.time(), tzinfo=timezone.utc)
        else:
            start = datetime(parts[0], parts[1], 1, tzinfo=timezone.utc)
    except (ValueError, OverflowError):
        return None
    first = (start - _EPOCH).total_seconds()
    if granularity in _SPAN:
        # In seconds rather than datetimes: the last bucket of year 9999 ends past datetime.max.
        return first, first + _SPAN[granularity]
    year, month = (parts[0] + 1, 1) if parts[1] == 12 else (parts[0], parts[1] + 1)
    if year > 9999:
        return first, first + 31 * 86400.0
    return first, (datetime(year, month, 1, tzinfo=timezone.utc) - _EPOCH).total_seconds()
