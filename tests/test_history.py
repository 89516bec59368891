"""The per-id history checker on hand-made histories: what it must accept and what it must flag.

Times are small numbers; only their order matters to the checker."""

from __future__ import annotations

from typing import Any

import pytest

from tests._history import Op, Outcome, Value, check


def val(token: str, region: str = "eu", **extra: Any) -> Value:
    return Value({"w": token, "region": region, **extra}, token)


def write(
    kind: Any, rid: str, token: str | None, start: float, end: float, outcome: Outcome = "ok"
) -> Op:
    values = () if token is None else (val(token),)
    return Op(kind, (rid,), start, end, outcome, values)


def delete(rid: str, start: float, end: float, outcome: Outcome = "ok") -> Op:
    return Op("delete", (rid,), start, end, outcome)


def read(start: float, end: float, *seen: tuple[str, Value]) -> Op:
    return Op("get", (), start, end, seen=seen)


def test_serial_writes_the_last_one_wins() -> None:
    history = [write("add", "a", "a1", 0, 1), write("upsert", "a", "a2", 2, 3)]
    assert check(history, [("a", val("a2"))]) == []
    assert check(history, [("a", val("a2"))], {"s0": [], "s1": ["a"]}) == []


def test_a_lost_acknowledged_write_is_flagged() -> None:
    history = [write("add", "a", "a1", 0, 1), write("upsert", "a", "a2", 2, 3)]
    [problem] = check(history, [("a", val("a1"))])
    assert problem.startswith("a: expected a later value") and "upsert w=a2" in problem


def test_an_acknowledged_update_that_followed_is_not_lost_either() -> None:
    history = [write("upsert", "a", "a1", 0, 1), write("update", "a", "a2", 2, 3)]
    assert check(history, [("a", val("a2"))]) == []
    assert len(check(history, [("a", val("a1"))])) == 1


def test_a_resurrected_delete_is_flagged() -> None:
    history = [write("upsert", "a", "a1", 0, 1), delete("a", 2, 3)]
    assert check(history, []) == []
    [problem] = check(history, [("a", val("a1"))])
    assert "resurrected delete" in problem and "delete [2.0000, 3.0000] ok" in problem


def test_a_delete_overlapping_an_update_still_removes_the_record() -> None:
    # Delete first: the update found nothing to change. Update first: the delete removed it.
    # Either way the record is gone, since nothing created it again.
    history = [
        write("upsert", "a", "a1", 0, 1),
        delete("a", 2, 4),
        write("update", "a", "a2", 3, 5),
    ]
    assert check(history, []) == []
    [problem] = check(history, [("a", val("a2"))])
    assert "resurrected delete" in problem and "followed every add/upsert" in problem
    # An upsert overlapping the delete can create it again.
    assert check([*history, write("upsert", "a", "a3", 3, 5)], [("a", val("a3"))]) == []


def test_an_acknowledged_write_missing_at_the_end_is_flagged() -> None:
    history = [delete("a", 0, 1), write("upsert", "a", "a1", 2, 3)]
    [problem] = check(history, [])
    assert problem.startswith("a: expected present") and "found absent" in problem


def test_a_value_no_write_produced_is_flagged() -> None:
    history = [write("upsert", "a", "a1", 0, 1)]
    [problem] = check(history, [("a", val("zz"))])
    assert "expected a value some write produced" in problem
    # Neither is an id nobody wrote, nor a known token with content no write gave it.
    assert len(check(history, [("a", val("a1")), ("b", val("a1"))])) == 1
    [problem] = check(history, [("a", val("a1", region="us"))])
    assert "wrong: metadata 'region'" in problem
    [problem] = check(history, [("a", Value(val("a1").metadata, "other"))])
    assert "wrong: document" in problem


def test_overlapping_writes_either_one_may_win() -> None:
    history = [
        write("upsert", "a", "a0", 0, 1),
        write("upsert", "a", "a1", 2, 5),
        write("upsert", "a", "a2", 3, 4),
    ]
    assert check(history, [("a", val("a1"))]) == []
    assert check(history, [("a", val("a2"))]) == []
    assert len(check(history, [("a", val("a0"))])) == 1
    # A delete overlapping an upsert: either order.
    racing = [write("upsert", "a", "a0", 0, 1), delete("a", 2, 4), write("upsert", "a", "a1", 3, 5)]
    assert check(racing, []) == []
    assert check(racing, [("a", val("a1"))]) == []
    assert len(check(racing, [("a", val("a0"))])) == 1


def test_unknown_outcomes_may_or_may_not_have_applied() -> None:
    history = [write("upsert", "a", "a1", 0, 1), write("upsert", "a", "a2", 2, 3, "unknown")]
    assert check(history, [("a", val("a1"))]) == []
    assert check(history, [("a", val("a2"))]) == []
    unsure_delete = [write("upsert", "a", "a1", 0, 1), delete("a", 2, 3, "unknown")]
    assert check(unsure_delete, []) == []
    assert check(unsure_delete, [("a", val("a1"))]) == []
    unsure_only = [write("upsert", "a", "a1", 0, 1, "unknown")]
    assert check(unsure_only, []) == []


def test_failed_writes_never_applied() -> None:
    history = [write("upsert", "a", "a1", 0, 1), write("upsert", "a", "a2", 2, 3, "failed")]
    assert check(history, [("a", val("a1"))]) == []
    assert len(check(history, [("a", val("a2"))])) == 1
    assert len(check([delete("a", 2, 3, "failed"), *history[:1]], [])) == 1


