"""Hash slot routing (``sharded_chroma._routing``): pure properties, no servers."""

from __future__ import annotations

import random
import uuid
from collections import Counter

import mmh3
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sharded_chroma
from sharded_chroma._routing import (
    DEFAULT_SLOTS,
    MAX_SLOTS,
    SlotTable,
    slot_for_key,
    uniform_table,
)

keys = st.text(max_size=40)
n_shards = st.integers(min_value=1, max_value=64)


@st.composite
def shards_and_slots(draw: st.DrawFn) -> tuple[int, int]:
    n = draw(n_shards)
    slots = draw(st.integers(min_value=n, max_value=MAX_SLOTS))
    return n, slots


# MurmurHash3 x86 32-bit, seed 0, unsigned, of the key's UTF-8 bytes, computed once with mmh3 and
# pinned here: if any of these change, every record already stored is on the wrong shard.
PINNED = [
    # key, mmh3 hash, slot in 4096, shard of SlotTable.uniform(3)
    ("hello", 613153351, 2631, 1),
    ("", 0, 0, 0),
    ("doc-1", 4274171406, 3598, 2),
    ("id0", 1821299891, 1203, 0),
    ("ünïcødé", 2210329462, 886, 0),
    ("tenant-a", 1598802257, 2385, 1),
]


@pytest.mark.parametrize(("key", "hashed", "slot", "shard"), PINNED)
def test_pinned_known_values(key: str, hashed: int, slot: int, shard: int) -> None:
    assert mmh3.hash(key.encode("utf-8"), 0, False) == hashed
    assert slot_for_key(key, 4096) == slot == hashed % 4096
    assert SlotTable.uniform(3).shard_for_key(key) == shard
    assert SlotTable.uniform(3, DEFAULT_SLOTS).slots == 4096


def test_default_slot_space() -> None:
    assert DEFAULT_SLOTS == 4096
    assert SlotTable.uniform(3).slots == DEFAULT_SLOTS


@given(key=keys, slots=st.integers(min_value=1, max_value=MAX_SLOTS))
def test_slot_is_deterministic_and_in_range(key: str, slots: int) -> None:
    slot = slot_for_key(key, slots)
    assert 0 <= slot < slots
    assert slot == slot_for_key(key, slots)
    assert slot == mmh3.hash(key.encode("utf-8"), 0, False) % slots


@given(key=keys, shape=shards_and_slots())
def test_every_key_maps_to_a_shard_in_range(key: str, shape: tuple[int, int]) -> None:
    n, slots = shape
    table = SlotTable.uniform(n, slots)
    shard = table.shard_for_key(key)
    assert 0 <= shard < n
    assert shard == table.owners[slot_for_key(key, slots)]
    # A second, equal table (another process) routes the same way.
    assert SlotTable.uniform(n, slots).shard_for_key(key) == shard


@given(key=keys, n=st.integers(min_value=1, max_value=16))
def test_routing_is_stable_across_epochs(key: str, n: int) -> None:
    # The epoch labels the map; it never changes where a key goes by itself.
    assert SlotTable.uniform(n, epoch=0).shard_for_key(key) == SlotTable.uniform(
        n, epoch=7
    ).shard_for_key(key)


@given(batch=st.lists(keys, max_size=60), shape=shards_and_slots())
def test_owners_of_a_batch_agree_with_each_key(batch: list[str], shape: tuple[int, int]) -> None:
    n, slots = shape
    table = SlotTable.uniform(n, slots)
    assert table.owners_of(iter(batch)) == [table.shard_for_key(k) for k in batch]
    assert uniform_table(n, slots) == table


@given(shape=shards_and_slots())
def test_uniform_gives_contiguous_near_equal_ranges(shape: tuple[int, int]) -> None:
    n, slots = shape
    table = SlotTable.uniform(n, slots)
    assert table.slots == slots
    assert table.n_shards == n
    assert len(table.owners) == slots
    # Contiguous: owners never decrease, so each shard's slots form one range, in shard order.
    assert list(table.owners) == sorted(table.owners)
    sizes = Counter(table.owners)
    assert sorted(sizes) == list(range(n)), "every shard owns at least one slot"
    assert max(sizes.values()) - min(sizes.values()) <= 1
    assert sum(sizes.values()) == slots


def test_uniform_three_shards_exact_ranges() -> None:
    table = SlotTable.uniform(3, 4096)
    assert table.owners[0] == 0
    assert table.owners[1365] == 0
    assert table.owners[1366] == 1
    assert table.owners[2730] == 1
    assert table.owners[2731] == 2
    assert table.owners[4095] == 2


def test_slot_table_is_frozen() -> None:
    table = SlotTable.uniform(2)
    with pytest.raises(AttributeError):
        table.n_shards = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("n", "slots"),
    [
        (0, 4096),
        (-1, 4096),
        (3, 2),  # fewer slots than shards
        (1, 0),
        (1, MAX_SLOTS + 1),
    ],
)
def test_uniform_rejects_invalid_arguments(n: int, slots: int) -> None:
    with pytest.raises(sharded_chroma.ConfigurationError):
        SlotTable.uniform(n, slots)


def test_uniform_rejects_negative_epoch() -> None:
    with pytest.raises(sharded_chroma.ConfigurationError, match="epoch"):
        SlotTable.uniform(2, 16, epoch=-1)


@pytest.mark.parametrize(
    ("owners", "n", "match"),
    [
        ((), 1, "slot count"),
        ((0,) * (MAX_SLOTS + 1), 1, "slot count"),
        ((0, 1), 0, "at least one shard"),
        ((0, 2), 2, "shard indexes"),
        ((0, -1), 2, "shard indexes"),
    ],
)
def test_slot_table_rejects_invalid_owners(owners: tuple[int, ...], n: int, match: str) -> None:
    with pytest.raises(sharded_chroma.ConfigurationError, match=match):
        SlotTable(owners, n)


def test_configuration_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        SlotTable.uniform(0)


def test_random_ids_spread_evenly_over_three_shards() -> None:
    rng = random.Random(20240611)
    table = SlotTable.uniform(3)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(30_000)]
    counts = Counter(table.shard_for_key(i) for i in ids)
    assert sorted(counts) == [0, 1, 2]
    for shard, count in counts.items():
        assert abs(count - 10_000) <= 500, (shard, counts)
    # The bulk path agrees with the one-key path.
    assert Counter(table.owners_of(ids)) == counts


def test_sequential_ids_spread_evenly_over_three_shards() -> None:
    # Ids like "doc-0", "doc-1", ... are the common case and must not cluster.
    table = SlotTable.uniform(3)
    counts = Counter(table.shard_for_key(f"doc-{i}") for i in range(30_000))
    assert all(abs(c - 10_000) <= 500 for c in counts.values()), counts


@pytest.mark.parametrize("slots", [0, -4096])
def test_slot_for_key_rejects_non_positive_slot_count(slots: int) -> None:
    with pytest.raises(sharded_chroma.ConfigurationError):
        slot_for_key("hello", slots)
