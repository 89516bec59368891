"""fan_out without servers: failures are collected, siblings finish, cancellation reaches all."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from sharded_chroma._fanout import fan_out

pytestmark = pytest.mark.anyio


class Stop(BaseException):
    """Not an Exception: must never be swallowed as a shard failure."""


async def test_a_failing_call_does_not_stop_the_others() -> None:
    done: list[str] = []

    async def ok(name: str) -> str:
        await asyncio.sleep(0.01)
        done.append(name)
        return name

    async def bad() -> str:
        raise ValueError("boom")

    results, failures = await fan_out({"a": lambda: ok("a"), "b": bad, "c": lambda: ok("c")})
    assert results == {"a": "a", "c": "c"} and sorted(done) == ["a", "c"]
    assert list(failures) == ["b"] and isinstance(failures["b"], ValueError)


async def test_cancelling_the_call_cancels_every_child() -> None:
    cancelled: list[str] = []

    async def slow(name: str) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    with anyio.move_on_after(0.05) as scope:
        await fan_out({n: (lambda n=n: slow(n)) for n in "abc"})
    assert scope.cancelled_caught
    assert sorted(cancelled) == ["a", "b", "c"]


async def test_a_base_exception_is_raised_not_collected() -> None:
    async def stop() -> None:
        raise Stop

    async def fine() -> int:
        return 1

    with pytest.raises(Stop):
        await fan_out({"a": stop, "b": fine})
