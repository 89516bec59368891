"""HintLog: durable, bounded, ordered per-node queues of missed replica writes."""

from __future__ import annotations

import logging
import multiprocessing
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from sharded_chroma._errors import ClientClosedError, HintLogFullError
from sharded_chroma._hints import Hint, HintLog

A = "http://node-a:8000"
B = "http://node-b:8000"
C = "http://node-c:8000"
CID = "5f1c2d0e-0000-4000-8000-000000000001"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def put(log: HintLog, node: str, body: bytes = b"{}", op: str = "upsert") -> Hint:
    return log.append(node, "tenant", "db", CID, "docs", op, body)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "hints.sqlite"


@pytest.fixture
def log(path: Path) -> Iterator[HintLog]:
    with HintLog(path) as hint_log:
        yield hint_log


def test_round_trip_keeps_every_field(path: Path) -> None:
    clock = FakeClock(1234.5)
    body = b'{"ids":["x"],"documents":["\xc3\xa9t\xc3\xa9"]}\x00\xff'
    with HintLog(path, clock=clock) as log:
        hint = log.append(A, "acme", "prod", CID, "docs", "add", body)
        assert hint == Hint(hint.id, A, "acme", "prod", CID, "docs", "add", body, 1234.5)
        assert log.pending(A) == [hint]
        assert type(log.pending(A)[0].body) is bytes
    # User data stays out of reprs, which end up in logs and tracebacks.
    assert "documents" not in repr(hint)


def test_order_is_append_order_per_node_even_interleaved(log: HintLog) -> None:
    appended: dict[str, list[Hint]] = {A: [], B: [], C: []}
    for i, node in enumerate([A, B, A, C, B, A, A, C, B, A]):
        appended[node].append(put(log, node, f'{{"n":{i}}}'.encode()))
    ids = [h.id for hs in appended.values() for h in hs]
    assert len(set(ids)) == len(ids)
    for node, hints in appended.items():
        assert log.pending(node) == hints
        assert [h.id for h in hints] == sorted(h.id for h in hints)
    assert log.pending(A, limit=2) == appended[A][:2]
    assert log.pending("http://unknown:1") == []


def test_ack_deletes_a_range_of_one_node_only(log: HintLog) -> None:
    a = [put(log, A) for _ in range(5)]
    b = [put(log, B) for _ in range(3)]
    assert log.ack(A, a[2].id) == 3
    assert log.pending(A) == a[3:]
    assert log.pending(B) == b
    assert log.ack(A, a[2].id) == 0  # a repeated ack (replay retried) is harmless
    assert log.ack(A, 0) == 0
    assert log.ack(C, 10**9) == 0
    # upto_id beyond A's hints, past B's ids too: still only A's.
    assert log.ack(A, b[-1].id + 100) == 2
    assert log.pending(A) == []
    assert log.pending(B) == b


def test_count_and_nodes(log: HintLog) -> None:
    assert log.count() == 0
    assert log.nodes() == {}
    put(log, A)
    put(log, A)
    last_b = put(log, B)
    assert log.count() == 3
    assert log.count(A) == 2
    assert log.count(C) == 0
    assert log.nodes() == {A: 2, B: 1}
    log.ack(B, last_b.id)
    assert log.nodes() == {A: 2}
    assert log.count() == 2


def test_hints_survive_reopen_and_ids_keep_increasing(path: Path) -> None:
    with HintLog(path) as log:
        first = [put(log, A), put(log, B), put(log, A)]
    with HintLog(path) as log:
        assert log.pending(A) == [first[0], first[2]]
        assert log.nodes() == {A: 2, B: 1}
        later = put(log, A)
        assert later.id > max(h.id for h in first)
        # Acknowledge everything: ids must still not be reused (a replayer may hold old ids).
        log.ack(A, later.id)
        log.ack(B, later.id)
    with HintLog(path) as log:
        assert log.count() == 0
        assert put(log, B).id > later.id


def test_counters_are_loaded_at_open(path: Path) -> None:
    with HintLog(path) as log:
        put(log, A, b"x" * 10)
        put(log, B, b"x" * 10)
    with HintLog(path, max_hints=2) as log, pytest.raises(HintLogFullError):
        put(log, A)
    with HintLog(path, max_bytes=25) as log, pytest.raises(HintLogFullError):
        put(log, A, b"x" * 6)


def test_max_hints_raises_and_stores_nothing(path: Path) -> None:
    with HintLog(path, max_hints=3) as log:
        hints = [put(log, A), put(log, B), put(log, A)]
        with pytest.raises(HintLogFullError, match="max_hints") as info:
            put(log, C)
        assert info.value.node == C
        assert log.count() == 3
        assert log.nodes() == {A: 2, B: 1}
        log.ack(B, hints[1].id)
        put(log, C)  # room again after a replay drained some
        with pytest.raises(HintLogFullError):
            put(log, C)
    with HintLog(path) as log:
        assert log.count() == 3
        assert log.pending(C)[0].id > hints[-1].id