def test_an_add_of_an_existing_id_is_a_no_op() -> None:
    history = [write("upsert", "a", "a1", 0, 1), write("add", "a", "a2", 2, 3)]
    assert check(history, [("a", val("a1"))]) == []
    [problem] = check(history, [("a", val("a2"))])
    assert "add w=a2" in problem and "to be a no-op" in problem
    # With a delete that may fall between them the add can have created the record again.
    maybe_gone = [*history, delete("a", 0.5, 2.5, "unknown")]
    assert check(maybe_gone, [("a", val("a2"))]) == []
    # Racing adds: either may have created it.
    racing = [write("add", "a", "a1", 0, 2), write("add", "a", "a2", 1, 3)]
    assert check(racing, [("a", val("a1"))]) == check(racing, [("a", val("a2"))]) == []


def test_an_update_of_a_missing_id_is_a_no_op() -> None:
    history = [write("update", "a", "a1", 0, 1)]
    assert check(history, []) == []
    [problem] = check(history, [("a", val("a1"))])
    assert "no-op on a missing id" in problem


def test_updates_merge_metadata_into_the_stored_record() -> None:
    upsert = write("upsert", "a", "a1", 0, 1)
    update = Op("update", ("a",), 2, 3, values=(Value({"w": "a2", "topic": 1}, "a2"),))
    merged = Value({"w": "a2", "region": "eu", "topic": 1}, "a2")
    assert check([upsert, update], [("a", merged)]) == []
    wrong = Value({"w": "a2", "region": "ap", "topic": 1}, "a2")
    assert "wrong: metadata 'region'" in check([upsert, update], [("a", wrong)])[0]
    # An update without a document keeps the stored one.
    no_doc = Op("update", ("a",), 2, 3, values=(Value({"w": "a2"}),))
    assert check([upsert, no_doc], [("a", Value({"w": "a2", "region": "eu"}, "a1"))]) == []


def test_a_duplicate_id_in_a_read_is_flagged() -> None:
    history = [write("upsert", "a", "a1", 0, 1), read(2, 3, ("a", val("a1")), ("a", val("a1")))]
    [problem] = check(history, [("a", val("a1"))])
    assert "returned ids twice: ['a']" in problem
    [problem] = check(history[:1], [("a", val("a1")), ("a", val("a1"))])
    assert "returned ids twice" in problem


def test_a_read_cannot_see_a_write_that_began_after_it() -> None:
    history = [write("upsert", "a", "a1", 0, 1), write("upsert", "a", "a2", 5, 6)]
    assert check([*history, read(2, 3, ("a", val("a1")))], [("a", val("a2"))]) == []
    [problem] = check([*history, read(2, 3, ("a", val("a2")))], [("a", val("a2"))])
    assert "read [2.0000, 3.0000] expected a value some earlier write produced" in problem


def test_a_stale_read_is_flagged() -> None:
    """A value replaced (or deleted) by an acknowledged write that ended before the read
    began is stale; one replaced by a write still running, failed or unknown is not."""
    history = [write("upsert", "a", "a1", 0, 1), write("upsert", "a", "a2", 2, 3)]
    final = [("a", val("a2"))]
    [problem] = check([*history, read(4, 5, ("a", val("a1")))], final)
    assert "returned" in problem and "upsert w=a2" in problem and "before it began" in problem
    assert check([*history, read(2.5, 5, ("a", val("a1")))], final) == []
    assert check([*history, read(4, 5, ("a", val("a2")))], final) == []
    overlapping = [write("upsert", "a", "a1", 0, 2), write("upsert", "a", "a2", 1, 3)]
    assert check([*overlapping, read(4, 5, ("a", val("a1")))], [("a", val("a1"))]) == []
    unsure = [history[0], write("update", "a", "a2", 2, 3, "unknown")]
    assert check([*unsure, read(4, 5, ("a", val("a1")))], [("a", val("a1"))]) == []
    gone = [history[0], delete("a", 2, 3)]
    [problem] = check([*gone, read(4, 5, ("a", val("a1")))], [])
    assert "delete" in problem and "before it began" in problem


def test_every_id_is_in_exactly_one_part() -> None:
    history = [write("upsert", "a", "a1", 0, 1), write("upsert", "b", "b1", 0, 1)]
    final = [("a", val("a1")), ("b", val("b1"))]
    assert check(history, final, {"s0": ["a"], "s1": ["b"]}) == []
    [problem] = check(history, final, {"s0": ["a", "b"], "s1": ["b"]})
    assert problem == "b: expected in one part, found in ['s0', 's1']"
    problems = check(history, final[:1], {"s0": ["a", "b"]})
    assert "b: held by ['s0'] but not returned by the final read" in problems
    assert any(p.startswith("b: expected present") for p in problems)
    [problem] = check(history, final, {"s0": ["a"]})
    assert problem == "b: returned by the final read but in no part"


def test_ops_are_validated() -> None:
    with pytest.raises(ValueError, match="ends before"):
        write("upsert", "a", "a1", 2, 1)
    with pytest.raises(ValueError, match="one value per id"):
        Op("upsert", ("a", "b"), 0, 1, values=(val("a1"),))
    with pytest.raises(ValueError, match="token"):
        Op("upsert", ("a",), 0, 1, values=(Value({"region": "eu"}),))


def test_batched_writes_are_split_per_id() -> None:
    history = [Op("upsert", ("a", "b"), 0, 1, values=(val("a1"), val("b1"))), delete("b", 2, 3)]
    assert check(history, [("a", val("a1"))]) == []
    assert len(check(history, [("a", val("a1")), ("b", val("b1"))])) == 1
