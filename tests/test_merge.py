"""Properties of the pure response mergers, checked against brute-force oracles (no servers)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharded_chroma._merge import merge_get, merge_query, visible_metadatas

SEQ = "_sc_seq"
QUERY_FIELDS = ("distances", "embeddings", "metadatas", "documents", "uris")
GET_FIELDS = ("embeddings", "metadatas", "documents", "uris")

# Few ids and few distances, so duplicates across shards and (distance, id) ties are common.
ids_st = st.sampled_from([f"r{i:02d}" for i in range(12)])
dist_st = st.sampled_from([0.0, 0.25, 0.5, 1.0])
fields_st = st.sets(st.sampled_from(QUERY_FIELDS)).map(sorted)
get_fields_st = st.sets(st.sampled_from(GET_FIELDS)).map(sorted)

relaxed = settings(deadline=None)


# ---------------------------------------------------------------------------------------------
# merge_query


def query_response(per_query: list[list[tuple[str, float]]]) -> dict[str, Any]:
    """A shard's raw /query body; payloads depend only on (id, distance) so ties are harmless."""
    return {
        "ids": [[rid for rid, _ in rows] for rows in per_query],
        "distances": [[d for _, d in rows] for rows in per_query],
        "embeddings": [[[d, float(len(rid))] for rid, d in rows] for rows in per_query],
        "metadatas": [[{"id": rid, "d": d} for rid, d in rows] for rows in per_query],
        "documents": [[f"doc-{rid}" for rid, _ in rows] for rows in per_query],
        "uris": [[f"uri://{rid}" for rid, _ in rows] for rows in per_query],
        "included": ["distances", "embeddings", "metadatas", "documents", "uris"],
    }


def brute_top_k(per_shard: list[list[tuple[str, float]]], k: int) -> list[tuple[str, float]]:
    """Top k of the union by (distance, id), first occurrence of each id kept."""
    union = sorted((d, rid) for rows in per_shard for rid, d in rows)
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for d, rid in union:
        if rid not in seen:
            seen.add(rid)
            out.append((rid, d))
    return out[:k]


@st.composite
def shard_rows(draw: st.DrawFn) -> list[tuple[str, float]]:
    """One shard's rows for one query: distinct ids, sorted by distance with ties in any order,
    or (sometimes) in no order at all."""
    rows = list(draw(st.dictionaries(ids_st, dist_st, max_size=8)).items())
    rows = draw(st.permutations(rows))
    if draw(st.booleans()):
        rows.sort(key=lambda row: row[1])  # stable: ties stay in the drawn (random) order
    return rows


@st.composite
def query_case(draw: st.DrawFn) -> tuple[list[list[list[tuple[str, float]]]], int]:
    """Rows indexed [shard][query] and the number of queries."""
    n_shards = draw(st.integers(1, 5))
    n_queries = draw(st.integers(1, 3))
    shards = [[draw(shard_rows()) for _ in range(n_queries)] for _ in range(n_shards)]
    return shards, n_queries


@relaxed
@given(case=query_case(), n_results=st.integers(0, 30), fields=fields_st)
def test_merge_query_matches_brute_force(
    case: tuple[list[list[list[tuple[str, float]]]], int], n_results: int, fields: list[str]
) -> None:
    shards, n_queries = case
    responses = [query_response(rows) for rows in shards]
    before = copy.deepcopy(responses)
    merged = merge_query(responses, n_results, fields)

    assert responses == before
    assert set(merged) == {"ids", *QUERY_FIELDS}
    assert len(merged["ids"]) == n_queries
    for q in range(n_queries):
        expected = brute_top_k([shard[q] for shard in shards], n_results)
        assert merged["ids"][q] == [rid for rid, _ in expected]
        columns = {
            "distances": [d for _, d in expected],
            "embeddings": [[d, float(len(rid))] for rid, d in expected],
            "metadatas": [{"id": rid, "d": d} for rid, d in expected],
            "documents": [f"doc-{rid}" for rid, _ in expected],
            "uris": [f"uri://{rid}" for rid, _ in expected],
        }
        for f in QUERY_FIELDS:
            if f in fields:
                assert merged[f][q] == columns[f], f
    for f in QUERY_FIELDS:
        if f not in fields:
            assert merged[f] is None, f


def test_merge_query_ties_broken_by_id_not_shard_order() -> None:
    a = query_response([[("z", 0.5), ("b", 0.5)]])
    b = query_response([[("y", 0.5), ("a", 0.5)]])
    merged = merge_query([a, b], 3, ["distances", "documents"])
    assert merged["ids"] == [["a", "b", "y"]]
    assert merged["distances"] == [[0.5, 0.5, 0.5]]
    assert merged["documents"] == [["doc-a", "doc-b", "doc-y"]]


