"""Runs of hints replayed as one request: consecutive record writes (add, upsert, update) of one
collection on one node, with disjoint ids and the same columns, become one write.

Replaying one hint per request drained a recovered copy no faster than writes arrive (the
version check makes each hint two requests). Merging keeps each hint's effect exactly: no id
appears twice in a run, so the order of records within it does not matter, and a run ends at
any other operation (a delete, another collection), so the order across runs is the log's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._hints import Hint
from ._merge import RECORD_COLUMNS

__all__ = ["Run", "coalesce"]
_MERGEABLE = frozenset({"add", "upsert", "update"})


def _shape(body: dict[str, Any]) -> tuple[Any, ...]:
    """Which columns a body carries, and how vectors are encoded (base64 text or lists)."""
    shape: list[Any] = [isinstance(body.get(c), list) for c in RECORD_COLUMNS]
    vectors = body.get("embeddings")
    shape.append(type(vectors[0]).__name__ if isinstance(vectors, list) and vectors else None)
    return tuple(shape)


@dataclass
class Run:
    """Hints applied as one request to ``path`` (a run of one for anything not mergeable)."""

    op: str
    path: str
    hints: list[Hint] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    open: bool = True
    """Whether later hints may join (not for deletes or bodies without ids)."""

    def body(self) -> dict[str, Any]:
        """The run's records as one write body."""
        if len(self.bodies) == 1:
            return self.bodies[0]
        out: dict[str, Any] = {"ids": [i for b in self.bodies for i in b["ids"]]}
        for name in RECORD_COLUMNS:
            parts = [b.get(name) for b in self.bodies]
            # Every body of a run has the same columns (see ``_shape``).
            out[name] = None if parts[0] is None else [v for p in parts for v in p or ()]
        return out


def coalesce(items: Sequence[tuple[Hint, str, dict[str, Any]]], max_records: int) -> list[Run]:
    """Group ``(hint, path, decoded body)`` in log order into runs of at most
    ``max_records`` records."""
    runs: list[Run] = []
    shape: tuple[Any, ...] | None = None
    for hint, path, body in items:
        raw = body.get("ids")
        ids: list[str] = [str(i) for i in raw] if isinstance(raw, list) else []
        # An empty path is a collection deleted since: its hints are skipped one by one.
        mergeable = hint.op in _MERGEABLE and bool(ids) and bool(path)
        current = runs[-1] if runs else None
        if (
            mergeable
            and current is not None
            and current.open
            and current.op == hint.op
            and current.path == path
            and shape == _shape(body)
            and not current.ids.intersection(ids)
            and len(current.ids) + len(ids) <= max_records
        ):
            current.hints.append(hint)
            current.bodies.append(body)
            current.ids.update(ids)
            continue
        runs.append(Run(hint.op, path, [hint], [body], set(ids), open=mergeable))
        shape = _shape(body) if mergeable else None
    return runs
