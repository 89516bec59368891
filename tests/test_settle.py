"""Settling an id met in two parts (pure): the newer copy is kept, the older one reported."""

from __future__ import annotations

from typing import Any

from sharded_chroma.ops._repair import Loser, settle_get, settle_query

V, S = "_sc_ver", "_sc_seq"


def meta(ver: int | None, seq: int, **user: Any) -> dict[str, Any]:
    out: dict[str, Any] = {S: seq, **user}
    if ver is not None:
        out[V] = ver
    return out


def test_get_keeps_the_newer_version_wherever_it_sorts() -> None:
    old = {
        "ids": ["a", "b"],
        "metadatas": [meta(5, 1, r="eu"), meta(9, 2)],
        "documents": ["a0", "b"],
    }
    new = {
        "ids": ["c", "a"],
        "metadatas": [meta(3, 3), meta(7, 4, r="us")],
        "documents": ["c", "a1"],
    }
    settled, losers = settle_get([old, new])
    assert settled[0]["ids"] == ["b"] and settled[0]["documents"] == ["b"]
    assert settled[1] is new  # untouched answers are passed through, not copied
    assert losers == [Loser(part=0, id="a", version=5, seq=1, newer=7)]


def test_get_without_duplicates_changes_nothing() -> None:
    one = {"ids": ["a"], "metadatas": [meta(1, 1)]}
    two = {"ids": ["b"], "metadatas": [meta(2, 2)]}
    settled, losers = settle_get([one, two])
    assert settled == [one, two] and losers == []


def test_unversioned_copies_fall_back_to_the_sequence_then_the_first_part() -> None:
    a = {"ids": ["x"], "metadatas": [meta(None, 10)]}
    b = {"ids": ["x"], "metadatas": [meta(None, 20)]}
    settled, losers = settle_get([a, b])
    assert settled[0]["ids"] == [] and settled[1]["ids"] == ["x"]
    assert losers == [Loser(0, "x", 0, 10)]
    same = {"ids": ["x"], "metadatas": [meta(None, 10)]}
    settled, losers = settle_get([a, same])
    assert settled[0]["ids"] == ["x"] and settled[1]["ids"] == []
    assert losers == [Loser(1, "x", 0, 10)]


def test_query_settles_each_query_row_list_on_its_own() -> None:
    p0 = {
        "ids": [["a", "b"], ["a"]],
        "distances": [[0.1, 0.2], [0.5]],
        "metadatas": [[meta(5, 1), meta(1, 2)], [meta(5, 1)]],
        "documents": [["old a", "b"], ["old a"]],
    }
    p1 = {
        "ids": [["a"], ["z"]],
        "distances": [[0.3], [0.1]],
        "metadatas": [[meta(8, 3)], [meta(2, 4)]],
        "documents": [["new a"], ["z"]],
    }
    settled, losers = settle_query([p0, p1])
    assert settled[0]["ids"] == [["b"], ["a"]]
    assert settled[0]["distances"] == [[0.2], [0.5]]
    assert settled[0]["documents"] == [["b"], ["old a"]]
    assert settled[1]["ids"] == [["a"], ["z"]]
    assert losers == [Loser(0, "a", 5, 1, newer=8)]
    assert p0["ids"] == [["a", "b"], ["a"]]  # inputs are not mutated