def test_merge_query_duplicate_keeps_smallest_distance() -> None:
    a = query_response([[("x", 0.1), ("dup", 0.9)]])
    b = query_response([[("dup", 0.2), ("w", 0.3)]])
    merged = merge_query([a, b], 10, ["distances", "metadatas"])
    assert merged["ids"] == [["x", "dup", "w"]]
    assert merged["distances"] == [[0.1, 0.2, 0.3]]
    assert merged["metadatas"] == [
        [{"id": "x", "d": 0.1}, {"id": "dup", "d": 0.2}, {"id": "w", "d": 0.3}]
    ]


def test_merge_query_some_shards_empty_for_some_queries() -> None:
    a = query_response([[], [("p", 0.4)]])
    b = query_response([[("q", 0.3)], []])
    c = query_response([[], []])
    merged = merge_query([a, b, c], 5, ["documents"])
    assert merged["ids"] == [["q"], ["p"]]
    assert merged["documents"] == [["doc-q"], ["doc-p"]]
    assert merged["distances"] is None


def test_merge_query_missing_column_on_a_shard_gives_none_cells() -> None:
    a = query_response([[("a", 0.1), ("c", 0.3)]])
    b = query_response([[("b", 0.2)]])
    b["documents"] = None
    del b["uris"]
    merged = merge_query([a, b], 3, ["documents", "uris"])
    assert merged["ids"] == [["a", "b", "c"]]
    assert merged["documents"] == [["doc-a", None, "doc-c"]]
    assert merged["uris"] == [["uri://a", None, "uri://c"]]


def test_merge_query_no_shards() -> None:
    merged = merge_query([], 5, ["documents"])
    assert merged["ids"] == []
    assert merged["documents"] == []
    assert merged["distances"] is None


def test_merge_query_rejects_mismatched_query_counts() -> None:
    a = query_response([[("a", 0.1)]])
    b = query_response([[("b", 0.2)], [("c", 0.3)]])
    with pytest.raises(ValueError, match="numbers of queries"):
        merge_query([a, b], 3, [])


def test_merge_query_rejects_ragged_shard() -> None:
    a = query_response([[("a", 0.1), ("b", 0.2)]])
    a["distances"] = [[0.1]]
    with pytest.raises(ValueError, match="distances"):
        merge_query([a], 3, [])


# ---------------------------------------------------------------------------------------------
# merge_get

# A record as a shard stores it: (id, seq or None when written outside the cluster, user meta).
Record = tuple[str, "int | None", dict[str, Any]]

seq_st = st.one_of(st.none(), st.integers(0, 6))  # small range: equal seqs across ids are common
user_meta_st = st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2)


def get_response(records: list[Record]) -> dict[str, Any]:
    """A shard's raw /get body, in the given order."""
    metadatas: list[dict[str, Any] | None] = []
    for _, seq, meta in records:
        md = dict(meta)
        if seq is not None:
            md[SEQ] = seq
        metadatas.append(md or None)
    return {
        "ids": [rid for rid, _, _ in records],
        "metadatas": metadatas,
        "embeddings": [[float(seq or 0), 1.0] for _, seq, _ in records],
        "documents": [f"doc-{rid}-{seq}" for rid, seq, _ in records],
        "uris": None,
        "include": ["metadatas", "embeddings", "documents"],
    }


def order_key(record: Record) -> tuple[int, int, str]:
    rid, seq, _ = record
    return (1, 0, rid) if seq is None else (0, seq, rid)


def expected_page(records: list[Record]) -> dict[str, Any]:
    """What merge_get should return for these records in this (already merged) order."""
    return {
        "ids": [rid for rid, _, _ in records],
        "embeddings": [[float(seq or 0), 1.0] for _, seq, _ in records],
        "metadatas": [dict(meta) or None for _, _, meta in records],
        "documents": [f"doc-{rid}-{seq}" for rid, seq, _ in records],
        "uris": [None for _ in records],
    }


def reference_heads_merge(streams: list[list[Record]]) -> list[Record]:
    """Naive heads-merge: take the smallest head, lowest shard on equal keys; drop seen ids."""
    heads = [0] * len(streams)
    out: list[Record] = []
    seen: set[str] = set()
    while True:
        live = [s for s in range(len(streams)) if heads[s] < len(streams[s])]
        if not live:
            return out
        s = min(live, key=lambda s: (order_key(streams[s][heads[s]]), s))
        record = streams[s][heads[s]]
        heads[s] += 1
        if record[0] not in seen:
            seen.add(record[0])
            out.append(record)


