"""Placement policies, filter pruning and time buckets (``_policies``, ``_prune``,
``_timebuckets``): pure properties, no servers."""

from __future__ import annotations

import calendar
import itertools
import math
import operator
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharded_chroma._errors import ConfigurationError, RoutingError
from sharded_chroma._policies import (
    CompositePolicy,
    FieldPolicy,
    HashPolicy,
    TimePolicy,
    build_policy,
    policy_from_json,
    policy_to_json,
)
from sharded_chroma._prune import intersect, normalize, overlaps, range_interval, unite, walk_where
from sharded_chroma._routing import slot_for_key
from sharded_chroma._timebuckets import TimeValueError, bucket_interval, bucket_label, parse_time

relaxed = settings(max_examples=200, deadline=None)

DAY = 86400
T0 = calendar.timegm((2026, 1, 1, 0, 0, 0))  # a Thursday; ISO week 2026-W01 began 2025-12-29
REGIONS: dict[str, Any] = {
    "field": "region",
    "partitions": {"eu": ("s1",), "us": ("s2", "s3"), "7": ("s4",)},
    "values": {"de": "eu", "fr": "eu", "8": "us"},
}


def at(*parts: int) -> float:
    return float(calendar.timegm((*parts, 0, 0, 0)[:6]))


def pick(shards: tuple[str, ...], key: str, slots: int = 4096) -> str:
    return shards[slot_for_key(key, slots) * len(shards) // slots]


def rng(name: str, start: Any, end: Any, shard: str = "s") -> dict[str, Any]:
    return {"name": name, "start": start, "end": end, "shard": shard}


def time_policy(**config: Any) -> Any:
    return build_policy({"kind": "time", "field": "ts", **config})


def ranges(*spans: tuple[Any, ...]) -> dict[str, Any]:
    return {"kind": "time", "field": "ts", "ranges": [rng(*span) for span in spans]}


# -- hash, field, composite ----------------------------------------------------------------------


def test_hash_policy_places_by_id_or_by_field() -> None:
    by_id = HashPolicy(shards=("a", "b", "c"))
    assert {by_id.place(f"doc-{i}", None).shard for i in range(60)} == {"a", "b", "c"}
    assert by_id.place("doc-1", {"x": 1}).shard == pick(("a", "b", "c"), "doc-1")
    assert by_id.scope({"x": "doc-1"}).shards is None  # ids are not metadata
    by_tenant = HashPolicy(field="tenant", shards=("a", "b", "c"), slots=64)
    shard = by_tenant.place("r1", {"tenant": "acme"}).shard
    assert shard == pick(("a", "b", "c"), "acme", 64)
    assert all(by_tenant.place(f"r{i}", {"tenant": "acme"}).shard == shard for i in range(20))
    assert by_tenant.place("r", {"tenant": 5}).shard == pick(("a", "b", "c"), "5", 64)
    assert by_tenant.scope({"tenant": "acme"}).shards == frozenset({shard})
    in_three = by_tenant.scope({"tenant": {"$in": ["acme", "x", "y"]}}).shards
    assert in_three == frozenset(pick(("a", "b", "c"), k, 64) for k in ("acme", "x", "y"))
    # A number may match a stored number of the other type (another string, another slot).
    assert by_tenant.scope({"tenant": 5}).shards is None
    assert by_tenant.scope({"tenant": {"$ne": "acme"}}).shards is None
    with pytest.raises(RoutingError, match="tenant"):
        by_tenant.place("r", {"other": 1})
    with pytest.raises(RoutingError, match="scalar"):
        by_tenant.place("r", {"tenant": ["a"]})


def test_field_policy_partitions_aliases_and_default() -> None:
    policy = FieldPolicy(**REGIONS, default="us")
    assert policy.shards_named() == {"s1", "s2", "s3", "s4"}
    assert policy.place("r", {"region": "eu"}) == policy.place("q", {"region": "fr"})
    assert policy.place("r", {"region": "fr"}).shard == "s1"
    assert policy.place("r", {"region": 7}).shard == "s4"  # integers route by their text
    # Multi-shard partitions hash by id: other metadata, aliases and unknowns do not move it.
    for value in ("us", 8, "unknown", 99):
        for i in range(40):
            placed = policy.place(f"id{i}", {"region": value, "n": i})
            assert placed.shard == pick(("s2", "s3"), f"id{i}") and placed.bucket is None
    assert {policy.place(f"id{i}", {"region": "us"}).shard for i in range(40)} == {"s2", "s3"}


def test_field_policy_unknown_value_names_the_value_and_the_known_ones() -> None:
    with pytest.raises(RoutingError) as info:
        FieldPolicy(**REGIONS).place("doc-9", {"region": "mars"})
    message = str(info.value)
    assert "'mars'" in message and "doc-9" in message
    assert "'7', '8', 'de', 'eu', 'fr', 'us'" in message
    assert info.value.record_id == "doc-9"
    many = FieldPolicy(field="r", partitions={f"p{i:02d}": ("s",) for i in range(30)})
    with pytest.raises(RoutingError, match="and 10 more"):
        many.place("x", {"r": "nope"})


@pytest.mark.parametrize(
    ("metadata", "match"),
    [(m, "no value for the routing field 'region'") for m in (None, {}, {"x": 1}, {"region": None})]
    + [({"region": v}, "string or integer") for v in (7.0, 1.5, True, False, ["eu"], {"a": 1})],
)
def test_field_policy_refuses_missing_values_and_other_types(metadata: Any, match: str) -> None:
    with pytest.raises(RoutingError, match=match):
        FieldPolicy(**REGIONS, default="us").place("r", metadata)


ALL4 = {"s1", "s2", "s3", "s4"}


@pytest.mark.parametrize(
    ("where", "with_default", "without_default"),
    [
        ({"region": "de"}, {"s1"}, {"s1"}),
        ({"region": {"$in": ["eu", 7]}}, {"s1", "s4"}, {"s1", "s4"}),
        ({"region": "mars"}, {"s2", "s3"}, set()),
        ({"region": {"$ne": "eu"}}, ALL4, ALL4),  # "de" and "fr" still land on s1
        ({"region": {"$nin": ["eu", "de", "fr"]}}, {"s2", "s3", "s4"}, {"s2", "s3", "s4"}),
        # Unknowns reach the default; the integer 8 (routed to "us") is not the string "8".
        ({"region": {"$nin": ["us", "8"]}}, ALL4, ALL4),
        ({"region": {"$nin": ["us", "8", 8]}}, ALL4, {"s1", "s4"}),
        ({"$and": [{"region": "eu"}, {"region": "7"}]}, set(), set()),
        ({"$and": [{"region": "eu"}, {"n": 1}]}, {"s1"}, {"s1"}),
        ({"$or": [{"region": "eu"}, {"n": 1}]}, None, None),
        ({"region": {"$gt": 3}}, None, None),
        ({"region": 7.0}, None, None),
    ],
)
def test_field_policy_scope(where: Any, with_default: Any, without_default: Any) -> None:
    assert FieldPolicy(**REGIONS, default="us").scope(where).shards == with_default
    assert FieldPolicy(**REGIONS).scope(where).shards == without_default


def test_composite_policy_hashes_within_the_partition_by_key() -> None:
    policy = CompositePolicy(
        field="region", partitions={"eu": ("e1", "e2", "e3"), "us": ("u1", "u2")},
        hash_key="tenant", slots=128,
    )  # fmt: skip
    shard = policy.place("r0", {"region": "eu", "tenant": "acme"}).shard
    assert shard == pick(("e1", "e2", "e3"), "acme", 128)
    assert all(
        policy.place(f"r{i}", {"region": "eu", "tenant": "acme"}).shard == shard for i in range(20)
    )
    both = {"$and": [{"region": "eu"}, {"tenant": "acme"}]}
    assert policy.scope(both).shards == frozenset({shard})
    us_shard = pick(("u1", "u2"), "acme", 128)
    assert policy.scope({"tenant": "acme"}).shards == frozenset({shard, us_shard})
    assert policy.scope({"tenant": {"$ne": "acme"}}).shards is None
    with pytest.raises(RoutingError, match="tenant"):
        policy.place("r", {"region": "eu"})
    by_id = CompositePolicy(field="region", partitions={"eu": ("e1", "e2")})
    assert by_id.place("doc", {"region": "eu", "tenant": "a"}).shard == pick(("e1", "e2"), "doc")


# -- time ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "granularity", "label"),
    [
        ("2026-11-26T17:05:00Z", "hour", "2026-11-26T17"),
        ("2026-11-26T17:05:00Z", "week", "2026-W48"),
        ("2026-11-26T17:05:00Z", "month", "2026-11"),
        ("2020-12-31T12:00:00Z", "week", "2020-W53"),
        ("2021-01-03T23:59:59Z", "week", "2020-W53"),
        ("2024-12-30T00:00:00Z", "week", "2025-W01"),
        ("2027-01-01T00:00:00Z", "week", "2026-W53"),
        ("2025-12-29", "week", "2026-W01"),
        ("2026-01-01T00:30:00+01:00", "day", "2025-12-31"),  # offsets count
        ("2026-11-26T17:05:00", "day", "2026-11-26"),  # naive is UTC
        ("2025-12-31T23:30:00-01:00", "month", "2026-01"),
    ],
)
def test_bucket_labels(moment: str, granularity: str, label: str) -> None:
    assert bucket_label(parse_time(moment), granularity) == label
    start, end = bucket_interval(label, granularity)  # type: ignore[misc]
    assert start <= parse_time(moment) < end


