"""A delete looks for its records part by part; a record moved by an update in another process
between those looks must not slip past it (see ``ops._tombstones``).

The interleaving is forced with real servers: the deleting client reaches the record's old
shard through a proxy that holds each request back, and the updating client, with no proxy,
moves the record to a shard the delete has already looked at while that request waits. An
update and a delete that overlap leave the record absent in either order (an update never
creates a record), so the record must be gone once both are done.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest

import sharded_chroma
from sharded_chroma import FieldPolicy
from tests._proxy import FaultProxy

pytestmark = pytest.mark.anyio

NAME = "delete-races"
# Topology.from_urls names the shards s0, s1, s2 in URL order; the catalog lives on s0.
POLICY = FieldPolicy(field="region", partitions={"eu": ("s0",), "us": ("s1",), "ap": ("s2",)})
HOLD = 2.0  # seconds each request to the old shard is held back for the deleter
START_AFTER = 0.4  # seconds after the delete began that the update begins


async def timed(call: Any) -> tuple[float, float]:
    start = time.monotonic()
    await call()
    return start, time.monotonic()


@pytest.mark.parametrize("by", ["ids", "filter", "filter of the other"])
async def test_a_record_moved_past_a_delete_under_way_is_deleted(
    shard_urls: list[str], by: str
) -> None:
    """Also: a delete by a filter the moved record does not match leaves it alone."""
    old = urlsplit(shard_urls[1])
    with FaultProxy(old.hostname or "", old.port or 80) as proxy:
        slow_urls = [shard_urls[0], proxy.url, shard_urls[2]]
        async with (
            await sharded_chroma.AsyncHttpClient(shards=shard_urls) as mover,
            await sharded_chroma.AsyncHttpClient(shards=slow_urls) as deleter,
        ):
            col = await mover.create_collection(NAME, embedding_function=None, policy=POLICY)
            await col.add(
                ids=["r", "other"],
                embeddings=[[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]],
                metadatas=[{"region": "us", "topic": 7}, {"region": "us", "topic": 8}],
            )
            slow = await deleter.get_collection(NAME, embedding_function=None)
            # A first delete of nothing makes the delete marks' collection, at full speed.
            await slow.delete(ids=["nothing"])
            proxy.set_latency(HOLD)
            spans: dict[str, tuple[float, float]] = {}

            async def delete() -> None:
                if by == "ids":
                    call = lambda: slow.delete(ids=["r"])  # noqa: E731
                else:
                    topic = 7 if by == "filter" else 8
                    call = lambda: slow.delete(where={"topic": topic})  # noqa: E731
                spans["delete"] = await timed(call)

            async def update() -> None:
                await anyio.sleep(START_AFTER)
                # Moves the record from s1 to s0, whose part the delete has looked at already.
                spans["update"] = await timed(
                    lambda: col.update(ids=["r"], metadatas=[{"region": "eu"}])
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(delete)
                tg.start_soon(update)
            proxy.set_latency(0)
            # The race happened as intended: the update began after the delete and was done
            # while the delete's request to the old shard was still held back.
            assert spans["delete"][0] < spans["update"][0]
            assert spans["update"][1] < spans["delete"][0] + HOLD
            assert spans["update"][1] < spans["delete"][1]
            got = await col.get(include=["metadatas"])
            if by == "filter of the other":
                assert got["ids"] == ["r"] and got["metadatas"] == [{"region": "eu", "topic": 7}]
                expected = {"s0": ["r"]}
            else:
                assert got["ids"] == ["other"], got
                expected = {"s1": ["other"]}
            assert await col.count() == 1
            # No other copy is on any shard either (the client's reads could hide one).
            assert await stored_ids(shard_urls) == expected
            await mover.delete_collection(NAME)


async def stored_ids(urls: list[str]) -> dict[str, list[str]]:
    """The ids each server stores for the collection, read with plain HTTP."""
    base = "/api/v2/tenants/default_tenant/databases/default_database/collections"
    out: dict[str, list[str]] = {}
    for n, url in enumerate(urls):
        # Loopback only: never through a proxy from the environment.
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http:
            listed = (await http.get(base)).raise_for_status().json()
            for col in listed:
                if col["name"] == NAME:
                    got = await http.post(f"{base}/{col['id']}/get", json={"include": []})
                    ids = got.raise_for_status().json()["ids"]
                    if ids:
                        out[f"s{n}"] = sorted(ids)
    return out


async def test_an_update_moving_a_record_never_takes_back_a_record_made_meanwhile(
    shard_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update has read the record at its old shard and is about to write it to its new
    one when another client deletes the record and upserts it again into that new shard. The
    update's write must not replace that record, and its undo (its source copy went,
    deleted) must not remove it: in every order of the three calls the record ends present
    with the second client's value. (Found by the two-process history test: the update's
    whole-record upsert overwrote the new record, and the undo then deleted it.)

    The interleaving is forced by holding the updating client's move write until the other
    client is done; both talk to the real servers."""
    async with (
        await sharded_chroma.AsyncHttpClient(shards=shard_urls) as other,
        await sharded_chroma.AsyncHttpClient(shards=shard_urls) as updater,
    ):
        col = await other.create_collection(NAME, embedding_function=None, policy=POLICY)
        await col.add(
            ids=["r"], embeddings=[[0.1, 0.2, 0.3]], metadatas=[{"region": "us", "topic": 7}]
        )
        slow = await updater.get_collection(NAME, embedding_function=None)
        sender = updater._runtime.writer._mover._sender
        original = sender.send
        reached, go = anyio.Event(), anyio.Event()
        held: list[str] = []

        async def held_send(op: str, *args: Any, **kwargs: Any) -> int:
            if kwargs.get("sequence") == "all" and not held:
                held.append(op)  # the move's write of the whole record to its new shard
                reached.set()
                await go.wait()
            return await original(op, *args, **kwargs)

        monkeypatch.setattr(sender, "send", held_send)

        async def update() -> None:
            # Moves the record from s1 to s0.
            await slow.update(ids=["r"], metadatas=[{"region": "eu"}])

        async def delete_and_make_again() -> None:
            await reached.wait()
            await col.delete(ids=["r"])
            await col.upsert(
                ids=["r"], embeddings=[[0.9, 0.8, 0.7]], metadatas=[{"region": "eu", "topic": 9}]
            )
            go.set()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(update)
                tg.start_soon(delete_and_make_again)
        assert held, "the update never wrote the record to its new shard"
        got = await col.get(include=["metadatas"])
        assert got["ids"] == ["r"], got
        assert got["metadatas"] == [{"region": "eu", "topic": 9}]
        assert await stored_ids(shard_urls) == {"s0": ["r"]}
        await other.delete_collection(NAME)