def sliced(merged: dict[str, Any], start: int, stop: int | None) -> dict[str, Any]:
    return {k: None if v is None else v[start:stop] for k, v in merged.items()}


@st.composite
def unique_streams(draw: st.DrawFn) -> list[list[Record]]:
    """Shards' streams in arbitrary order, every id on exactly one shard."""
    ids = draw(st.lists(ids_st, unique=True, max_size=12))
    n_shards = draw(st.integers(1, 4))
    streams: list[list[Record]] = [[] for _ in range(n_shards)]
    for rid in ids:
        shard = draw(st.integers(0, n_shards - 1))
        streams[shard].append((rid, draw(seq_st), draw(user_meta_st)))
    return [draw(st.permutations(stream)) for stream in streams]


@st.composite
def dup_streams(draw: st.DrawFn) -> list[list[Record]]:
    """Streams in arbitrary order where an id may sit on several shards with different data."""
    n_shards = draw(st.integers(1, 4))
    streams = []
    for _ in range(n_shards):
        ids = draw(st.lists(ids_st, unique=True, max_size=6))
        streams.append([(rid, draw(seq_st), draw(user_meta_st)) for rid in ids])
    return streams


@relaxed
@given(streams=unique_streams(), fields=get_fields_st)
def test_merge_get_sorted_streams_give_global_sort(
    streams: list[list[Record]], fields: list[str]
) -> None:
    streams = [sorted(stream, key=order_key) for stream in streams]
    merged = merge_get([get_response(s) for s in streams], seq_key=SEQ, fields=fields)
    expected = expected_page(sorted((r for s in streams for r in s), key=order_key))
    assert merged["ids"] == expected["ids"]
    for f in GET_FIELDS:
        assert merged[f] == (expected[f] if f in fields else None), f


@relaxed
@given(streams=st.one_of(unique_streams(), dup_streams()))
def test_merge_get_prefixes_give_the_same_page(streams: list[list[Record]]) -> None:
    """The key property: shards need only return offset+limit rows, in any stored order.

    It survives duplicates across shards: merging prefixes only diverges once some shard's
    prefix runs dry, and by then that shard alone has supplied offset+limit distinct ids.
    """
    responses = [get_response(s) for s in streams]
    full = merge_get(responses, seq_key=SEQ, fields=GET_FIELDS)
    total = len(full["ids"])
    assert total == len({r[0] for s in streams for r in s})
    for offset in range(total + 2):
        assert merge_get(responses, seq_key=SEQ, offset=offset, fields=GET_FIELDS) == sliced(
            full, offset, None
        )
        for limit in range(total + 2 - offset):
            prefixes = [get_response(s[: offset + limit]) for s in streams]
            page = merge_get(prefixes, seq_key=SEQ, offset=offset, limit=limit, fields=GET_FIELDS)
            assert page == sliced(full, offset, offset + limit), (offset, limit)


@relaxed
@given(streams=dup_streams(), fields=get_fields_st)
def test_merge_get_matches_reference_heads_merge(
    streams: list[list[Record]], fields: list[str]
) -> None:
    responses = [get_response(s) for s in streams]
    before = copy.deepcopy(responses)
    merged = merge_get(responses, seq_key=SEQ, fields=fields)
    assert responses == before
    expected = expected_page(reference_heads_merge(streams))
    assert merged["ids"] == expected["ids"]
    assert len(set(merged["ids"])) == len(merged["ids"])
    for f in GET_FIELDS:
        assert merged[f] == (expected[f] if f in fields else None), f


def test_merge_get_is_a_heads_merge_not_a_sort() -> None:
    # Shard 0 stores seq 9 before seq 1: the head (9) loses to shard 1's head (5) first, and
    # seq 1 only surfaces once 9 has been taken.
    s0 = get_response([("a", 9, {}), ("b", 1, {})])
    s1 = get_response([("c", 5, {}), ("d", 10, {})])
    merged = merge_get([s0, s1], seq_key=SEQ, fields=["documents"])
    assert merged["ids"] == ["c", "a", "b", "d"]
    assert merged["documents"] == ["doc-c-5", "doc-a-9", "doc-b-1", "doc-d-10"]