FORMS = "2026-11-26T17:05:00Z 2026-11-26T17:05:00z 2026-11-26T19:05:00+02:00 2026-11-26T17:05:00"


@pytest.mark.parametrize(
    "value", [*FORMS.split(), " 2026-11-26T12:05-05:00 ", at(2026, 11, 26, 17, 5), 1795712700]
)
def test_parse_time_forms(value: Any) -> None:
    assert parse_time(value) == at(2026, 11, 26, 17, 5)
    assert parse_time("2026-11-26") == at(2026, 11, 26)  # a date is its UTC midnight
    assert parse_time(0) == 0.0 and parse_time(-1.5) == -1.5


@pytest.mark.parametrize(
    "value", [True, False, math.nan, math.inf, -math.inf, 1e300, "soon", "", "2026-13-01", [1]]
)
def test_bad_times_are_refused(value: Any) -> None:
    with pytest.raises(TimeValueError):
        parse_time(value)
    with pytest.raises(RoutingError, match="'ts'"):
        time_policy(hot="h").place("r", {"ts": value})


def test_time_buckets_mapping_and_hot_shard() -> None:
    policy = time_policy(granularity="month", hot="h", buckets={"2025-12": "cold"})
    assert policy.shards_named() == {"h", "cold"}
    old = policy.place("a", {"ts": "2025-12-31T23:59:59Z"})
    assert (old.shard, old.bucket) == ("cold", "2025-12")
    new = policy.place("b", {"ts": T0})
    assert (new.shard, new.bucket) == ("h", "2026-01")
    scope = policy.scope({"ts": {"$gte": T0}})
    assert scope.shards == {"h"} and scope.times == ((T0, math.inf),)
    assert policy.bucket_may_match("2026-01", scope)
    assert not policy.bucket_may_match("2025-12", scope)
    assert policy.scope({"ts": {"$lt": T0 - 10 * DAY}}).shards == {"cold", "h"}
    assert policy.scope({"ts": {"$lt": T0 - 40 * DAY}}).shards == {"h"}  # unmapped old buckets
    assert policy.scope({"ts": {"$ne": T0}}) == policy.scope(None)
    assert policy.scope({"$and": [{"ts": {"$gt": T0}}, {"ts": {"$lt": T0 - 1}}]}).shards == set()