async def test_an_upsert_whose_record_went_before_its_move_read_it_still_writes(
    shard_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upsert that is to move a record finds, when its move reads the record, that the copy
    it located is gone: another client's update had moved the record there while a third
    client's delete was under way, and then applied that delete to its new copy. The delete
    was done before the upsert began, so the upsert must leave the record present, with its
    value. (Found by the two-process history test, composite policy: the upsert dropped the
    record from its write, an acknowledged upsert lost.)

    Three clients on the real servers; the interleaving is forced by holding, in turn, the
    delete's removal, the update's check for deletes under way and the upsert's read."""
    async with (
        await sharded_chroma.AsyncHttpClient(shards=shard_urls) as deleter,
        await sharded_chroma.AsyncHttpClient(shards=shard_urls) as updater,
        await sharded_chroma.AsyncHttpClient(shards=shard_urls) as upserter,
    ):
        col = await deleter.create_collection(NAME, embedding_function=None, policy=POLICY)
        await col.add(
            ids=["r"], embeddings=[[0.1, 0.2, 0.3]], metadatas=[{"region": "us", "topic": 7}]
        )
        by_update = await updater.get_collection(NAME, embedding_function=None)
        by_upsert = await upserter.get_collection(NAME, embedding_function=None)
        located, saw_delete, upsert_read, update_done = (anyio.Event() for _ in range(4))

        # The delete has located the record on s1 and marked it; it removes it once the update
        # has written its copy to s0 and seen the delete announced.
        remover = deleter._runtime.writer._remover
        remove = remover.remove

        async def held_remove(*args: Any, **kwargs: Any) -> Any:
            if not located.is_set():
                located.set()
                await saw_delete.wait()
            return await remove(*args, **kwargs)

        monkeypatch.setattr(remover, "remove", held_remove)

        # The update goes on (removing its source, applying the delete to its new copy) only
        # once the upsert has located that copy.
        tombstones = updater._runtime.writer._mover._tombstones
        deleting = tombstones.deleting

        async def held_deleting(*args: Any, **kwargs: Any) -> Any:
            found = await deleting(*args, **kwargs)
            if found and not saw_delete.is_set():
                saw_delete.set()
                await upsert_read.wait()
            return found

        monkeypatch.setattr(tombstones, "deleting", held_deleting)

        # The upsert's move reads the copy it located only once the update is done.
        locator = upserter._runtime.writer._mover._locator
        read_records = locator.read_records

        async def held_read(*args: Any, **kwargs: Any) -> Any:
            if not upsert_read.is_set():
                upsert_read.set()
                await update_done.wait()
            return await read_records(*args, **kwargs)

        monkeypatch.setattr(locator, "read_records", held_read)
        spans: dict[str, tuple[float, float]] = {}

        async def delete_then_upsert() -> None:
            spans["delete"] = await timed(lambda: col.delete(ids=["r"]))
            # Moves the record from s0 (where the update put it) to s2.
            spans["upsert"] = await timed(
                lambda: by_upsert.upsert(
                    ids=["r"],
                    embeddings=[[0.9, 0.8, 0.7]],
                    metadatas=[{"region": "ap", "topic": 9}],
                )
            )

        async def update() -> None:
            await located.wait()
            # Moves the record from s1 to s0.
            spans["update"] = await timed(
                lambda: by_update.update(ids=["r"], metadatas=[{"region": "eu"}])
            )
            update_done.set()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(delete_then_upsert)
                tg.start_soon(update)
        assert located.is_set() and saw_delete.is_set() and upsert_read.is_set()
        # The race happened as intended: the update overlapped the delete, and the upsert
        # began after the delete was done (so in every serial order it comes last).
        assert spans["update"][0] < spans["delete"][1] < spans["upsert"][0]
        assert spans["upsert"][0] < spans["update"][1]
        got = await col.get(include=["metadatas"])
        assert got["ids"] == ["r"], got
        assert got["metadatas"] == [{"region": "ap", "topic": 9}]
        assert await stored_ids(shard_urls) == {"s2": ["r"]}
        await deleter.delete_collection(NAME)


async def test_an_upsert_whose_record_moved_before_its_move_read_it_moves_it_from_there(
    shard_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same window with a move instead of a delete: another client moves the record
    between the upsert's look and its move's read. The two overlap, so either order is
    allowed, but the upsert's keys must be in the record in both (the upsert merges over the
    record either way); before, the upsert wrote nothing and its key was lost."""
    async with (
        await sharded_chroma.AsyncHttpClient(shards=shard_urls) as other,
        await sharded_chroma.AsyncHttpClient(shards=shard_urls) as upserter,
    ):
        col = await other.create_collection(NAME, embedding_function=None, policy=POLICY)
        await col.add(
            ids=["r"], embeddings=[[0.1, 0.2, 0.3]], metadatas=[{"region": "us", "topic": 7}]
        )
        by_upsert = await upserter.get_collection(NAME, embedding_function=None)
        reached, moved = anyio.Event(), anyio.Event()
        locator = upserter._runtime.writer._mover._locator
        read_records = locator.read_records

        async def held_read(*args: Any, **kwargs: Any) -> Any:
            if not reached.is_set():
                reached.set()
                await moved.wait()
            return await read_records(*args, **kwargs)

        monkeypatch.setattr(locator, "read_records", held_read)

        async def upsert() -> None:
            # Moves the record from s1 to s0.
            await by_upsert.upsert(
                ids=["r"],
                embeddings=[[0.9, 0.8, 0.7]],
                metadatas=[{"region": "eu", "by": "u", "mark": 1}],
            )

        async def move_away() -> None:
            await reached.wait()
            # Moves the record from s1 to s2 under the upsert.
            await col.upsert(
                ids=["r"], embeddings=[[0.4, 0.5, 0.6]], metadatas=[{"region": "ap", "by": "v"}]
            )
            moved.set()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(upsert)
                tg.start_soon(move_away)
        got = await col.get(include=["metadatas"])
        assert got["ids"] == ["r"], got
        # The other client's move, then this upsert over it (the other order would read
        # region ap, by v, with mark 1 kept).
        assert got["metadatas"] == [{"region": "eu", "by": "u", "mark": 1, "topic": 7}]
        assert await stored_ids(shard_urls) == {"s0": ["r"]}
        await other.delete_collection(NAME)
