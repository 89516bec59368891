"""The time policy: a timestamp field is bucketed, each bucket its own physical collection."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator

from ._errors import RoutingError
from ._frozen import FrozenDict
from ._placement import FROZEN, SHOW, Placement, Scope, routing_value
from ._prune import Intervals, intersect, normalize, overlaps, range_interval, unite, walk_where
from ._timebuckets import TimeValueError, bucket_interval, bucket_label, parse_time

__all__ = ["TimePolicy", "TimeRange"]

# Bucket labels become part of physical collection names.
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?")


class TimeRange(BaseModel):
    """An explicit bucket: ``[start, end)`` (epoch seconds or ISO-8601) on one shard."""

    model_config = FROZEN
    name: str
    start: float | str
    end: float | str
    shard: str

    @cached_property
    def interval(self) -> tuple[float, float]:
        # Cached: placing each record of a batch looks the ranges up.
        return parse_time(self.start), parse_time(self.end)


class TimePolicy(BaseModel):
    """A timestamp field is bucketed; each bucket is its own physical collection on one shard.

    Calendar buckets (``granularity``) go to ``buckets[label]`` if mapped, else to ``hot``.
    With explicit ``ranges`` instead, a time outside every range is refused.
    """

    model_config = FROZEN
    kind: Literal["time"] = "time"
    field: str = Field(min_length=1)
    granularity: Literal["hour", "day", "week", "month"] | None = "day"
    ranges: tuple[TimeRange, ...] = ()
    buckets: Annotated[Mapping[str, str], AfterValidator(FrozenDict)] = Field(
        default_factory=FrozenDict
    )
    hot: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TimePolicy:
        if self.ranges:
            if self.buckets or self.hot is not None:
                raise ValueError("explicit ranges name their own shards; drop buckets and hot")
            spans = []
            for r in self.ranges:
                if not _LABEL_RE.fullmatch(r.name):
                    raise ValueError(f"range name {r.name!r} must be 1-64 of [A-Za-z0-9._-]")
                try:
                    lo, hi = r.interval
                except TimeValueError as exc:
                    raise ValueError(f"range {r.name!r}: {exc}") from None
                if not lo < hi:
                    raise ValueError(f"range {r.name!r} must end after it starts")
                spans.append((lo, hi, r.name))
            spans.sort()
            for (_, hi, a), (lo, _, b) in itertools.pairwise(spans):
                if lo < hi:
                    raise ValueError(f"ranges {a!r} and {b!r} overlap")
            if len({r.name for r in self.ranges}) != len(self.ranges):
                raise ValueError("range names must be unique")
            return self
        if self.granularity is None:
            raise ValueError("give a granularity (hour, day, week, month) or explicit ranges")
        if self.hot is None:
            raise ValueError("hot must name the shard that receives new (unmapped) buckets")
        for label in self.buckets:
            if bucket_interval(label, self.granularity) is None:
                raise ValueError(f"{label!r} is not a {self.granularity} bucket label")
        return self

    def shards_named(self) -> frozenset[str]:
        if self.ranges:
            return frozenset(r.shard for r in self.ranges)
        return frozenset({*self.buckets.values(), *([self.hot] if self.hot else [])})

    def time_of(self, record_id: str, metadata: Mapping[str, Any] | None) -> float:
        value = routing_value(record_id, metadata, self.field)
        try:
            return parse_time(value)
        except TimeValueError as exc:
            raise RoutingError(
                f"record {record_id!r}: the time field {self.field!r} {exc}; nothing was written",
                record_id=record_id,
                value=value,
            ) from None

    def bucket_of(self, seconds: float) -> str | None:
        if self.ranges:
            for r in self.ranges:
                lo, hi = r.interval
                if lo <= seconds < hi:
                    return r.name
            return None
        assert self.granularity is not None
        return bucket_label(seconds, self.granularity)

    def interval_of(self, bucket: str) -> tuple[float, float] | None:
        if self.ranges:
            for r in self.ranges:
                if r.name == bucket:
                    return r.interval
            return None
        assert self.granularity is not None
        return bucket_interval(bucket, self.granularity)

    def shard_of(self, bucket: str) -> str:
        if self.ranges:
            return next(r.shard for r in self.ranges if r.name == bucket)
        return self.buckets.get(bucket) or str(self.hot)

    def owner_of(self, bucket: str) -> str | None:
        """``shard_of`` for a bucket found on a shard: None when the policy names no such
        bucket (an explicit range that no longer exists)."""
        if self.ranges and not any(r.name == bucket for r in self.ranges):
            return None
        return self.shard_of(bucket)

    def place(self, record_id: str, metadata: Mapping[str, Any] | None) -> Placement:
        seconds = self.time_of(record_id, metadata)  # range-checked: bucket_of cannot overflow
        bucket = self.bucket_of(seconds)
        if bucket is None:
            names = ", ".join(r.name for r in self.ranges[:SHOW])
            raise RoutingError(
                f"record {record_id!r}: {self.field}={metadata[self.field]!r} "  # type: ignore[index]
                f"is outside every time range ({names}); nothing was written",
                record_id=record_id,
                value=seconds,
            )
        return Placement(self.shard_of(bucket), bucket)

    def _leaf(self, name: str, op: str, arg: Any) -> Intervals | None:
        if name != self.field:
            return None
        if op in ("$eq", "$in"):
            values = [arg] if op == "$eq" else arg
            if not isinstance(values, list):
                return None
            points = []
            for v in values:
                try:
                    t = parse_time(v)
                except TimeValueError:
                    return None  # not a time: leave it to the server
                points.append((t, t))
            return normalize(points)
        if isinstance(arg, bool) or not isinstance(arg, (int, float)):
            return None
        return range_interval(op, float(arg))

    def scope(self, where: Mapping[str, Any] | None) -> Scope:
        times = walk_where(where, self._leaf, intersect, unite)
        if times is None:
            return Scope()
        if self.ranges:
            shards = {r.shard for r in self.ranges if overlaps(times, *r.interval)}
        else:
            shards = {self.shard_of(b) for b, _ in self.buckets.items() if self._meets(b, times)}
            if times:
                shards.add(str(self.hot))
        return Scope(shards=frozenset(shards), times=times)

    def _meets(self, bucket: str, times: Intervals) -> bool:
        span = self.interval_of(bucket)
        return span is None or overlaps(times, *span)

    def buckets_within(self, times: Intervals, limit: int) -> list[str] | None:
        """Every bucket label a record matching ``times`` can carry, whether or not the bucket
        exists; None when the times are unbounded or span more than ``limit`` buckets."""
        if self.ranges:
            return [r.name for r in self.ranges if overlaps(times, *r.interval)]
        assert self.granularity is not None
        out: list[str] = []
        for lo, hi in times:
            if not (math.isfinite(lo) and math.isfinite(hi)):
                return None
            try:
                label = bucket_label(lo, self.granularity)
            except (OverflowError, ValueError):
                return None
            while True:
                span = bucket_interval(label, self.granularity)
                if span is None or len(out) > limit:
                    return None
                if span[0] > hi:
                    break
                if label not in out:
                    out.append(label)
                try:
                    label = bucket_label(span[1], self.granularity)
                except (OverflowError, ValueError):
                    break  # the end of time
        return out if len(out) <= limit else None

    def bucket_may_match(self, bucket: str, scope: Scope) -> bool:
        """Whether a bucket (found on a shard) can hold records matching the scope."""
        return scope.times is None or self._meets(bucket, scope.times)