def test_time_ranges() -> None:
    policy = build_policy(
        ranges(("y2025", "2025-01-01", "2026-01-01", "old"), ("q1-2026", T0, T0 + 90 * DAY, "new"))
    )
    placed = policy.place("r", {"ts": T0 + 5})
    assert (placed.shard, placed.bucket) == ("new", "q1-2026")
    assert policy.place("r", {"ts": T0 - 1}).bucket == "y2025"
    with pytest.raises(RoutingError, match="outside every time range"):
        policy.place("r", {"ts": T0 + 90 * DAY})
    assert policy.scope({"ts": {"$lt": T0 - 5}}).shards == {"old"}
    assert policy.scope({"ts": T0 + 100 * DAY}).shards == set()


FULLWIDTH_DAY = "\uff12\uff10\uff12\uff16-01-01"  # 2026-01-01 in full-width digits
FIELD_A = {"kind": "field", "field": "f", "partitions": {"a": ["s"]}}
TIME_H = {"kind": "time", "field": "ts", "hot": "h"}


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"kind": "nope"}, "unknown policy kind 'nope'"),
        ({"kind": "hash", "field": ""}, "field must be"),
        ({"kind": "hash", "shards": ["a", "a"]}, "must not repeat"),
        ({"kind": "hash", "shards": ["a", "b"], "slots": 1}, "at least the shard count"),
        ({"kind": "field", "partitions": {"a": ["s"]}}, "field: Field required"),
        ({**FIELD_A, "partitions": {}}, "at least one partition"),
        ({**FIELD_A, "partitions": {"a": []}}, "'a' needs at least one"),
        ({**FIELD_A, "partitions": {"a": ["s", "s"]}}, "shard twice"),
        ({**FIELD_A, "default": "b"}, "default partition 'b'"),
        ({**FIELD_A, "values": {"x": "b"}}, "'x' maps to unknown partition 'b'"),
        ({**FIELD_A, "bogus": 1}, "bogus"),
        ({**FIELD_A, "kind": "composite", "hash_key": "f"}, "hash_key"),
        ({**TIME_H, "hot": None}, "hot must name"),
        ({**TIME_H, "granularity": "year"}, "granularity"),
        ({**TIME_H, "buckets": {"2026-13-01": "s"}}, "not a day bucket label"),
        ({**TIME_H, "ranges": [rng("a", 0, 1)]}, "drop buckets and hot"),
        (ranges(("a", 0, 100), ("b", 99, 200)), "'a' and 'b' overlap"),
        (ranges(("a", 0, 100), ("b", 10, 20), ("c", 50, 60)), "overlap"),
        (ranges(("a", "2026-01-01", "2026-02-01"), ("b", T0 + DAY, T0 + 2 * DAY)), "overlap"),
        (ranges(("a", 0, 100), ("a", 100, 200)), "unique"),
        (ranges(("a", 100, 100)), "end after"),
        (ranges(("a", 0, "soon")), "range 'a'"),
        (ranges(("no/slash", 0, 1)), "range name"),
        (ranges(("r1\n", 0, 10)), "range name"),
        ({**TIME_H, "granularity": "month", "buckets": {"2026-11\n": "s"}}, "label"),
        ({**TIME_H, "buckets": {FULLWIDTH_DAY: "s"}}, "label"),
        ({"kind": ["field"]}, "kind"),
    ],
)
def test_invalid_configurations(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        build_policy(config)
    assert "errors.pydantic.dev" not in str(info.value)


@pytest.mark.parametrize(
    "policy",
    [
        HashPolicy(),
        HashPolicy(field="tenant", shards=("a", "b"), slots=16),
        FieldPolicy(**REGIONS, default="us"),
        CompositePolicy(**REGIONS, hash_key="tenant"),
        time_policy(granularity="week", hot="h", buckets={"2026-W01": "c"}),
        time_policy(ranges=[rng("a", "2026-01-01T00:00:00Z", T0 + 9.5), rng("b", -5, 0)]),
    ],
)
def test_policy_json_round_trip(policy: Any) -> None:
    text = policy_to_json(policy)
    assert f'"kind":"{policy.kind}"' in text
    back = policy_from_json(text)
    assert back == policy and type(back) is type(policy)


def test_legacy_stored_policy_is_a_hash_policy() -> None:
    assert policy_from_json("tenant") == HashPolicy(field="tenant")
    assert policy_from_json("") == HashPolicy()
    with pytest.raises(ConfigurationError, match="stored policy"):
        policy_from_json('{"kind": "field"}')


SPAN = {"hour": (3600, 3600), "day": (DAY, DAY), "week": (7 * DAY, 7 * DAY)}
SPAN["month"] = (28 * DAY, 31 * DAY)


@relaxed
@given(
    # Years 1..9999, but for the last second: at 2.5e11 a float's step is about 3e-5 s, so
    # 23:59:59.999999 on 9999-12-31 rounds past the end of time (parse_time refuses it).
    seconds=st.integers(-62135596800, 253402300798),
    micros=st.sampled_from([0, 1, 999_999]) | st.integers(0, 999_999),
    granularity=st.sampled_from(sorted(SPAN)),
)
def test_bucket_interval_holds_its_times(seconds: int, micros: int, granularity: str) -> None:
    t = seconds + micros / 1e6
    label = bucket_label(t, granularity)
    span = bucket_interval(label, granularity)
    assert span is not None and span[0] <= t < span[1], (t, label, span)
    assert SPAN[granularity][0] <= span[1] - span[0] <= SPAN[granularity][1]
    assert bucket_label(span[0], granularity) == label


# -- the key property: scope() never leaves out a place where a matching record can be -----------

# Routing values: strings and integers, "7" and 7 on purpose (same partition, never equal).
REGION_POOL = ["eu", "us", "de", "fr", 7, "7", 8, "mars", 99]
TENANT_POOL = ["acme", "globex", "initech", 5]
TIMES = [T0 + d for d in (0, -1, -0.5, 1, 3599.5, DAY, -3 * DAY, 4 * DAY, 31 * DAY)]
TIME_POOL = [*TIMES, "2026-01-01T00:00:00Z", "2025-12-31T23:30:00-01:00", "2026-01-02"]
TIME_BOUNDS = [*TIMES, T0 + 0.25, T0 + 0.5, T0 + 2 * DAY, T0 - 40 * DAY, T0 + 100 * DAY]
FILTER_POOLS: dict[str, list[Any]] = {
    "region": [*REGION_POOL, "nope", 42],
    "tenant": [*TENANT_POOL, "5", "nobody"],
    "ts": TIME_POOL,
}
RANGE_OPS = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}


