"""Per-id ordering primitives without servers: the cross-loop lock, id stripes, the clock."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sharded_chroma.ops._clock import HybridClock
from sharded_chroma.ops._ordering import CrossLoopLock, IdOrdering


def test_lock_excludes_across_threads_with_their_own_loops() -> None:
    lock = CrossLoopLock()
    inside = 0
    worst = 0
    order: list[int] = []
    guard = threading.Lock()

    async def job(t: int) -> None:
        nonlocal inside, worst
        for _ in range(50):
            await lock.acquire()
            try:
                with guard:
                    inside += 1
                    worst = max(worst, inside)
                    order.append(t)
                await asyncio.sleep(0)  # give every other task and thread a chance to enter
                with guard:
                    inside -= 1
            finally:
                lock.release()

    def thread(t: int) -> None:
        async def many() -> None:
            await asyncio.gather(*(job(t * 10 + k) for k in range(4)))

        asyncio.run(many())

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(thread, range(4)))
    assert worst == 1
    assert len(order) == 4 * 4 * 50
    assert not lock.locked


@pytest.mark.anyio
async def test_lock_is_fifo_and_a_cancelled_waiter_gives_way() -> None:
    lock = CrossLoopLock()
    await lock.acquire()
    got: list[str] = []

    async def waiter(name: str) -> None:
        await lock.acquire()
        got.append(name)
        lock.release()

    tasks = [asyncio.create_task(waiter(n)) for n in "abc"]
    await asyncio.sleep(0.01)
    tasks[1].cancel()  # b leaves the queue without ever holding the lock
    lock.release()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert got == ["a", "c"]
    assert not lock.locked


@pytest.mark.anyio
async def test_cancelled_right_after_the_handover_passes_the_lock_on() -> None:
    lock = CrossLoopLock()
    await lock.acquire()
    first = asyncio.create_task(lock.acquire())
    second = asyncio.create_task(lock.acquire())
    await asyncio.sleep(0.01)
    lock.release()  # ownership handed to `first`, which is cancelled before it runs
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1.0)  # it got the lock `first` could not use
    assert lock.locked
    lock.release()
    assert not lock.locked


@pytest.mark.anyio
async def test_one_id_is_serialized_and_other_ids_run() -> None:
    ordering = IdOrdering()
    events: list[str] = []
    inside = asyncio.Event()
    go_on = asyncio.Event()

    async def slow() -> None:
        async with ordering.hold("c", ["x"]):
            events.append("slow in")
            inside.set()
            await go_on.wait()
            events.append("slow out")

    async def same() -> None:
        await inside.wait()
        async with ordering.hold("c", ["y", "x"]):
            events.append("same id in")

    async def other() -> None:
        await inside.wait()
        # Thousands of other ids, and the same id in another collection, never wait for x.
        many = [f"o{i}" for i in range(5000)]
        async with ordering.hold("c", many), ordering.hold("d", ["x"]):
            events.append("other ids in")
        go_on.set()

    await asyncio.wait_for(asyncio.gather(slow(), same(), other()), 2.0)
    assert events == ["slow in", "other ids in", "slow out", "same id in"]
    assert ordering.held() == 0


@pytest.mark.anyio
async def test_overlapping_calls_in_opposite_orders_do_not_deadlock() -> None:
    ordering = IdOrdering()
    ids = [f"k{i}" for i in range(50)]

    async def call(seq: list[str]) -> None:
        for _ in range(20):
            async with ordering.hold("c", seq):
                await asyncio.sleep(0)

    await asyncio.wait_for(
        asyncio.gather(call(ids), call(ids[::-1]), call(ids[10:30]), call(ids[::2])), 10.0
    )
    assert ordering.held() == 0


@pytest.mark.anyio
async def test_a_cancelled_id_waiter_leaves_no_lock_behind() -> None:
    ordering = IdOrdering()
    inside = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with ordering.hold("c", ["x", "y"]):
            inside.set()
            await release.wait()

    async def waiter() -> None:
        async with ordering.hold("c", ["a", "x"]):
            raise AssertionError("must not get x while the holder has it")

    first = asyncio.create_task(holder())
    await inside.wait()
    second = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)
    assert ordering.held() == 3  # x, y and the waiter's a
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    assert ordering.held() == 2
    release.set()
    await first
    assert ordering.held() == 0
    async with ordering.hold("c", ["x"]):
        assert ordering.held() == 1


def test_clock_never_goes_back_and_stays_ahead_of_what_it_saw() -> None:
    wall = [2_000_000_000_000]
    clock = HybridClock(lambda: wall[0] * 1000)
    a = clock.reserve(3)
    wall[0] -= 10_000_000  # the wall clock steps back ten seconds
    b = clock.reserve()
    assert b == a + 3
    clock.observe(b + 1_000_000)  # a peer's version a second ahead
    assert clock.reserve() == b + 1_000_001
    clock.observe(5)  # an old value changes nothing
    assert clock.reserve() == b + 1_000_002


def test_clock_is_unique_across_threads() -> None:
    clock = HybridClock()
    with ThreadPoolExecutor(max_workers=8) as pool:
        values = list(pool.map(lambda _: clock.reserve(), range(4000)))
    assert len(set(values)) == 4000
    assert abs(max(values) // 1_000_000 - time.time()) < 60
