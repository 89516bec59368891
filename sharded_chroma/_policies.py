"""Placement policies: where a record lives, and which shards a filter can match.

Each policy is a frozen, validated model with the same small interface (``Policy``) and a name
in ``POLICIES``. A collection's policy is chosen when it is created, stored as JSON in the
reserved metadata of its physical collections, and read back by every client, so all processes
place records the same way. Placement and pruning are pure and synchronous.

- ``hash``: the record id (or a metadata field) is hashed into a fixed slot space; slots map to
  shards in equal contiguous ranges, or by an explicit run-length slot table (a rebalance; the
  table helpers are in ``_routing``).
- ``field``: a metadata value (region, tenant, category) names a partition; a partition owns
  one or more shards and records are hashed by id within them. Unknown values go to a default
  partition, or are refused.
- ``composite``: like ``field``, but hashed within the partition by a chosen key (the id or a
  metadata field), so a filter on both fields can be pruned to one shard.
- ``time``: a timestamp field is bucketed (hour, day, week, month, or explicit ranges); each
  bucket lives on one shard as its own physical collection, so retention drops whole buckets.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)

from ._errors import ConfigurationError, RoutingError
from ._frozen import FrozenDict
from ._placement import FROZEN, SHOW, Placement, Policy, Scope, routing_value
from ._prune import walk_where
from ._routing import (
    DEFAULT_SLOTS,
    MAX_SLOTS,
    SlotRuns,
    check_slot_runs,
    owner_ranges,
    pick_shard,
    runs_from_owners,
    runs_table,
)
from ._time_policy import TimePolicy, TimeRange

__all__ = [
    "POLICIES",
    "AnyPolicy",
    "CompositePolicy",
    "FieldPolicy",
    "HashPolicy",
    "Placement",
    "Policy",
    "PolicyLike",
    "Scope",
    "TimePolicy",
    "TimeRange",
    "policy_from_json",
    "policy_to_json",
]


def _hash_key(record_id: str, metadata: Mapping[str, Any] | None, field: str | None) -> str:
    if field is None:
        return record_id
    value = routing_value(record_id, metadata, field)
    if isinstance(value, (list, dict)):
        raise RoutingError(
            f"record {record_id!r} needs a scalar value for the routing field {field!r}, got "
            f"{type(value).__name__}; nothing was written",
            record_id=record_id,
            value=value,
        )
    return str(value)


def _hash_scope(
    field: str | None, slots: int, groups: Iterable[Sequence[str]], table: SlotRuns = ()
) -> Any:  # a leaf function for walk_where
    """Leaf reader for a hashed field: ``$eq``/``$in`` of strings name the owning shards.

    Only string operands are pruned: a number filter may match a stored value of the other
    numeric type, whose string (and so slot) differs."""

    def leaf(name: str, op: str, arg: Any) -> frozenset[str] | None:
        if field is None or name != field:
            return None
        values = [arg] if op == "$eq" else arg if op == "$in" else None
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            return None
        return frozenset(pick_shard(g, v, slots, table) for v in values for g in groups)

    return leaf


class HashPolicy(BaseModel):
    """Hash of the record id (``field=None``) or of a metadata field's value, over all shards."""

    model_config = FROZEN
    kind: Literal["hash"] = "hash"
    field: str | None = None
    slots: int = Field(default=DEFAULT_SLOTS, ge=1, le=MAX_SLOTS)
    shards: tuple[str, ...] = ()
    """The shards, in slot order; filled from the topology when the collection is created."""
    table: SlotRuns = ()
    """Who owns which slots, run-length (see ``SlotRuns``); empty: equal ranges over ``shards``.
    A shard of ``shards`` may own no slot (being added, or drained before removal)."""

    @model_validator(mode="after")
    def _check(self) -> HashPolicy:
        if self.field is not None and not self.field:
            raise ValueError("field must be a metadata field name or None (the record id)")
        if len(set(self.shards)) != len(self.shards):
            raise ValueError("shards must not repeat")
        if not self.table and self.shards and self.slots < len(self.shards):
            raise ValueError(f"slots ({self.slots}) must be at least the shard count")
        check_slot_runs(self.shards, self.slots, self.table)  # no-op without a table
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Stored policies without a table keep the JSON they had before tables existed.
        data: dict[str, Any] = handler(self)
        return data if self.table else {k: v for k, v in data.items() if k != "table"}

    @staticmethod
    def table_from_owners(owners: Sequence[str]) -> SlotRuns:
        """The normalized run-length table of a per-slot owner list (``owners[slot]``)."""
        return runs_from_owners(owners)

    def owner_slots(self) -> dict[str, list[tuple[int, int]]]:
        """Slot ranges ``[lo, hi)`` per shard of ``shards``, in slot order (``[]``: none)."""
        return owner_ranges(self.shards, self.slots, self.table)

    def slot_owner(self, slot: int) -> str:
        """The shard that owns ``slot``."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside 0..{self.slots - 1}")
        return self.shards[runs_table(self.shards, self.slots, self.table).owners[slot]]

    def shards_named(self) -> frozenset[str]:
        return frozenset(self.shards)

    def place(self, record_id: str, metadata: Mapping[str, Any] | None) -> Placement:
        key = _hash_key(record_id, metadata, self.field)
        return Placement(pick_shard(self.shards, key, self.slots, self.table))

    def place_all(
        self, ids: Sequence[str], metadatas: Sequence[Mapping[str, Any] | None] | None
    ) -> list[Placement]:
        """``place`` for a batch: one ``Placement`` per shard, shared by its records."""
        if self.field is None:
            keys: Sequence[str] = ids
        else:
            keys = [
                _hash_key(rid, None if metadatas is None else metadatas[i], self.field)
                for i, rid in enumerate(ids)
            ]
        places = [Placement(s) for s in self.shards]
        table = runs_table(self.shards, self.slots, self.table)
        return [places[o] for o in table.owners_of(keys)]

    def scope(self, where: Mapping[str, Any] | None) -> Scope:
        leaf = _hash_scope(self.field, self.slots, [self.shards], self.table)
        return Scope(shards=walk_where(where, leaf, operator.and_, operator.or_))


def _int_text(text: str) -> bool:
    """Whether ``text`` is how an integer routing value is written (so it may be stored as one)."""
    try:
        return str(int(text)) == text
    except ValueError:
        return False


def _routing_text(record_id: str, value: Any, field: str) -> str:
    # Strings and integers only: a float or bool would route by a string form that a filter
    # of the other numeric type could still match.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RoutingError(
            f"record {record_id!r}: the routing field {field!r} needs a string or integer "
            f"value, got {type(value).__name__} {value!r}; nothing was written",
            record_id=record_id,
            value=value,
        )
    return str(value)


class FieldPolicy(BaseModel):
    """A metadata value names a partition; each partition owns one or more shards.

    ``partitions`` maps partition names to shards; a record whose value is a partition name
    lands in it. ``values`` adds other values per partition (``{"de": "eu"}``). A value that is
    neither goes to ``default`` if set, else the write is refused. Within a partition with
    several shards, records are hashed by id.
    """

    model_config = FROZEN
    kind: Literal["field"] = "field"
    field: str = Field(min_length=1)
    partitions: Annotated[Mapping[str, tuple[str, ...]], AfterValidator(FrozenDict)]
    values: Annotated[Mapping[str, str], AfterValidator(FrozenDict)] = Field(
        default_factory=FrozenDict
    )
    default: str | None = None
    slots: int = Field(default=DEFAULT_SLOTS, ge=1, le=MAX_SLOTS)

    @model_validator(mode="after")
    def _check(self) -> FieldPolicy:
        if not self.partitions:
            raise ValueError("partitions must name at least one partition")
        for name, shards in self.partitions.items():
            if not shards:
                raise ValueError(f"partition {name!r} needs at least one shard")
            if len(set(shards)) != len(shards):
                raise ValueError(f"partition {name!r} lists a shard twice")
            if len(shards) > self.slots:
                raise ValueError(f"partition {name!r} has more shards than slots")
        for value, partition in self.values.items():
            if partition not in self.partitions:
                raise ValueError(f"value {value!r} maps to unknown partition {partition!r}")
            if value in self.partitions and value != partition:
                raise ValueError(f"value {value!r} is a partition name but maps to {partition!r}")
        if self.default is not None and self.default not in self.partitions:
            raise ValueError(f"default partition {self.default!r} is not in partitions")
        return self

    def shards_named(self) -> frozenset[str]:
        return frozenset(s for shards in self.partitions.values() for s in shards)

    def partition_of(self, value: str) -> str | None:
        if value in self.partitions:
            return value
        return self.values.get(value, self.default)

    def partition_of_value(self, value: Any) -> str | None:
        """The partition of a stored routing value; None if it is not one a record may have."""
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return None
        return self.partition_of(str(value))

    def _within_key(self, record_id: str, metadata: Mapping[str, Any] | None) -> str:
        return record_id

    def _within_field(self) -> str | None:
        return None

    def place(self, record_id: str, metadata: Mapping[str, Any] | None) -> Placement:
        text = _routing_text(record_id, routing_value(record_id, metadata, self.field), self.field)
        partition = self.partition_of(text)
        if partition is None:
            known = sorted({*self.partitions, *self.values})
            shown = ", ".join(repr(k) for k in known[:SHOW])
            more = f" and {len(known) - SHOW} more" if len(known) > SHOW else ""
            raise RoutingError(
                f"record {record_id!r}: {self.field}={text!r} is not a known value "
                f"(known: {shown}{more}) and the policy has no default partition; "
                "nothing was written",
                record_id=record_id,
                value=text,
            )
        shards = self.partitions[partition]
        if len(shards) == 1:
            return Placement(shards[0])
        return Placement(pick_shard(shards, self._within_key(record_id, metadata), self.slots))

    def _partitions_for(self, values: Iterable[str]) -> frozenset[str]:
        out = set()
        for value in values:
            partition = self.partition_of(value)
            if partition is not None:
                out.add(partition)
        return frozenset(out)

    def _excluded(self, values: Iterable[str | int]) -> frozenset[str]:
        """Partitions that no value outside ``values`` can reach (``$ne``/``$nin``).

        Chroma compares typed values: excluding the string "1" leaves records whose value is
        the integer 1, which route to the same partition. A partition is excluded only when
        every stored form of every one of its values (the string, and the integer when the
        text is one) is."""
        gone: set[tuple[type, str]] = {(type(v), str(v)) for v in values}
        out = set()
        for partition in self.partitions:
            if partition == self.default:
                continue  # every unknown value lands here
            members = {partition, *(v for v, p in self.values.items() if p == partition)}
            forms: set[tuple[type, str]] = {(str, m) for m in members}
            forms |= {(int, m) for m in members if _int_text(m)}
            if forms <= gone:
                out.add(partition)
        return frozenset(out)

    def _field_leaf(self, op: str, arg: Any) -> frozenset[str] | None:
        """Shards allowed by one condition on the routing field."""
        values = [arg] if op in ("$eq", "$ne") else arg if op in ("$in", "$nin") else None
        if not isinstance(values, list) or not values:
            return None
        if any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in values):
            return None
        if op in ("$eq", "$in"):
            partitions = self._partitions_for(str(v) for v in values)
        else:
            partitions = frozenset(self.partitions) - self._excluded(values)
        return frozenset(s for p in partitions for s in self.partitions[p])

    def scope(self, where: Mapping[str, Any] | None) -> Scope:
        hashed = _hash_scope(self._within_field(), self.slots, list(self.partitions.values()))

        def leaf(name: str, op: str, arg: Any) -> frozenset[str] | None:
            if name == self.field:
                return self._field_leaf(op, arg)
            return hashed(name, op, arg)  # type: ignore[no-any-return]

        return Scope(shards=walk_where(where, leaf, operator.and_, operator.or_))


class CompositePolicy(FieldPolicy):
    """Field first, then a hash within the field's shards by ``hash_key`` (None: the id)."""

    kind: Literal["composite"] = "composite"  # type: ignore[assignment]
    hash_key: str | None = None

    @model_validator(mode="after")
    def _check_key(self) -> CompositePolicy:
        if self.hash_key is not None and (not self.hash_key or self.hash_key == self.field):
            raise ValueError("hash_key must be another metadata field name or None (the id)")
        return self

    def _within_key(self, record_id: str, metadata: Mapping[str, Any] | None) -> str:
        return _hash_key(record_id, metadata, self.hash_key)

    def _within_field(self) -> str | None:
        return self.hash_key


