"""Hash routing: routing key -> slot -> shard, through a fixed slot space.

A rebalance moves slots between shards; it never re-hashes keys. The hash is MurmurHash3 (x86,
32-bit, seed 0) of the key's UTF-8 bytes, so every process and Python version agrees on it.

Who owns which slot is written as a run-length table (``SlotRuns``: sorted ``(start, shard)``
runs) over named shards; the functions at the end check, expand, build and invert such tables
for ``HashPolicy``. All of them are pure.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import mmh3

from ._errors import ConfigurationError

__all__ = [
    "DEFAULT_SLOTS",
    "MAX_SLOTS",
    "SlotRuns",
    "SlotTable",
    "check_slot_runs",
    "owner_ranges",
    "owners_from_runs",
    "pick_shard",
    "runs_from_owners",
    "runs_table",
    "slot_for_key",
    "uniform_table",
]

DEFAULT_SLOTS = 4096
MAX_SLOTS = 65536


def slot_for_key(key: str, slots: int) -> int:
    """The slot of ``key`` in a space of ``slots`` slots."""
    if not 1 <= slots <= MAX_SLOTS:
        raise ConfigurationError(f"slot count must be in 1..{MAX_SLOTS}, got {slots}")
    return int(mmh3.hash(key.encode("utf-8"), 0, False)) % slots


@dataclass(frozen=True)
class SlotTable:
    """Which shard owns each slot, at one epoch of the partition map."""

    owners: tuple[int, ...]
    n_shards: int
    epoch: int = 0

    def __post_init__(self) -> None:
        if not 1 <= len(self.owners) <= MAX_SLOTS:
            raise ConfigurationError(
                f"slot count must be in 1..{MAX_SLOTS}, got {len(self.owners)}"
            )
        if self.n_shards < 1:
            raise ConfigurationError("a slot table needs at least one shard")
        bad = [o for o in self.owners if not 0 <= o < self.n_shards]
        if bad:
            raise ConfigurationError(
                f"slot owners must be shard indexes in 0..{self.n_shards - 1}, got {bad[0]}"
            )
        if self.epoch < 0:
            raise ConfigurationError(f"epoch must be >= 0, got {self.epoch}")

    @classmethod
    def uniform(cls, n_shards: int, slots: int = DEFAULT_SLOTS, epoch: int = 0) -> SlotTable:
        """Contiguous, equal ranges of slots per shard (shard i owns slots [i*S/n, (i+1)*S/n))."""
        if n_shards < 1:
            raise ConfigurationError("a slot table needs at least one shard")
        if not n_shards <= slots <= MAX_SLOTS:
            raise ConfigurationError(
                f"slot count must be in {n_shards}..{MAX_SLOTS} for {n_shards} shard(s), "
                f"got {slots}"
            )
        return cls(tuple(s * n_shards // slots for s in range(slots)), n_shards, epoch)

    @property
    def slots(self) -> int:
        return len(self.owners)

    def shard_for_key(self, key: str) -> int:
        return self.owners[slot_for_key(key, len(self.owners))]

    def owners_of(self, keys: Iterable[str]) -> list[int]:
        """``shard_for_key`` of every key, in one tight loop (ingest of large batches is hot)."""
        owners = self.owners
        n = len(owners)
        hash32 = mmh3.hash
        return [owners[hash32(key.encode("utf-8"), 0, False) % n] for key in keys]


@functools.lru_cache(maxsize=256)
def uniform_table(n_shards: int, slots: int = DEFAULT_SLOTS) -> SlotTable:
    """``SlotTable.uniform``, built once per shape: policies place every record through it."""
    return SlotTable.uniform(n_shards, slots)


SlotRuns = tuple[tuple[int, str], ...]
"""A run-length slot table: sorted ``(start_slot, shard)``, each run up to the next start."""


def check_slot_runs(shards: Sequence[str], slots: int, table: SlotRuns) -> None:
    """Refuse a malformed run-length ``table`` over ``shards`` and ``slots`` (``ValueError``).

    An empty table is always well formed (it means equal ranges). Otherwise it must start at
    slot 0, its starts must increase and stay below ``slots``, neighbouring runs must name
    different shards (the table is normalized), and every shard it names must be in ``shards``.
    """
    if not table:
        return
    if not shards:
        raise ValueError("a slot table needs the shards it names in shards")
    if table[0][0] != 0:
        raise ValueError(f"the slot table must start at slot 0, not {table[0][0]}")
    for (a, x), (b, y) in itertools.pairwise(table):
        if not a < b:
            raise ValueError(f"slot table starts must increase: {b} follows {a}")
        if x == y:
            raise ValueError(f"slot table runs at {a} and {b} both name {x!r}; join them")
    if table[-1][0] >= slots:
        raise ValueError(f"slot table start {table[-1][0]} is not below {slots}")
    unknown = sorted({s for _, s in table} - set(shards))
    if unknown:
        raise ValueError(f"the slot table names shard(s) {unknown} that are not in shards")


def owners_from_runs(slots: int, table: SlotRuns) -> list[str]:
    """The per-slot owner list (``owners[slot]``) of a non-empty, checked run-length table."""
    runs = itertools.pairwise((*table, (slots, "")))
    return [s for (lo, s), (hi, _) in runs for _ in range(lo, hi)]


def runs_from_owners(owners: Sequence[str]) -> SlotRuns:
    """The normalized run-length table of a per-slot owner list (``owners[slot]``)."""
    return tuple((i, s) for i, s in enumerate(owners) if i == 0 or owners[i - 1] != s)


@functools.lru_cache(maxsize=256)
def runs_table(shards: tuple[str, ...], slots: int, table: SlotRuns) -> SlotTable:
    """Slot -> index in ``shards``, built once per shape: every placement goes through it.

    An empty ``table`` is the uniform table (equal contiguous ranges over ``shards``)."""
    if not table:
        return uniform_table(len(shards), slots)
    index = {s: i for i, s in enumerate(shards)}
    return SlotTable(tuple(index[s] for s in owners_from_runs(slots, table)), len(shards))


def pick_shard(shards: Sequence[str], key: str, slots: int, table: SlotRuns = ()) -> str:
    """The shard of ``key`` within ``shards``: by ``table``, or equal ranges without one."""
    return shards[runs_table(tuple(shards), slots, table).shard_for_key(key)]


def owner_ranges(
    shards: Sequence[str], slots: int, table: SlotRuns
) -> dict[str, list[tuple[int, int]]]:
    """Slot ranges ``[lo, hi)`` per shard of ``shards``, in slot order (``[]``: owns none).

    An empty ``table`` gives the uniform ranges of ``SlotTable.uniform``."""
    n, out = len(shards), {s: list[tuple[int, int]]() for s in shards}
    # Uniform: shard i's first slot is the least s with s * n // slots == i, ceil(i*slots/n).
    runs = table or tuple((-(-i * slots // n), s) for i, s in enumerate(shards))
    for (lo, shard), (hi, _) in itertools.pairwise((*runs, (slots, ""))):
        out[shard].append((lo, hi))
    return out