def calendar_policy(granularity: str, mapped: int) -> Any:
    buckets = {bucket_label(t, granularity): f"cold{i % 2}" for i, t in enumerate(TIMES[:mapped])}
    return time_policy(granularity=granularity, hot="hot", buckets=buckets)


RANGES = [
    rng("late2025", T0 - 40 * DAY, T0, "r1"),
    rng("jan", "2026-01-01", T0 + 2 * DAY, "r2"),
    rng("feb", T0 + 31 * DAY, T0 + 59 * DAY, "r1"),
]
RANGED = time_policy(ranges=RANGES)
FIELDS = [FieldPolicy(**REGIONS, default=d) for d in (None, "us", "7")]
COMPOSITES = [
    CompositePolicy(**REGIONS, default=d, hash_key="tenant", slots=s)
    for d in (None, "eu")
    for s in (4, 4096)
]
HASHES = [HashPolicy(field="tenant", shards=("a", "b", "c"), slots=s) for s in (3, 16, 4096)]
CALENDARS = [calendar_policy(g, m) for g in ("hour", "day", "week", "month") for m in (0, 3, 8)]
# Field-like policies twice: their complement ($ne, $nin) and default logic is the subtlest.
POLICY = st.one_of(
    [st.sampled_from(g) for g in (FIELDS, FIELDS, COMPOSITES, COMPOSITES, HASHES, CALENDARS)]
    + [st.just(RANGED)]
)