AnyPolicy = Annotated[
    HashPolicy | FieldPolicy | CompositePolicy | TimePolicy, Field(discriminator="kind")
]
PolicyLike = AnyPolicy | Mapping[str, Any]
"""What ``create_collection(policy=...)`` takes: a policy object, or a mapping with a ``kind``
as in a topology file."""
POLICIES: dict[str, type[BaseModel]] = {
    "composite": CompositePolicy,
    "field": FieldPolicy,
    "hash": HashPolicy,
    "time": TimePolicy,
}
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyPolicy)


def build_policy(data: Mapping[str, Any] | BaseModel, *, source: str = "policy") -> Any:
    """A policy from a mapping with a ``kind`` (as in a topology file) or a policy object."""
    if isinstance(data, BaseModel):
        return data
    if not isinstance(data, Mapping):
        raise ConfigurationError(
            f"{source}: expected a table of policy options, got {type(data).__name__}"
        )
    kind = data.get("kind", "hash")
    if not isinstance(kind, str) or kind not in POLICIES:
        raise ConfigurationError(
            f"{source}: unknown policy kind {kind!r}; known: {sorted(POLICIES)}"
        )
    try:
        return _ADAPTER.validate_python({**data, "kind": kind})
    except ValidationError as exc:
        errors = exc.errors(include_input=False)
    problems = "; ".join(
        f"{'.'.join(str(x) for x in e['loc'][1:]) or kind}: {e['msg']}" for e in errors
    )
    raise ConfigurationError(f"invalid {source}: {problems}")


def policy_to_json(policy: BaseModel) -> str:
    return orjson.dumps(policy.model_dump(mode="json")).decode()


def policy_from_json(text: str) -> Any:
    """A stored policy. A legacy value (a field name, or "" for the id) is a hash policy."""
    if not text.startswith("{"):
        return HashPolicy(field=text or None)
    return build_policy(orjson.loads(text), source="stored policy")
