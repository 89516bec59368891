"""Combine raw Chroma v2 REST responses from several shards into one response.

Everything here is pure and synchronous: it works on the decoded JSON bodies, so it can be tested
without servers and timed in isolation. Rows are never turned into per-row dicts: the hot path
merges small (key, shard, row) tuples and gathers the requested columns afterwards.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import count, repeat
from typing import Any

from .catalog._reserved import visible_metadata

__all__ = [
    "RECORD_COLUMNS",
    "merge_get",
    "merge_query",
    "order_key",
    "take_rows",
    "visible_metadatas",
]

RECORD_COLUMNS: tuple[str, ...] = ("embeddings", "metadatas", "documents", "uris")
"""The columns of a get() answer or a write body beside ``ids``, in wire order."""


def take_rows(columns: Mapping[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """The given rows of a get() answer or write body, in the given order; a column it left
    out stays None (and an answer's ``included`` is kept)."""
    out: dict[str, Any] = {"ids": [columns["ids"][r] for r in rows]}
    for name in RECORD_COLUMNS:
        column = columns.get(name)
        out[name] = None if column is None else [column[r] for r in rows]
    if "included" in columns:
        out["included"] = columns["included"]
    return out


# Columns a merged ``/query`` response carries besides ``ids``.
_QUERY_FIELDS: tuple[str, ...] = ("distances", "embeddings", "metadatas", "documents", "uris")

# A merge key that sorts every sequenced record before every unsequenced one; the leading tag
# keeps ints and the filler 0 in the same slot so comparisons never mix types.
_SEQUENCED = 0
_UNSEQUENCED = 1


def merge_query(
    responses: Sequence[Mapping[str, Any]], n_results: int, fields: Sequence[str]
) -> dict[str, Any]:
    """Merge per-shard ``/query`` responses into the exact global top ``n_results``.

    For each query the union of the shards' rows is ordered by ``(distance, id)``, a duplicate id
    keeps only its first (smallest) row, and the first ``n_results`` rows are kept. ``ids`` is
    always returned; every other column is a per-query list row-aligned with ``ids`` when named in
    ``fields`` and None otherwise. A requested column a shard did not return yields None cells
    for that shard's rows.

    Raises ValueError if the shards disagree on the number of queries, if a shard's ``ids`` and
    ``distances`` differ in shape, or if ``n_results`` is negative.
    """
    if n_results < 0:
        raise ValueError(f"n_results must be non-negative, got {n_results}")
    wanted = [f for f in _QUERY_FIELDS if f in fields]
    if len(responses) == 1:
        single = _single_query(responses[0], n_results, wanted)
        if single is not None:
            return single
    n_queries = _query_count(responses)
    id_cols = [r["ids"] for r in responses]
    dist_cols = [r["distances"] for r in responses]
    field_cols = {f: [r.get(f) for r in responses] for f in wanted}

    out_ids: list[list[str]] = []
    out_fields: dict[str, list[list[Any]]] = {f: [] for f in wanted}
    for q in range(n_queries):
        # Per shard, (distance, id, shard, row) tuples: comparing plain tuples is far cheaper
        # than comparing dicts, and shard/row make each tuple unique so comparison stops there.
        runs: list[Iterable[tuple[float, str, int, int]]] = []
        for s in range(len(responses)):
            ids_q = id_cols[s][q]
            dists_q = dist_cols[s][q]
            if len(ids_q) != len(dists_q):
                raise ValueError(
                    f"shard {s} query {q}: {len(ids_q)} ids but {len(dists_q)} distances"
                )
            run = zip(dists_q, ids_q, repeat(s), count())
            if all(map(operator.lt, dists_q, dists_q[1:])):
                # Strictly increasing distances are already in (distance, id) order, the usual
                # case; a lazy run only builds the tuples the merge actually pops.
                runs.append(run)
            else:
                # Ties (or an unsorted shard) need the id tie-break, so sort this run outright.
                runs.append(sorted(run))
        picked = _first_unique(heapq.merge(*runs), n_results)
        out_ids.append([row[1] for row in picked])
        for f in wanted:
            cells = [
                _cells(col, q, len(ids[q])) for col, ids in zip(field_cols[f], id_cols, strict=True)
            ]
            out_fields[f].append([cells[s][r] for _, _, s, r in picked])

    merged: dict[str, Any] = {"ids": out_ids}
    for f in _QUERY_FIELDS:
        merged[f] = out_fields.get(f)
    return merged


def _single_query(
    response: Mapping[str, Any], n_results: int, wanted: Sequence[str]
) -> dict[str, Any] | None:
    """One part's answer as the merge would give it, without the heap (the usual case of a
    collection on one shard, or a query pruned to one part); None when a query's distances
    are not strictly increasing (ties need the id order) or a shape is off."""
    ids = response["ids"]
    distances = response["distances"]
    if len(ids) != len(distances):
        return None
    for ids_q, dists_q in zip(ids, distances, strict=True):
        if len(ids_q) != len(dists_q) or not all(map(operator.lt, dists_q, dists_q[1:])):
            return None
    merged: dict[str, Any] = {"ids": [list(q[:n_results]) for q in ids]}
    for f in _QUERY_FIELDS:
        if f not in wanted:
            merged[f] = None
            continue
        column = response.get(f)
        merged[f] = [list(_cells(column, q, len(ids[q]))[:n_results]) for q in range(len(ids))]
    return merged


def _query_count(responses: Sequence[Mapping[str, Any]]) -> int:
    """The number of queries every shard answered; ValueError if they disagree."""
    counts = {len(r["ids"]) for r in responses}
    if len(counts) > 1:
        raise ValueError(f"shards answered different numbers of queries: {sorted(counts)}")
    return counts.pop() if counts else 0


def _first_unique(
    rows: Iterable[tuple[float, str, int, int]], n: int
) -> list[tuple[float, str, int, int]]:
    """The first ``n`` rows with distinct ids, in order."""
    picked: list[tuple[float, str, int, int]] = []
    if n == 0:
        return picked
    seen: set[str] = set()
    for row in rows:
        if row[1] in seen:
            continue
        seen.add(row[1])
        picked.append(row)
        if len(picked) == n:
            break
    return picked


def _cells(column: Any, q: int, rows: int) -> Sequence[Any]:
    """One query's cells of a column, or None cells when the shard left the column out."""
    per_query = None if column is None else column[q]
    return [None] * rows if per_query is None else per_query


def merge_get(
    responses: Sequence[Mapping[str, Any]],
    *,
    seq_key: str,
    offset: int = 0,
    limit: int | None = None,
    fields: Sequence[str],
) -> dict[str, Any]:
    """Merge per-shard ``/get`` responses into one page in global sequence order.

    The shards' streams are k-way merged as returned (never re-sorted), each step taking the
    stream head with the smallest ``(seq, id)``; equal keys go to the lower shard index. Records
    whose metadata lacks an integer ``seq_key`` sort after all sequenced ones, by id. Because
    only heads are compared, merging prefixes of length ``offset + limit`` yields the same first
    ``offset + limit`` items as merging the full streams, so shards need only return that much.
    Duplicate ids keep their first occurrence, then ``offset``/``limit`` apply; the prefix
    guarantee still holds because a prefix only runs dry after supplying ``offset + limit``
    distinct ids of its own (ids are unique within one shard).

    Returned metadata is as users wrote it (see :func:`visible_metadatas`). ``ids`` is always
    returned; each other column is a flat list when named in ``fields`` and None otherwise.
    Raises ValueError for a negative ``offset`` or ``limit``.
    """
    if offset < 0:
        raise ValueError(f"offset must be non-negative, got {offset}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    wanted = [f for f in RECORD_COLUMNS if f in fields]
    stop = None if limit is None else offset + limit

    picked: list[tuple[int, int]] = []
    if stop != 0:
        seen: set[str] = set()
        streams = [_get_stream(s, r, seq_key) for s, r in enumerate(responses)]
        # Plain tuples end in (shard, row), so heapq.merge's comparison gives equal keys to the
        # lower shard; within a stream only heads are compared, so its own order is kept.
        for _, _, rid, s, r in heapq.merge(*streams):
            if rid in seen:
                continue
            seen.add(rid)
            picked.append((s, r))
            if len(picked) == stop:
                break
    page = picked[offset:]

    merged: dict[str, Any] = {"ids": [responses[s]["ids"][r] for s, r in page]}
    for f in RECORD_COLUMNS:
        if f not in wanted:
            merged[f] = None
            continue
        cols: list[Any] = [resp.get(f) for resp in responses]
        values = [None if cols[s] is None else cols[s][r] for s, r in page]
        merged[f] = visible_metadatas(values) if f == "metadatas" else values
    return merged


def order_key(metadata: Mapping[str, Any] | None, record_id: str, seq_key: str) -> tuple[Any, ...]:
    """A record's place in the cluster's get() order: sequenced records by (seq, id), then
    records without a sequence (written outside the cluster) by id."""
    seq = None if metadata is None else metadata.get(seq_key)
    # bool is an int subclass but never a clock value; anything non-int is treated as a
    # record written outside the cluster rather than risking a mixed-type comparison.
    if isinstance(seq, int) and not isinstance(seq, bool):
        return (_SEQUENCED, seq, record_id)
    return (_UNSEQUENCED, 0, record_id)


def _get_stream(shard: int, response: Mapping[str, Any], seq_key: str) -> Iterator[tuple[Any, ...]]:
    """One shard's rows as merge keys ``(tag, seq, id, shard, row)``, in the shard's order."""
    ids = response["ids"]
    metadatas = response.get("metadatas")
    if metadatas is not None and len(metadatas) != len(ids):
        raise ValueError(f"shard {shard}: {len(ids)} ids but {len(metadatas)} metadatas")
    # Lazy, so a merge that stops early never builds keys for the tail of a long stream.
    for r, rid in enumerate(ids):
        yield (*order_key(None if metadatas is None else metadatas[r], rid, seq_key), shard, r)


def visible_metadatas(
    metadatas: Sequence[Mapping[str, Any] | None] | None,
) -> list[dict[str, Any] | None] | None:
    """Each stored metadata as its user wrote it (see ``visible_metadata``): hidden keys
    removed, escaped keys restored, an empty result as None. Inputs are never mutated; None
    passes through, both for the whole list and for single entries."""
    if metadatas is None:
        return None
    return [visible_metadata(md) for md in metadatas]
