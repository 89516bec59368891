"""Where a write is also sent while a move fills a new generation of physical collections
(pure): a rebuild (one policy) sends it whole to the same shard; a move to another policy
routing by the same metadata fields sends each record to its place under that policy.

Only records whose new place is known are placed: a whole record (add, upsert) by the other
policy, any request by ids under hash of the id. The rest (an update of some keys, a delete)
goes to every shard of the other policy: it changes nothing where the record is not (Chroma
1.5.9 ignores an update or delete of an id it does not hold, measured).

Writes that make or move records are mirrored from the records as written instead
(``READ_BACK``, see ``PartIO``): the served policy's write path decides by its own placement,
and its requests replayed under the other would go wrong where the two disagree. A record it
moves between its parts may stay in one part of the other policy (the move's ``add`` of the
new copy would be a no-op over the old copy, which the move's delete then removes); an update
or upsert that keeps a record in its part may move it under the other (the old copy would
stay behind); an ``add`` that was a no-op at the served part would create or overwrite the
record in the other generation. A record read back is what a reader of the served policy
sees, so mirroring it cannot be wrong in those ways. Under hash of the id both policies agree
on every record's place from its id alone, and requests are split by it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._merge import RECORD_COLUMNS, take_rows
from .._policies import CompositePolicy, FieldPolicy, HashPolicy, TimePolicy, policy_to_json
from ..catalog._reserved import visible_metadata

__all__ = ["READ_BACK", "generation_split", "placeable", "routed_by", "split_by"]

_COLUMNS = ("ids", *RECORD_COLUMNS)


def routed_by(policy: Any) -> frozenset[str] | None:
    """The metadata fields a policy places records by (besides the id); None for time
    buckets, which a generation move does not handle."""
    if isinstance(policy, TimePolicy):
        return None
    if isinstance(policy, CompositePolicy) and policy.hash_key is not None:
        return frozenset((policy.field, policy.hash_key))
    if isinstance(policy, FieldPolicy):
        return frozenset((policy.field,))
    if isinstance(policy, HashPolicy):
        return frozenset(() if policy.field is None else (policy.field,))
    return None


def _rows(body: Mapping[str, Any], positions: list[int]) -> dict[str, Any]:
    return {**{k: v for k, v in body.items() if k not in _COLUMNS}, **take_rows(body, positions)}


READ_BACK = "read back"
"""The op ``generation_split`` gives an update to mirror from the records as written."""


def generation_split(
    op: str, shard: str, body: Mapping[str, Any], policy: Any, other: Any
) -> tuple[str, dict[str, dict[str, Any]]]:
    """The op and the requests (by shard of ``other``) mirroring a write of ``op`` sent to
    ``shard``'s part under ``policy`` (``READ_BACK``: none yet). Raises ``RoutingError`` for
    a record ``other`` cannot place, before anything is written."""
    if policy_to_json(policy) == policy_to_json(other):
        return op, {shard: dict(body)}
    ids = body.get("ids")
    everywhere = {s: dict(body) for s in sorted(other.shards_named())}
    if not ids:
        return op, everywhere
    if isinstance(other, HashPolicy) and other.field is None:
        homes = [p.shard for p in other.place_all(list(ids), None)]
        return op, split_by(body, homes)
    if op in ("add", "upsert"):
        # Placed now only to refuse a record the other policy cannot place, before anything
        # is written; where each goes is decided from the records as written.
        metas = body.get("metadatas") or [None] * len(ids)
        for record_id, meta in zip(ids, metas, strict=True):
            other.place(record_id, visible_metadata(meta))
        return READ_BACK, {}
    if op == "update" and _touches(body.get("metadatas"), routed_by(other) or frozenset()):
        return READ_BACK, {}
    return op, everywhere


def split_by(body: Mapping[str, Any], homes: list[str]) -> dict[str, dict[str, Any]]:
    """``body``'s records grouped by the shard in ``homes`` for each."""
    groups: dict[str, list[int]] = {}
    for n, home in enumerate(homes):
        groups.setdefault(home, []).append(n)
    if len(groups) == 1:
        return {next(iter(groups)): dict(body)}
    return {home: _rows(body, positions) for home, positions in sorted(groups.items())}


def _touches(metadatas: Any, fields: frozenset[str]) -> bool:
    return bool(fields) and any(fields & set((m or {}).keys()) for m in metadatas or ())


def placeable(policy: Any, other: Any) -> str | None:
    """Why a move from ``policy`` to ``other`` cannot go through a new generation (None: it
    can)."""
    mine, theirs = routed_by(policy), routed_by(other)
    if mine is None or theirs is None:
        return "time buckets move bucket by bucket, not into a new generation"
    if mine != theirs:
        return (
            f"the goal routes by {sorted(theirs) or ['the id']}, the collection by "
            f"{sorted(mine) or ['the id']}; an online move keeps the routing fields"
        )
    return None
