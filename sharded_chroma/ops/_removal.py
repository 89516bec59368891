"""Removing copies of records only while they are still the copies a caller read.

Another process may move, rewrite or delete a record between the moment this one located it
and the moment it deletes it. A delete sent as ``ids + where <stamp of the copy read>`` removes
the copy only if it is still that one, and Chroma's answer to such a filtered delete counts
exactly what it removed (an unfiltered delete counts the ids asked for), so a caller learns
when its premise no longer held: the mover then undoes its half of a move, a user's delete
looks again (see ``WritePath``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from chromadb.api.types import Where, WhereDocument

from .._fanout import fan_out, raise_for_failures
from ..catalog._layouts import Target
from ._locator import Stamp, stamp_where
from ._partio import PartIO, Removal

__all__ = ["Remover"]


def _both(user: Where | None, stamp: dict[str, Any] | None) -> Any:
    if stamp is None:
        return user
    if not user:
        return stamp
    return {"$and": [user, stamp]}


class Remover:
    """Stamp-conditional deletes, grouped per part and stamp (one request per group)."""

    def __init__(self, io: PartIO) -> None:
        self._io = io

    async def remove(
        self,
        targets: Mapping[str, Target],
        stamps: Mapping[tuple[str, str], Stamp | None],
        *,
        where: Where | None = None,
        where_document: WhereDocument | None = None,
        per_id: bool = False,
        operation: str = "delete",
    ) -> tuple[int, dict[str, list[str]]]:
        """Delete ``targets[key].ids`` from each part, each copy only while it has the stamp
        ``stamps[(key, id)]`` (a copy without one unconditionally). ``where`` is the caller's
        own filter (already in stored terms), applied too.

        Returns how many copies were removed, and per part key the ids of stamped groups that
        removed fewer copies than asked (some copy changed or went since it was read); with
        ``per_id`` every group is one id, so those are exactly the ids not removed here.
        Raises like a write when a part fails."""
        # Per group: its part, the stamp condition, the ids, and the stamp (if any).
        groups: dict[str, tuple[Target, dict[str, Any] | None, list[str] | None, Stamp | None]]
        groups = {}
        for key, target in targets.items():
            if target.ids is None:  # everything the filters match
                groups[key] = (target, None, None, None)
                continue
            for record_id in target.ids:
                stamp = stamps.get((key, record_id))
                cond = stamp_where(stamp)
                label = f"{key}\x00{record_id if per_id else repr(cond)}"
                group = groups.setdefault(label, (target, cond, [], stamp))[2]
                assert group is not None
                group.append(record_id)

        async def send(label: str) -> int:
            target, cond, ids, stamp = groups[label]
            body = {"ids": ids, "where": _both(where, cond), "where_document": where_document}
            # Without the caller's own filters the ids are surely removed: every copy, or the
            # stamped version (a stamp by sequence alone names no version).
            removes = None
            if ids and where is None and where_document is None:
                if cond is None:
                    removes = Removal(tuple(ids))
                elif stamp is not None and stamp[0]:
                    removes = Removal(tuple(ids), stamp[0])
            answer = await self._io.write(target, "delete", body, removes=removes)
            return int(answer.get("deleted", 0)) if isinstance(answer, dict) else 0

        counts, failures = await fan_out({k: functools.partial(send, k) for k in groups})
        raise_for_failures(
            operation,
            {groups[k][0].key: e for k, e in failures.items()},
            unwritten_ids={groups[k][0].key: list(groups[k][2] or ()) for k in failures},
            all_failed=bool(groups) and len(failures) == len(groups),
        )
        short: dict[str, list[str]] = {}
        for label, n in counts.items():
            target, cond, ids, _ = groups[label]
            # Only a stamped group's count says a copy changed under it; without a stamp a
            # short count may just be ids the caller's own filter did not match.
            if ids is not None and cond is not None and n < len(ids):
                short.setdefault(target.key, []).extend(ids)
        return sum(counts.values()), short