def every(regions: list[Any], times: list[Any]) -> list[dict[str, Any]]:
    """Every combination of the pools: far more than a few random records, and ids are drawn.
    A time policy's filters never name the region, the other policies' never the time."""
    combos = itertools.product(regions, TENANT_POOL, range(4), times)
    return [{"region": r, "tenant": t, "n": n, "ts": ts} for r, t, n, ts in combos]


PLAIN_RECORDS, TIME_RECORDS = every(REGION_POOL, [T0]), every(["eu"], TIME_POOL)


def under(key: str) -> Callable[[Any], dict[str, Any]]:
    return lambda value: {key: value}


def leaf(field: str, one: st.SearchStrategy[Any], bound: Any = None) -> Any:
    some = st.lists(one, min_size=1, max_size=3)
    conds = [one, *(one.map(under(op)) for op in ("$eq", "$ne"))]
    conds += [some.map(under(op)) for op in ("$in", "$nin")]
    if bound is not None:
        conds += [bound.map(under(op)) for op in RANGE_OPS]
        conds.append(st.tuples(bound, bound).map(lambda b: {"$gte": min(b), "$lt": max(b)}))
    return st.one_of(conds).map(under(field))


LEAVES = {
    "region": leaf("region", st.sampled_from(FILTER_POOLS["region"])),
    "tenant": leaf("tenant", st.sampled_from(FILTER_POOLS["tenant"])),
    "n": leaf("n", st.integers(0, 3), st.integers(0, 3)),
    "ts": leaf("ts", st.sampled_from(TIME_POOL), st.sampled_from(TIME_BOUNDS)),
}


