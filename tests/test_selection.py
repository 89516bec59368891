"""Read selection strategies, on fake candidates (no servers): the order each one documents, the
name registry, and that every strategy returns a permutation of what it was given."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharded_chroma import ConfigurationError, NodeStats, ReplicationConfig, Topology
from sharded_chroma._selection import (
    SELECTORS,
    LatencyAware,
    LeastOutstanding,
    PrimaryOnly,
    RoundRobin,
    make_selector,
)


@dataclass(eq=False)
class Fake:
    """A candidate as a selector sees it: url, role and live counters. Compared by identity."""

    url: str
    is_primary: bool = False
    stats: NodeStats = field(default_factory=NodeStats)

    def __repr__(self) -> str:
        s = self.stats
        return f"Fake({self.url}, p={self.is_primary}, f={s.in_flight}, ms={s.latency_ewma_ms})"


def fake(url: str, *, primary: bool = False, in_flight: int = 0, ms: float | None = None) -> Fake:
    return Fake(url, primary, NodeStats(in_flight=in_flight, latency_ewma_ms=ms))


def urls(nodes: list[Fake]) -> list[str]:
    return [n.url for n in nodes]


# -- registry -------------------------------------------------------------------------------


def test_registry_names_and_classes() -> None:
    assert set(SELECTORS) == {"round_robin", "least_outstanding", "latency", "primary_only"}
    assert isinstance(make_selector("round_robin"), RoundRobin)
    assert isinstance(make_selector("least_outstanding"), LeastOutstanding)
    assert isinstance(make_selector("latency"), LatencyAware)
    assert isinstance(make_selector("primary_only"), PrimaryOnly)
    # A fresh object per call: two replica sets never share a round-robin counter.
    assert make_selector("round_robin") is not make_selector("round_robin")


@pytest.mark.parametrize("name", ["", "random", "Round_Robin", "latency ", "primary"])
def test_unknown_name_is_a_configuration_error(name: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        make_selector(name)
    message = str(info.value)
    assert repr(name) in message
    for known in SELECTORS:
        assert known in message  # the error lists what would have worked
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_unknown_name_in_a_topology_is_refused_up_front() -> None:
    with pytest.raises(ConfigurationError, match="read_selection"):
        Topology.build(
            {
                "shards": [{"name": "s0", "primary": "http://127.0.0.1:1", "replicas": []}],
                "replication": {"read_selection": "fastest"},
            }
        )
    with pytest.raises(ValueError, match="unknown read_selection"):
        ReplicationConfig(read_selection="fastest")
    for name in SELECTORS:
        assert ReplicationConfig(read_selection=name).read_selection == name


# -- round robin ----------------------------------------------------------------------------


def test_round_robin_rotates_the_start_on_every_call() -> None:
    a, b, c = fake("a", primary=True), fake("b"), fake("c")
    rr = RoundRobin()
    orders = [urls(rr.order([a, b, c])) for _ in range(7)]
    assert orders == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
    # Load does not matter to round robin.
    b.stats.in_flight = 50
    assert urls(rr.order([a, b, c])) == ["b", "c", "a"]


def test_round_robin_empty_and_single() -> None:
    rr = RoundRobin()
    assert rr.order([]) == []
    only = fake("only")
    for _ in range(3):
        assert rr.order([only]) == [only]


def test_round_robin_spreads_starts_evenly_across_threads() -> None:
    nodes = [fake(str(i)) for i in range(3)]
    rr = RoundRobin()
    firsts: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        local = [rr.order(nodes)[0].url for _ in range(300)]
        with lock:
            firsts.extend(local)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 1200 calls, each start exactly a third of the time: no lost or doubled counter steps.
    assert Counter(firsts) == {"0": 400, "1": 400, "2": 400}


# -- least outstanding ----------------------------------------------------------------------


def test_least_outstanding_orders_by_in_flight_ties_keep_topology_order() -> None:
    p = fake("p", primary=True, in_flight=3)
    r1 = fake("r1", in_flight=1)
    r2 = fake("r2", in_flight=0)
    r3 = fake("r3", in_flight=1)
    assert urls(LeastOutstanding().order([p, r1, r2, r3])) == ["r2", "r1", "r3", "p"]
    # All idle: the topology's order, primary first, every time (no rotation).
    idle = [fake("p", primary=True), fake("r1"), fake("r2")]
    for _ in range(3):
        assert urls(LeastOutstanding().order(idle)) == ["p", "r1", "r2"]
    # Latency is ignored.
    fast_busy = fake("fast", in_flight=2, ms=0.1)
    slow_idle = fake("slow", in_flight=0, ms=900.0)
    assert urls(LeastOutstanding().order([fast_busy, slow_idle])) == ["slow", "fast"]


# -- latency (C3) ---------------------------------------------------------------------------


def test_latency_scores_ewma_times_cube_of_one_plus_in_flight() -> None:
    a = fake("a", ms=10.0, in_flight=0)  # 10 * 1 = 10
    b = fake("b", ms=2.0, in_flight=1)  # 2 * 8 = 16
    c = fake("c", ms=1.0, in_flight=2)  # 1 * 27 = 27
    d = fake("d", ms=30.0, in_flight=0)  # 30
    assert urls(LatencyAware().order([d, c, b, a])) == ["a", "b", "c", "d"]
    # The cube makes a fast but busy node lose to a slower idle one.
    fast = fake("fast", ms=5.0, in_flight=3)  # 5 * 64 = 320
    slow = fake("slow", ms=150.0, in_flight=0)  # 150
    assert urls(LatencyAware().order([fast, slow])) == ["slow", "fast"]
    fast.stats.in_flight = 2  # 5 * 27 = 135 < 150
    assert urls(LatencyAware().order([fast, slow])) == ["fast", "slow"]


def test_latency_probes_an_unknown_node_first_only_while_it_is_idle() -> None:
    known_fast = fake("fast", ms=0.5)
    known_slow = fake("slow", ms=400.0, in_flight=4)
    new = fake("new")
    sel = LatencyAware()
    assert urls(sel.order([known_fast, known_slow, new])) == ["new", "fast", "slow"]
    # One probe at a time: once the unknown node has a request in flight, it goes last,
    # behind even a slow busy known node.
    new.stats.in_flight = 1
    assert urls(sel.order([known_fast, known_slow, new])) == ["fast", "slow", "new"]
    # Several unknown busy nodes: least in flight first among them.
    new2 = fake("new2", in_flight=3)
    new3 = fake("new3", in_flight=2)
    assert urls(sel.order([new2, known_fast, new, new3])) == ["fast", "new", "new3", "new2"]
    # Once measured, it competes on its score.
    new.stats.in_flight = 0
    new.stats.observe(0.0001)  # 0.1 ms
    assert urls(sel.order([known_fast, new])) == ["new", "fast"]


def test_latency_ewma_follows_observations() -> None:
    s = NodeStats()
    s.observe(0.010)
    assert s.latency_ewma_ms == pytest.approx(10.0)
    s.observe(0.110)
    assert s.latency_ewma_ms == pytest.approx(0.8 * 10 + 0.2 * 110)


# -- primary only ---------------------------------------------------------------------------


def test_primary_only_keeps_only_the_primary() -> None:
    p = fake("p", primary=True, in_flight=9, ms=1000.0)
    r = fake("r", ms=0.1)
    assert PrimaryOnly().order([r, p]) == [p]
    assert PrimaryOnly().order([r]) == []
    assert PrimaryOnly().order([]) == []


# -- properties -----------------------------------------------------------------------------

stats_st = st.builds(
    NodeStats,
    in_flight=st.integers(0, 20),
    latency_ewma_ms=st.none() | st.floats(0.0, 10_000.0, allow_nan=False),
)


@st.composite
def candidate_lists(draw: st.DrawFn) -> list[Fake]:
    n = draw(st.integers(0, 8))
    stats = draw(st.lists(stats_st, min_size=n, max_size=n))
    has_primary = draw(st.booleans())
    return [
        Fake(f"http://n{i}:8000", is_primary=has_primary and i == 0, stats=s)
        for i, s in enumerate(stats)
    ]


def _c3(n: Fake) -> tuple[int, float]:
    s = n.stats
    if s.latency_ewma_ms is None:
        return (0, 0.0) if s.in_flight == 0 else (2, float(s.in_flight))
    return (1, s.latency_ewma_ms * (1 + s.in_flight) ** 3)


@settings(max_examples=300, deadline=None)
@given(nodes=candidate_lists(), name=st.sampled_from(sorted(SELECTORS)), calls=st.integers(1, 5))
def test_every_selector_returns_a_permutation(nodes: list[Fake], name: str, calls: int) -> None:
    sel = make_selector(name)
    before = [(n.stats.in_flight, n.stats.latency_ewma_ms) for n in nodes]
    for call in range(calls):
        out = sel.order(nodes)
        assert all(isinstance(n, Fake) for n in out)
        if name == "primary_only":
            assert out == [n for n in nodes if n.is_primary]
            continue
        # Every node exactly once (by identity), nothing invented.
        assert sorted(map(id, out)) == sorted(map(id, nodes))
        assert len(out) == len(nodes)
        if name == "round_robin" and nodes:
            k = call % len(nodes)
            assert out == [*nodes[k:], *nodes[:k]]
        elif name == "least_outstanding":
            assert out == sorted(nodes, key=lambda n: n.stats.in_flight)
        elif name == "latency":
            scores = [_c3(n) for n in out]
            assert scores == sorted(scores)
    # Ordering is a pure read of the counters.
    assert before == [(n.stats.in_flight, n.stats.latency_ewma_ms) for n in nodes]
