"""Hash routing: routing key -> slot -> shard, through a fixed slot space.

A rebalance moves slots between shards; it never re-hashes keys. The hash is MurmurHash3 (x86,
32-bit, seed 0) of the key's UTF-8 bytes, so every process and Python version agrees on it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import mmh3

from ._errors import ConfigurationError

__all__ = ["DEFAULT_SLOTS", "MAX_SLOTS", "SlotTable", "slot_for_key", "uniform_table"]

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