def wheres(routing: str) -> st.SearchStrategy[dict[str, Any]]:
    """A single condition half the time (sharpest for one operator), else an and/or tree."""
    one = st.one_of(*[LEAVES[routing]] * 3, LEAVES["n"], LEAVES["tenant"])
    logic = st.sampled_from(["$and", "$or"])

    def node(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
        return st.builds(
            lambda op, parts: {op: parts}, logic, st.lists(kids, min_size=2, max_size=3)
        )

    return st.one_of(one, st.recursive(one, node, max_leaves=8))


WHERES = {routing: wheres(routing) for routing in ("region", "tenant", "ts")}


def kind(v: Any) -> str:
    return "str" if isinstance(v, str) else "bool" if isinstance(v, bool) else "num"


def equal(a: Any, b: Any) -> bool:
    return kind(a) == kind(b) and a == b  # typed: "7" is not 7


def holds(op: str, value: Any, arg: Any) -> bool:
    if op in ("$eq", "$ne"):
        return equal(value, arg) == (op == "$eq")
    if op in ("$in", "$nin"):
        return any(equal(value, a) for a in arg) == (op == "$in")
    return kind(value) == kind(arg) == "num" and RANGE_OPS[op](value, arg)  # numbers only


def matches(where: dict[str, Any], metadata: dict[str, Any]) -> bool:
    """Chroma's reading of a filter; every record here carries every field."""
    for key, value in where.items():
        if key in ("$and", "$or"):
            found = (matches(w, metadata) for w in value)
            if not (all(found) if key == "$and" else any(found)):
                return False
        else:
            cond = value if isinstance(value, dict) else {"$eq": value}
            if not all(holds(op, metadata[key], arg) for op, arg in cond.items()):
                return False
    return True


def placements(policy: Any, salt: str) -> list[tuple[dict[str, Any], Any]]:
    out = []
    for i, metadata in enumerate(TIME_RECORDS if policy.kind == "time" else PLAIN_RECORDS):
        try:
            out.append((metadata, policy.place(f"{salt}{i}", metadata)))
        except RoutingError:  # a refused write stores nothing; only these policies refuse
            assert getattr(policy, "default", "") is None or bool(getattr(policy, "ranges", None))
    return out


def assert_covers(policy: Any, where: dict[str, Any], placed: list[tuple[Any, Any]]) -> None:
    scope = policy.scope(where)
    assert scope.shards is None or scope.shards <= policy.shards_named()
    for metadata, place in placed:
        if matches(where, metadata):
            assert scope.shards is None or place.shard in scope.shards, (where, metadata, place)
            if place.bucket is not None:  # time policies
                assert policy.bucket_may_match(place.bucket, scope), (where, metadata, place)


@st.composite
def cases(draw: st.DrawFn) -> tuple[Any, dict[str, Any], str]:
    policy = draw(POLICY)
    return policy, draw(WHERES[policy.field]), draw(st.text("ab-", max_size=4))


@relaxed
@given(case=cases())
def test_scope_covers_every_matching_record(case: tuple[Any, dict[str, Any], str]) -> None:
    policy, where, salt = case
    assert_covers(policy, where, placements(policy, salt))
    # Not vacuous: an equality on a value a record can have narrows the scope.
    if isinstance(policy, TimePolicy):
        probe = policy.scope({"ts": T0 + 1})
        assert probe.times == ((T0 + 1, T0 + 1),)
        later = policy.place("p", {"ts": T0 + 31 * DAY}).bucket
        assert later is not None and not policy.bucket_may_match(later, probe)
    else:
        probe = policy.scope({policy.field: "acme" if policy.kind == "hash" else "eu"})
        assert probe.shards is not None and probe.shards < policy.shards_named()


@pytest.mark.parametrize("policy", [*FIELDS, *COMPOSITES, *HASHES, *CALENDARS[2::3], RANGED])
def test_scope_covers_every_single_condition(policy: Any) -> None:
    """Every condition on the routing field with one value or two: rare draws above."""
    values, field = FILTER_POOLS[policy.field], policy.field
    subsets = [[v] for v in values] + [list(p) for p in itertools.combinations(values, 2)]
    wheres = [{field: v} for v in values] + [{field: {"$ne": v}} for v in values]
    wheres += [{field: {op: s}} for op in ("$in", "$nin") for s in subsets]
    wheres += [{field: {op: b}} for op in RANGE_OPS for b in TIME_BOUNDS if field == "ts"]
    placed = placements(policy, "")
    for where in wheres:
        assert_covers(policy, where, placed)


# -- interval helpers and walk_where -------------------------------------------------------------

ENDS = st.integers(-6, 6).map(lambda k: k / 2) | st.sampled_from([-math.inf, math.inf])
RAW = st.lists(st.tuples(ENDS, ENDS), max_size=5)
SAMPLES = [k / 4 for k in range(-30, 31)]


def member(intervals: Any, x: float) -> bool:
    return any(lo <= x <= hi for lo, hi in intervals)


@relaxed
@given(a=RAW, b=RAW, start=st.integers(-7, 7), length=st.integers(1, 6))
def test_interval_helpers_match_brute_force(a: Any, b: Any, start: int, length: int) -> None:
    na, nb = normalize(a), normalize(b)
    both, either = intersect(na, nb), unite(na, nb)
    for result in (na, nb, both, either):  # sorted, disjoint, non-empty closed intervals
        assert all(lo <= hi for lo, hi in result)
        assert all(x[1] < y[0] for x, y in itertools.pairwise(result))
    for x in SAMPLES:
        assert member(na, x) == member(a, x)
        assert member(both, x) == (member(a, x) and member(b, x))
        assert member(either, x) == (member(a, x) or member(b, x))
    lo, hi = start / 2, start / 2 + length / 2  # the half-open bucket [lo, hi)
    assert overlaps(na, lo, hi) == any(member(na, x) for x in SAMPLES if lo <= x < hi)


def test_range_interval() -> None:
    # Open ends become the neighbouring float: exact, since no float lies in between.
    assert range_interval("$gte", 5) == ((5, math.inf),)
    assert range_interval("$gt", 5) == ((math.nextafter(5, math.inf), math.inf),)
    assert range_interval("$lte", 5) == ((-math.inf, 5),)
    assert range_interval("$lt", 5) == ((-math.inf, math.nextafter(5, -math.inf)),)
    assert range_interval("$ne", 5) is None
    assert range_interval("$gt", math.nan) is None and range_interval("$lt", math.inf) is None


def test_walk_where_shapes() -> None:
    def on_x(field: str, op: str, arg: Any) -> frozenset[Any] | None:
        return frozenset(arg if op == "$in" else [arg]) if field == "x" else None

    def walk(where: Any) -> Any:
        return walk_where(where, on_x, frozenset.__and__, frozenset.__or__)

    assert walk(None) is None and walk({}) is None and walk([{"x": 1}]) is None
    assert walk({"x": 1}) == {1}
    assert walk({"x": {"$in": [1, 2], "$eq": 2}}) == {2}
    assert walk({"x": 1, "y": 2}) == {1}  # several keys: their conjunction
    assert walk({"$and": [{"x": {"$in": [1, 2]}}, {"y": 3}, {"x": 2}]}) == {2}
    assert walk({"$or": [{"x": 1}, {"x": {"$in": [2, 3]}}]}) == {1, 2, 3}
    assert walk({"$or": [{"x": 1}, {"y": 3}]}) is None  # a union with "anything"
    assert walk({"$or": [{"x": 1}, {"$and": [{"x": 2}, {"y": 1}]}]}) == {1, 2}
    assert walk({"$and": []}) is None and walk({"$or": []}) is None and walk({"x": {}}) is None
    assert walk({"$and": {"x": 1}}) is None and walk({"$not": [{"x": 1}]}) is None


# -- edge cases that once failed -----------------------------------------------------------------


@pytest.mark.parametrize("where", [{"t": {"$ne": "1"}}, {"t": {"$nin": ["1"]}}])
def test_ne_on_a_number_routed_partition(where: Any) -> None:
    policy = FieldPolicy(field="t", partitions={"1": ("s1",), "2": ("s2",)})
    # The integer 1 lands on s1; Chroma compares typed values, so 1 != "1" and it matches.
    assert policy.place("a", {"t": 1}).shard == "s1"
    assert "s1" in policy.scope(where).shards  # type: ignore[operator]


@pytest.mark.parametrize(
    ("t", "granularity"),
    [
        (T0 + 0.5, "hour"),
        (at(1000, 1, 1), "day"),
        (253402300000.0, "month"),  # 9999-12-31T23:46:40
        (DAY - 4e-7, "day"),  # just below a boundary: floored, never rounded up
        *((-30625e6, g) for g in ("hour", "day", "month")),  # mid-999
        *((253402300000.0, g) for g in ("hour", "day", "week")),
    ],
)
def test_bucket_label_edges(t: float, granularity: str) -> None:
    span = bucket_interval(bucket_label(t, granularity), granularity)
    assert span is not None and span[0] <= t < span[1]


def test_sub_microsecond_time_is_not_pruned_away() -> None:
    policy = time_policy(granularity="day", hot="h")
    t = DAY - 4e-7  # 1970-01-01T23:59:59.9999996
    bucket = policy.place("r", {"ts": t}).bucket
    assert policy.bucket_may_match(bucket, policy.scope({"ts": {"$lte": t}}))


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-05:00"])
def test_iso_time_outside_years_1_to_9999(value: str) -> None:
    with pytest.raises(RoutingError):
        time_policy(hot="h").place("r", {"ts": value})
