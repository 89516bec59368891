"""What a migration changes about one request to a part (pure): the filter reads add, and the
copies a write also sends to the places the other policy gives its records.

See ``control._maps`` for the phases. Two kinds of move are mirrored, both where a record's
other place never is the collection that holds its own copy:

- hash of the record id: a record's two places follow from its id alone;
- time buckets: a bucket is its own physical collection, so a write to a bucket goes whole to
  the same bucket on the shard the other policy gives it.

Under a policy that routes by other metadata, a record that changes its routing value can need
its own and an incoming copy in one collection (see the design notes); the migrator refuses
those policies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._merge import RECORD_COLUMNS, take_rows
from .._policies import HashPolicy, TimePolicy
from ..control._maps import INCOMING_KEY, OUTGOING_KEY, PartitionMap

__all__ = ["filtered", "mirrorable", "split_write"]

_COLUMNS = ("ids", *RECORD_COLUMNS)


def mirrorable(policy: Any) -> bool:
    """Whether writes can be mirrored under ``policy``: hash of the record id, or time."""
    return (isinstance(policy, HashPolicy) and policy.field is None) or isinstance(
        policy, TimePolicy
    )


def filtered(body: Mapping[str, Any], served: PartitionMap) -> dict[str, Any]:
    """``body`` with the phase's read filter joined to its own ``where``."""
    extra = served.read_filter()
    out = dict(body)
    if extra is None:
        return out
    where = out.get("where")
    out["where"] = extra if not where else {"$and": [where, extra]}
    return out


def _marked(metas: Any, positions: Sequence[int] | None, key: str, tag: str) -> Any:
    if metas is None:
        return None
    rows = range(len(metas)) if positions is None else positions
    return [{**(metas[i] or {}), key: tag} for i in rows]


def _homes(policy: HashPolicy, body: Mapping[str, Any]) -> list[str]:
    """The other policy's shard of every record of a request."""
    return [p.shard for p in policy.place_all(list(body["ids"]), None)]


def split_write(
    op: str,
    shard: str,
    body: Mapping[str, Any],
    served: PartitionMap,
    bucket: str | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """For a write of ``op`` to ``shard`` while writes are mirrored (``dual``, ``cutover``):
    the request for ``shard`` itself and one request per other shard that the other policy
    gives some of its records, each with the phase's marks (``PartitionMap.marks``).

    A delete by filter alone names no records: the write path sends it to the other policy's
    shards itself. An update without metadata leaves the marks as they are."""
    nxt = served.mirror_policy()
    tag = served.tag
    if nxt is None or tag is None:
        return dict(body), {}
    if isinstance(nxt, TimePolicy):
        return _split_bucket(op, shard, body, nxt, bucket, served)
    if not body.get("ids"):
        return dict(body), {}
    if not mirrorable(nxt):
        raise NotImplementedError(f"mirroring writes under a {nxt.kind} policy")
    homes = _homes(nxt, body)
    moving: dict[str, list[int]] = {}
    for i, home in enumerate(homes):
        if home != shard:
            moving.setdefault(home, []).append(i)
    if not moving:
        return dict(body), {}
    own_mark, mirror_mark = served.marks()
    own = dict(body)
    if op != "delete":
        away = sorted(i for rows in moving.values() for i in rows)
        metas = list(body["metadatas"]) if body.get("metadatas") is not None else None
        if metas is not None:
            for i, meta in zip(away, _marked(metas, away, own_mark, tag), strict=True):
                metas[i] = meta
            own["metadatas"] = metas
    mirrors = {}
    for home, rows in moving.items():
        part = {**{k: v for k, v in body.items() if k not in _COLUMNS}, **take_rows(body, rows)}
        if op != "delete":
            part["metadatas"] = _marked(part["metadatas"], None, mirror_mark, tag)
        mirrors[home] = part
    return own, mirrors


def _split_bucket(
    op: str,
    shard: str,
    body: Mapping[str, Any],
    nxt: TimePolicy,
    bucket: str | None,
    served: PartitionMap,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A write to one time bucket: all of it (a delete by filter too) also goes to the same
    bucket where the other policy puts it, if that is another shard."""
    if bucket is None:
        return dict(body), {}  # not a bucket (the delete marks)
    home = nxt.shard_of(bucket)
    if home == shard:
        return dict(body), {}
    own_mark, mirror_mark = served.marks()
    own, mirror = dict(body), dict(body)
    if op != "delete" and body.get("metadatas") is not None:
        assert served.tag is not None
        own["metadatas"] = _marked(body["metadatas"], None, own_mark, served.tag)
        mirror["metadatas"] = _marked(body["metadatas"], None, mirror_mark, served.tag)
    return own, {home: mirror}


def strip_marks(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A stored metadata without the migration marks (what a copy is compared by)."""
    if metadata is None:
        return None
    return {k: v for k, v in metadata.items() if k != INCOMING_KEY and k != OUTGOING_KEY}