def test_max_bytes_raises_and_stores_nothing(path: Path) -> None:
    with HintLog(path, max_bytes=100) as log:
        put(log, A, b"a" * 60)
        with pytest.raises(HintLogFullError, match="max_bytes") as info:
            put(log, B, b"b" * 41)
        assert info.value.node == B
        assert log.nodes() == {A: 1}
        put(log, B, b"b" * 40)  # exactly at the bound is allowed
        with pytest.raises(HintLogFullError):
            put(log, C, b"c")
        log.drop_node(A)
        with pytest.raises(HintLogFullError, match="max_bytes"):
            put(log, C, b"c" * 101)  # bigger than the whole log can ever hold
        put(log, C, b"c" * 60)
        assert log.nodes() == {B: 1, C: 1}


def test_full_log_warns_once_and_never_logs_bodies(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = b'{"documents":["SECRET-PAYLOAD"]}'
    with HintLog(path, max_hints=1) as log:
        put(log, A, secret)
        with caplog.at_level(logging.DEBUG, logger="sharded_chroma.hints"):
            for _ in range(3):
                with pytest.raises(HintLogFullError) as info:
                    put(log, A, secret)
                assert "SECRET" not in str(info.value)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert all("SECRET" not in r.getMessage() for r in caplog.records)


def test_expire_drops_old_hints_per_node(path: Path) -> None:
    clock = FakeClock(0.0)
    with HintLog(path, max_age=100.0, clock=clock) as log:
        put(log, A)
        put(log, B)
        clock.now = 50.0
        kept_a = put(log, A)
        clock.now = 100.0
        assert log.expire() == {}  # exactly max_age old is not yet "older than"
        clock.now = 120.0
        assert log.expire() == {A: 1, B: 1}
        assert log.pending(A) == [kept_a]
        assert log.nodes() == {A: 1}
        assert log.expire() == {}
        clock.now = 151.0
        assert log.expire() == {A: 1}
        assert log.count() == 0


def test_drop_node_forgets_one_node(log: HintLog) -> None:
    b = [put(log, B) for _ in range(2)]
    for _ in range(3):
        put(log, A)
    assert log.drop_node(A) == 3
    assert log.drop_node(A) == 0
    assert log.pending(A) == []
    assert log.pending(B) == b
    assert log.nodes() == {B: 2}


def test_use_after_close_raises_client_closed(path: Path) -> None:
    log = HintLog(path)
    hint = put(log, A)
    log.close()
    log.close()  # idempotent
    calls: list[Callable[[], object]] = [
        lambda: put(log, A),
        lambda: log.pending(A),
        lambda: log.ack(A, hint.id),
        lambda: log.count(),
        lambda: log.count(A),
        lambda: log.nodes(),
        lambda: log.expire(),
        lambda: log.drop_node(A),
    ]
    for call in calls:
        with pytest.raises(ClientClosedError):
            call()
    with HintLog(path) as again:
        assert again.pending(A) == [hint]
    with pytest.raises(ClientClosedError):
        again.count()


@pytest.mark.parametrize(
    "kwargs",
    [{"max_hints": 0}, {"max_bytes": -1}, {"max_age": 0.0}, {"max_age": float("nan")}],
)
def test_constructor_rejects_bad_bounds(path: Path, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        HintLog(path, **kwargs)  # type: ignore[arg-type]


def test_bad_arguments_raise_value_error_and_store_nothing(log: HintLog) -> None:
    good = (A, "tenant", "db", CID, "docs", "upsert", b"{}")
    for i in range(5):
        args = list(good)
        args[i] = ""
        with pytest.raises(ValueError):
            log.append(*args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="op"):
        log.append(A, "tenant", "db", CID, "docs", "get", b"{}")
    with pytest.raises(ValueError, match="body"):
        log.append(A, "tenant", "db", CID, "docs", "add", "{}")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        log.pending(A, limit=0)
    with pytest.raises(ValueError):
        log.pending("")
    with pytest.raises(ValueError):
        log.ack(A, "3")  # type: ignore[arg-type]
    assert log.count() == 0


def test_file_is_durable_sqlite_in_wal_mode(log: HintLog, path: Path) -> None:
    put(log, A)
    other = sqlite3.connect(path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = other.execute("PRAGMA index_list(hints)").fetchall()
        columns = {
            tuple(r[2] for r in other.execute(f"PRAGMA index_info({ix[1]})")) for ix in indexes
        }
        assert ("node", "id") in columns
    finally:
        other.close()
    assert log._conn is not None
    assert log._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert path.stat().st_mode & 0o077 == 0


def test_concurrent_appends_from_eight_threads_lose_nothing(log: HintLog) -> None:
    per_thread = 20
    start = threading.Barrier(8)
    results: dict[int, list[Hint]] = {}
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            start.wait()
            node = [A, B][t % 2]
            results[t] = [
                put(log, node, f'{{"t":{t},"i":{i}}}'.encode()) for i in range(per_thread)
            ]
            log.pending(node)  # readers interleave with writers
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    ids = [h.id for hs in results.values() for h in hs]
    assert len(ids) == 8 * per_thread
    assert len(set(ids)) == len(ids)
    for hints in results.values():
        assert [h.id for h in hints] == sorted(h.id for h in hints)
    assert log.count() == 8 * per_thread
    stored = log.pending(A, limit=1000) + log.pending(B, limit=1000)
    assert sorted(h.id for h in stored) == sorted(ids)
    assert {h.body for h in stored} == {h.body for hs in results.values() for h in hs}


def test_two_logs_on_one_file_share_hints_and_bounds(path: Path) -> None:
    with HintLog(path, max_hints=3) as one, HintLog(path, max_hints=3) as two:
        first = put(one, A)
        assert two.count() == 1
        assert two.pending(A) == [first]
        second = put(two, A)
        assert second.id > first.id
        put(one, B)
        # two's in-memory counters must notice one's append, or it would store a fourth hint.
        with pytest.raises(HintLogFullError):
            put(two, C)
        assert two.ack(A, second.id) == 2
        assert one.nodes() == {B: 1}
        put(one, C)


def _append_in_child(path: str, node: str, n: int) -> None:
    with HintLog(Path(path)) as log:
        for i in range(n):
            put(log, node, f'{{"i":{i}}}'.encode())


def test_appends_from_several_processes_do_not_corrupt(path: Path) -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork (a spawned child would re-import chromadb, seconds each)")
    ctx = multiprocessing.get_context("fork")
    n = 25
    with HintLog(path) as log:
        children = [
            ctx.Process(target=_append_in_child, args=(str(path), node, n)) for node in (B, C)
        ]
        for child in children:
            child.start()
        mine = [put(log, A) for _ in range(n)]
        for child in children:
            child.join(timeout=60)
            assert child.exitcode == 0
        assert log.nodes() == {A: n, B: n, C: n}
        assert log.pending(A) == mine
        for node in (B, C):
            bodies = [h.body for h in log.pending(node)]
            assert bodies == [f'{{"i":{i}}}'.encode() for i in range(n)]
        ids = [h.id for node in (A, B, C) for h in log.pending(node)]
        assert len(set(ids)) == 3 * n
    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        check.close()


NODES = [A, B, C]


class HintLogModel(RuleBasedStateMachine):
    """Random appends, acks, drops, expiries and reopens against a list-per-node model."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "hints.sqlite"
        self.clock = FakeClock(0.0)
        self.max_age = 50.0
        self.log = self._open()
        self.model: dict[str, list[Hint]] = {n: [] for n in NODES}
        self.last_id = 0

    def _open(self) -> HintLog:
        return HintLog(self.path, max_age=self.max_age, clock=self.clock)

    @rule(
        node=st.sampled_from(NODES),
        op=st.sampled_from(["add", "upsert", "update", "delete"]),
        body=st.binary(max_size=40),
    )
    def append(self, node: str, op: str, body: bytes) -> None:
        hint = self.log.append(node, "t", "d", CID, "c", op, body)
        assert hint.id > self.last_id
        self.last_id = hint.id
        self.model[node].append(hint)

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data())
    def ack_prefix(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from([n for n in NODES if self.model[n]]))
        k = data.draw(st.integers(1, len(self.model[node])))
        # Any id from the prefix's last id up to (not including) the next hint's id.
        hints = self.model[node]
        hi = hints[k].id - 1 if k < len(hints) else hints[k - 1].id + 5
        upto = data.draw(st.integers(hints[k - 1].id, hi))
        assert self.log.ack(node, upto) == k
        del hints[:k]

    @rule(node=st.sampled_from(NODES), upto=st.integers(-3, 3))
    def ack_below_or_arbitrary(self, node: str, upto: int) -> None:
        expected = [h for h in self.model[node] if h.id <= upto]
        assert self.log.ack(node, upto) == len(expected)
        self.model[node] = [h for h in self.model[node] if h.id > upto]

    @rule(node=st.sampled_from(NODES))
    def drop_node(self, node: str) -> None:
        assert self.log.drop_node(node) == len(self.model[node])
        self.model[node] = []

    @rule(seconds=st.floats(0, 40))
    def advance_and_expire(self, seconds: float) -> None:
        self.clock.now += seconds
        cutoff = self.clock.now - self.max_age
        expected = {}
        for node, hints in self.model.items():
            old = [h for h in hints if h.created_at < cutoff]
            if old:
                expected[node] = len(old)
            self.model[node] = [h for h in hints if h.created_at >= cutoff]
        assert self.log.expire() == expected

    @rule()
    def reopen(self) -> None:
        self.log.close()
        self.log = self._open()

    @invariant()
    def matches_model(self) -> None:
        for node in NODES:
            assert self.log.pending(node, limit=1000) == self.model[node]
            assert self.log.count(node) == len(self.model[node])
        assert self.log.nodes() == {n: len(h) for n, h in self.model.items() if h}
        assert self.log.count() == sum(len(h) for h in self.model.values())

    def teardown(self) -> None:
        self.log.close()
        self.dir.cleanup()


HintLogModel.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_hint_log_matches_model = HintLogModel.TestCase