def test_merge_get_unsequenced_records_sort_last_by_id() -> None:
    s0 = get_response([("k", 7, {}), ("m", None, {"a": 1})])
    s1 = get_response([("z", 100, {"b": 2}), ("b", None, {})])
    merged = merge_get([s0, s1], seq_key=SEQ, fields=["metadatas"])
    assert merged["ids"] == ["k", "z", "b", "m"]
    assert merged["metadatas"] == [None, {"b": 2}, None, {"a": 1}]


def test_merge_get_non_integer_seq_counts_as_unsequenced() -> None:
    s0 = {"ids": ["x", "y"], "metadatas": [{SEQ: "3"}, {SEQ: True}]}
    s1 = {"ids": ["w"], "metadatas": [{SEQ: 50}]}
    merged = merge_get([s0, s1], seq_key=SEQ, fields=["metadatas"])
    assert merged["ids"] == ["w", "x", "y"]
    assert merged["metadatas"] == [None, None, None]


def test_merge_get_duplicates_keep_first_in_merged_order() -> None:
    s0 = get_response([("dup", 5, {"v": "old"}), ("a", 6, {})])
    s1 = get_response([("dup", 3, {"v": "new"}), ("b", 4, {})])
    merged = merge_get([s0, s1], seq_key=SEQ, fields=["metadatas", "documents"])
    assert merged["ids"] == ["dup", "b", "a"]
    assert merged["metadatas"] == [{"v": "new"}, None, None]
    assert merged["documents"] == ["doc-dup-3", "doc-b-4", "doc-a-6"]


def test_merge_get_equal_keys_go_to_lower_shard() -> None:
    s0 = get_response([("same", 2, {"from": 0})])
    s1 = get_response([("same", 2, {"from": 1})])
    merged = merge_get([s0, s1], seq_key=SEQ, fields=["metadatas"])
    assert merged["ids"] == ["same"]
    assert merged["metadatas"] == [{"from": 0}]
    swapped = merge_get([s1, s0], seq_key=SEQ, fields=["metadatas"])
    assert swapped["metadatas"] == [{"from": 1}]


def test_merge_get_strips_seq_without_mutating_inputs() -> None:
    md_user = {"color": "red", SEQ: 1}
    md_bare = {SEQ: 2}
    response = {
        "ids": ["a", "b", "c"],
        "metadatas": [md_user, md_bare, None],
        "documents": ["da", "db", "dc"],
    }
    merged = merge_get([response], seq_key=SEQ, fields=["metadatas", "documents", "uris"])
    assert merged["ids"] == ["a", "b", "c"]
    assert merged["metadatas"] == [{"color": "red"}, None, None]
    assert merged["documents"] == ["da", "db", "dc"]
    assert merged["uris"] == [None, None, None]
    assert merged["embeddings"] is None
    assert md_user == {"color": "red", SEQ: 1}
    assert md_bare == {SEQ: 2}
    assert response["metadatas"] == [md_user, md_bare, None]


def test_merge_get_offset_limit_edges() -> None:
    s0 = get_response([("a", 1, {}), ("c", 3, {})])
    s1 = get_response([("b", 2, {})])
    assert merge_get([s0, s1], seq_key=SEQ, limit=0, fields=[])["ids"] == []
    assert merge_get([s0, s1], seq_key=SEQ, offset=1, limit=1, fields=[])["ids"] == ["b"]
    assert merge_get([s0, s1], seq_key=SEQ, offset=5, fields=[])["ids"] == []
    assert merge_get([], seq_key=SEQ, fields=["documents"]) == {
        "ids": [],
        "embeddings": None,
        "metadatas": None,
        "documents": [],
        "uris": None,
    }
    with pytest.raises(ValueError):
        merge_get([s0], seq_key=SEQ, offset=-1, fields=[])
    with pytest.raises(ValueError):
        merge_get([s0], seq_key=SEQ, limit=-1, fields=[])


# ---------------------------------------------------------------------------------------------
# visible metadata


def test_visible_metadatas() -> None:
    keep = {"k": 1}
    escaped = {"k": 2, "_sc_~_sc_own": "mine", "_sc_esc": 1, SEQ: 6, "_sc_ver": 7}
    source: list[Any] = [{"k": 1, SEQ: 4, "_sc_ver": 9}, {SEQ: 5}, None, keep, {}, escaped]
    before = copy.deepcopy(source)
    expected = [{"k": 1}, None, None, {"k": 1}, None, {"k": 2, "_sc_own": "mine"}]
    assert visible_metadatas(source) == expected
    assert source == before
    assert visible_metadatas(None) is None
    assert visible_metadatas([]) == []
