"""The partition map of one collection at one epoch: which policy places and finds its records,
and, while a migration runs, where records are also written and which copies reads hide.

A migration from policy A to policy B takes four epochs after the one it starts from:

- ``dual``: reads follow A. Every write follows A and is also sent to the place B gives each
  record, where the copy carries the migration's tag as its incoming mark (``_sc_mig``);
  records B moves carry the tag at their A place too, as their outgoing mark (``_sc_out``).
  Reads hide incoming copies: one the migrator has not verified yet (stale, or raced by a
  delete) is never seen.
- ``cutover``: reads follow B and hide outgoing copies. Writes follow B and are sent back to
  the A place too (with the outgoing mark), so a client still in ``dual`` reads what a client
  already in ``cutover`` wrote, and no client's write is missing from the other's place.
- ``cleanup``: reads and writes follow B alone; outgoing copies stay hidden until the migrator,
  once every client serves this epoch, deletes them.
- ``stable``: B alone, no marks consulted.

An abort before cutover goes through ``aborting``: A alone, writes no longer mirrored, incoming
copies still hidden until the migrator has deleted them; then ``stable`` under A.

A rebuild moves a collection between generations of physical collections (see
``catalog._generations``) under one policy, through the same phases: ``generation`` is the
one reads and writes follow, ``other_generation`` the one writes are also sent to (whole, to
the same shard: nothing is marked and reads filter nothing, since the two never share a
collection).

Epochs only grow; every change of ownership is a new epoch, written by compare-and-swap.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .._errors import ControlStoreError
from .._policies import AnyPolicy, HashPolicy, build_policy

__all__ = ["INCOMING_KEY", "OUTGOING_KEY", "PartitionMap", "Phase"]

INCOMING_KEY = "_sc_mig"
"""On a copy written to the place a migration moves its record to: the migration's tag."""
OUTGOING_KEY = "_sc_out"
"""On a record at the place a migration moves it away from: the migration's tag."""

Phase = Literal["stable", "dual", "cutover", "cleanup", "aborting"]


class PartitionMap(BaseModel):
    """One collection's placement at one epoch (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epoch: int = Field(ge=0)
    policy: AnyPolicy
    """The policy reads and writes follow."""
    phase: Phase = "stable"
    other: AnyPolicy | None = None
    """``dual``: the policy being moved to; ``cutover`` and ``cleanup``: the one being moved
    from."""
    tag: str | None = None
    """The migration's tag (``dual`` and ``cutover``)."""
    generation: int = Field(default=0, ge=0)
    """The generation of physical collections ``policy`` reads and writes."""
    other_generation: int | None = Field(default=None, ge=0)
    """In a rebuild: the generation ``other`` (the same policy) is at."""

    @model_validator(mode="after")
    def _check(self) -> PartitionMap:
        if self.phase == "stable":
            if self.other is not None or self.tag is not None:
                raise ValueError("a stable map has no other policy and no tag")
            if self.other_generation is not None:
                raise ValueError("a stable map has no other generation")
        elif self.other is None or not self.tag:
            raise ValueError(f"a {self.phase} map needs the other policy and a tag")
        elif self.other_generation == self.generation:
            raise ValueError("a rebuild moves between two different generations")
        return self

    @property
    def migrating(self) -> bool:
        return self.phase != "stable"

    @property
    def rebuilding(self) -> bool:
        """Whether this is a rebuild's map (a move between generations, nothing marked)."""
        return self.other_generation is not None

    def mirror_generation(self) -> int | None:
        """In a rebuild: the generation writes are also sent to (``dual``, ``cutover``)."""
        return self.other_generation if self.phase in ("dual", "cutover") else None

    def read_filter(self) -> dict[str, Any] | None:
        """What every read of every part adds to its filter in this phase."""
        if self.rebuilding:
            return None
        if self.phase in ("dual", "aborting"):
            return {INCOMING_KEY: {"$ne": self.tag}}
        if self.phase in ("cutover", "cleanup"):
            return {OUTGOING_KEY: {"$ne": self.tag}}
        return None

    @cached_property
    def _hiding(self) -> frozenset[str] | None:
        # The hidden mark of the phase is only ever written where records arrive when going
        # from ``policy`` to ``other`` (incoming copies at the goal's places in dual and
        # aborting; outgoing marks at the old places in cutover and cleanup, whose ``other``
        # is the old policy): those shards. None: every part (a policy other than hash).
        if not isinstance(self.policy, HashPolicy) or not isinstance(self.other, HashPolicy):
            return None
        now, then = self.policy.owner_slots(), self.other.owner_slots()
        return frozenset(
            shard for shard, ranges in then.items() if _slots(ranges) - _slots(now.get(shard, []))
        )

    def hides_on(self, shard: str) -> bool:
        """Whether reads of ``shard``'s part need the phase's read filter: a part that cannot
        hold a copy the phase hides is read without it (Chroma answers a filtered query
        several times slower)."""
        if self.read_filter() is None:
            return False
        hiding = self._hiding
        return hiding is None or shard in hiding

    def mirror_policy(self) -> Any | None:
        """Where writes also go: the other policy, in ``dual`` and ``cutover`` (None in a
        rebuild, whose writes go to the same places at ``mirror_generation``)."""
        if self.rebuilding:
            return None
        return self.other if self.phase in ("dual", "cutover") else None

    def marks(self) -> tuple[str, str]:
        """The marks of a mirrored write: for the record's own place and for the copy at the
        other place. In ``cutover`` the new place is marked incoming too, so a client still
        in ``dual`` (which hides incoming copies) does not see a record written there twice."""
        if self.phase == "dual":
            return OUTGOING_KEY, INCOMING_KEY
        return INCOMING_KEY, OUTGOING_KEY

    def to_json(self) -> bytes:
        raw = self.model_dump(mode="json", exclude_none=True)
        if not raw["generation"]:
            del raw["generation"]  # what clients from before rebuilds read too
        return orjson.dumps(raw)

    @classmethod
    def from_json(cls, data: bytes, *, source: str) -> PartitionMap:
        try:
            raw = orjson.loads(data)
            raw["policy"] = build_policy(raw["policy"], source=f"{source} policy")
            if raw.get("other") is not None:
                raw["other"] = build_policy(raw["other"], source=f"{source} other policy")
            return cls.model_validate(raw)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ControlStoreError(
                f"{source} is not a partition map this client reads: {exc}"
            ) from exc

    def advanced(self, **changes: Any) -> PartitionMap:
        """The next epoch's map with ``changes`` (fields not named keep their value)."""
        fields: dict[str, Any] = {
            "policy": self.policy,
            "phase": self.phase,
            "other": self.other,
            "tag": self.tag,
            "generation": self.generation,
            "other_generation": self.other_generation,
        }
        fields.update(changes)
        return PartitionMap.model_validate({"epoch": self.epoch + 1, **fields})


def _slots(ranges: list[tuple[int, int]]) -> set[int]:
    return {slot for lo, hi in ranges for slot in range(lo, hi)}
