"""Concurrent writes to one pool of ids against real servers, checked per id for the ordering
promises: nothing acknowledged is lost, nothing is duplicated, no delete is undone.

Writers (asyncio tasks, threads with their own loops sharing one client, or two processes with
a client each) add, upsert, update and delete random ids of a small shared pool, changing the
routing values (region, user, day) so records move between parts. Each call is timed and its
outcome recorded; afterwards the final state, every part's raw ids and ``count()`` are read and
handed to the history checker (``tests/_history.py``). The regression tests below pin single
races (two moves, delete against move, update against move) and ``add`` of an existing id.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import pickle
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

import sharded_chroma
from sharded_chroma import CompositePolicy, FieldPolicy, HashPolicy, TimePolicy
from tests._history import Op, Value, check

DAY = 86400
T0 = 1_764_115_200  # 2025-11-26T00:00:00Z
REGIONS = ["eu", "us", "ap"]
BASE = "/api/v2/tenants/default_tenant/databases"
# Where a time policy keeps its buckets (see _parts.parts_database).
DATABASES = ["default_database", "default_database.sc-parts"]
NAME = "history"
# A floor on acknowledged writes per run, only so a workload that silently did nothing cannot
# pass; low, because a loaded 2-core machine may do a few hundred or only a few dozen.
MIN_ACKED = 25

# Topology.from_urls names the shards s0, s1, s2 in URL order.
POLICIES: dict[str, Any] = {
    "hash": HashPolicy(),
    "field": FieldPolicy(field="region", partitions={"eu": ("s0",), "us": ("s1",), "ap": ("s2",)}),
    # Two shards per region, so a change of the hash key moves a record within its region too.
    "composite": CompositePolicy(
        field="region",
        partitions={"eu": ("s0", "s1"), "us": ("s1", "s2"), "ap": ("s2", "s0")},
        hash_key="user",
    ),
    # Days 0 and 1 are mapped, days 2 and 3 land in two buckets of the hot shard.
    "time": TimePolicy(
        field="ts", granularity="day", hot="s2", buckets={"2025-11-26": "s0", "2025-11-27": "s1"}
    ),
}


def skip_unless_slow(config: pytest.Config) -> None:
    """The long forms run only when asked for (as in test_replica_property): a plain run of
    the file stays short."""
    if "slow" not in (config.getoption("-m") or "") and not os.environ.get("SHARDED_CHROMA_SLOW"):
        pytest.skip("long form: run with -m slow or SHARDED_CHROMA_SLOW=1")


# -- recording --------------------------------------------------------------------------------


class Log:
    """One writer group's history and the errors its calls raised (appends are atomic, so
    threads may share one)."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.errors: list[str] = []

    async def write(
        self,
        kind: Any,
        ids: tuple[str, ...],
        values: tuple[Value, ...],
        call: Callable[[], Awaitable[Any]],
    ) -> None:
        """Run one write, timed right around the call; a raise is an unknown outcome."""
        start = time.monotonic()
        try:
            await call()
        except Exception as exc:
            self.ops.append(Op(kind, ids, start, time.monotonic(), "unknown", values))
            self.errors.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])
        else:
            self.ops.append(Op(kind, ids, start, time.monotonic(), "ok", values))

    async def read(self, call: Callable[[], Awaitable[Any]]) -> None:
        start = time.monotonic()
        try:
            got = await call()
        except Exception as exc:
            self.errors.append(f"get: {type(exc).__name__}: {exc}"[:300])
            return
        self.ops.append(Op("get", (), start, time.monotonic(), seen=seen(got)))


def seen(got: Any) -> tuple[tuple[str, Value], ...]:
    """A get() result as (id, value) pairs, in the order returned."""
    metas = got["metadatas"] or [None] * len(got["ids"])
    docs = got["documents"] or [None] * len(got["ids"])
    return tuple(
        (rid, Value(dict(m or {}), d)) for rid, m, d in zip(got["ids"], metas, docs, strict=True)
    )


def summary(ops: list[Op], errors: list[str]) -> str:
    kinds = Counter(f"{op.kind}:{op.outcome}" for op in ops)
    shown = Counter(e.split(":")[0] + ":" + e.split(":")[1] for e in errors)
    return f"ops {dict(sorted(kinds.items()))}; errors {dict(shown)}; first: {errors[:3]}"


# Reads remove an older copy beside a newer one only once the newer is this old (seconds): long
# enough for any move of this workload to finish, short enough to settle before the checks.
REPAIR_AFTER = 1.5


def client_for(urls: list[str]) -> Any:
    """A sharded client (awaitable) with this module's read-repair delay."""
    return sharded_chroma.AsyncHttpClient(
        topology=sharded_chroma.Topology.from_urls(urls, repair_after=REPAIR_AFTER)
    )


# -- the random workload ----------------------------------------------------------------------


def pool_of(n: int) -> list[str]:
    return [f"id{i:03d}" for i in range(n)]


def value_of(rng: random.Random, token: str) -> Value:
    """A full record for every policy: each routing field drawn afresh, so writes move it."""
    meta = {
        "w": token,
        "region": rng.choice(REGIONS),
        "user": f"u{rng.randrange(4)}",
        "ts": T0 + rng.randrange(4) * DAY + rng.randrange(DAY),
    }
    return Value(meta, token)


async def one_call(col: Any, rng: random.Random, token: str, pool: list[str], log: Log) -> None:
    """One random call on one or two ids of ``pool``; writes carry ``token`` (and a suffix)."""
    ids = tuple(rng.sample(pool, 1 if rng.random() < 0.8 else 2))
    values = tuple(value_of(rng, f"{token}.{n}") for n in range(len(ids)))
    record = {
        "ids": list(ids),
        "embeddings": [[rng.random() for _ in range(3)] for _ in ids],
        "metadatas": [dict(v.metadata) for v in values],
        "documents": [v.document for v in values],
    }
    roll = rng.random()
    if roll < 0.35:
        await log.write("upsert", ids, values, partial(col.upsert, **record))
    elif roll < 0.5:
        await log.write("add", ids, values, partial(col.add, **record))
    elif roll < 0.7:
        await log.write("update", ids, values, partial(col.update, **record))
    elif roll < 0.85:
        await log.write("delete", ids, (), partial(col.delete, ids=list(ids)))
    elif roll < 0.92:
        await log.read(partial(col.get, ids=list(ids)))
    elif roll < 0.96:
        await log.read(partial(col.get, where={"region": rng.choice(REGIONS)}))
    else:
        await log.read(col.get)


async def writer(col: Any, name: str, pool: list[str], until: float, log: Log) -> None:
    """Random calls on ``pool`` until the monotonic clock passes ``until`` (seeded by name)."""
    rng = random.Random(name)
    for n in itertools.count():
        if time.monotonic() >= until:
            return
        await one_call(col, rng, f"{name}-{n}", pool, log)


async def writers(col: Any, prefix: str, tasks: int, pool: list[str], seconds: float) -> Log:
    """``tasks`` writers on this thread's loop, for ``seconds`` from now."""
    log = Log()
    until = time.monotonic() + seconds
    await asyncio.gather(*(writer(col, f"{prefix}{t}", pool, until, log) for t in range(tasks)))
    return log


# -- reading back -----------------------------------------------------------------------------


async def raw_parts(urls: list[str], cluster_id: str) -> dict[str, list[str]]:
    """Every physical part of the collection on every server and the ids it holds, read with
    plain HTTP (the client's own reads drop duplicate ids, so they cannot show them)."""
    out: dict[str, list[str]] = {}
    for shard, url in enumerate(urls):
        # Loopback only: never through a proxy from the environment.
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http:
            for database in DATABASES:
                listed = await http.get(f"{BASE}/{database}/collections")
                if listed.status_code == 404:
                    continue  # no bucket was ever made on this server
                listed.raise_for_status()
                for col in listed.json():
                    if database == DATABASES[0] and col["name"] != NAME:
                        continue
                    meta = col.get("metadata") or {}
                    # In the companion database only time buckets and a rebuild's
                    # generations hold records (the delete marks live there too, under the
                    # same cluster id).
                    if database != DATABASES[0] and meta.get("_sc_parent") != cluster_id:
                        continue
                    part = meta.get("_sc_bucket") or meta.get("_sc_gen")
                    if database != DATABASES[0] and not part:
                        continue
                    got = await http.post(
                        f"{BASE}/{database}/collections/{col['id']}/get", json={"include": []}
                    )
                    got.raise_for_status()
                    out[f"s{shard}:{database}/{col['name']}"] = got.json()["ids"]
    return out


async def violations(col: Any, urls: list[str], ops: list[Op]) -> tuple[list[str], int, int]:
    """The checker's findings on the final state, ``count()`` and the distinct ids read."""
    final = seen(await col.get(include=["metadatas", "documents"]))
    parts = await raw_parts(urls, str(col.id))
    assert parts, "no part of the collection found on any server"
    count = await col.count()
    return check(ops, final, parts), count, len({rid for rid, _ in final})


def assert_busy(ops: list[Op], errors: list[str]) -> None:
    acked = sum(op.outcome == "ok" and op.kind != "get" for op in ops)
    assert acked >= MIN_ACKED, f"only {acked} acknowledged writes; {summary(ops, errors)}"


def assert_clean(
    found: list[str], count: int, distinct: int, ops: list[Op], errors: list[str]
) -> None:
    # The checker's list first: it names the ids; count() counts a duplicated id twice.
    assert not found, (
        f"{len(found)} violations:\n" + "\n".join(found[:15]) + "\n" + summary(ops, errors)
    )
    assert count == distinct, f"count() {count} != {distinct} distinct ids; {summary(ops, errors)}"


# -- a. one process: tasks and threads sharing one client --------------------------------------


def run_in_one_process(urls: list[str], policy: Any, seconds: float, ids: int) -> None:
    client = asyncio.run(client_for(urls))
    col = asyncio.run(client.create_collection(NAME, embedding_function=None, policy=policy))
    pool = pool_of(ids)
    # Threads run their own loops on the same client, as a sync wrapper would; the main thread
    # runs the most writers. All start within milliseconds of each other.
    with ThreadPoolExecutor(max_workers=3) as threads:
        futures = [
            threads.submit(asyncio.run, writers(col, f"t{t}-", 2, pool, seconds)) for t in range(3)
        ]
        main = asyncio.run(writers(col, "m-", 8, pool, seconds))
        logs = [main, *(f.result() for f in futures)]
    ops = [op for log in logs for op in log.ops]
    errors = [e for log in logs for e in log.errors]
    found, count, distinct = asyncio.run(violations(col, urls, ops))
    asyncio.run(client.aclose())
    assert_busy(ops, errors)
    assert_clean(found, count, distinct, ops, errors)


@pytest.mark.parametrize("kind", list(POLICIES))
def test_tasks_and_threads_keep_per_id_order(shard_urls: list[str], kind: str) -> None:
    run_in_one_process(shard_urls, POLICIES[kind], seconds=5.0, ids=40)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(POLICIES))
def test_tasks_and_threads_keep_per_id_order_long(
    request: pytest.FixtureRequest, shard_urls: list[str], kind: str
) -> None:
    skip_unless_slow(request.config)
    run_in_one_process(shard_urls, POLICIES[kind], seconds=60.0, ids=150)


# -- b. two processes, a client each ------------------------------------------------------------


def process_main(
    urls: list[str], prefix: str, ids: int, seconds: float, out: str, gate: Any
) -> None:
    """A spawned writer process: its own client, writers, then its log pickled to ``out``."""

    async def run() -> Log:
        client = await client_for(urls)
        col = await client.get_collection(NAME, embedding_function=None)
        # Both processes start writing together, after the slow part (imports, client).
        await asyncio.to_thread(gate.wait, 120)
        log = await writers(col, prefix, 5, pool_of(ids), seconds)
        await client.aclose()
        return log

    log = asyncio.run(run())
    Path(out).write_bytes(pickle.dumps((log.ops, log.errors)))


def stop_children(procs: list[Any]) -> None:
    """Kill, by their handles, the writer processes this test started that still run (hung)."""
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()


def gathered(procs: list[Any], outs: list[Path]) -> tuple[list[Op], list[str]]:
    """Every writer process's history and errors, once each exited cleanly."""
    assert [p.exitcode for p in procs] == [0] * len(procs)
    ops: list[Op] = []
    errors: list[str] = []
    for out in outs:
        got_ops, got_errors = pickle.loads(out.read_bytes())
        ops += got_ops
        errors += got_errors
    return ops, errors


def run_in_two_processes(
    urls: list[str], policy: Any, seconds: float, ids: int, tmp_path: Path
) -> None:
    async def create() -> None:
        async with await client_for(urls) as client:
            await client.create_collection(NAME, embedding_function=None, policy=policy)

    asyncio.run(create())
    ctx = multiprocessing.get_context("spawn")
    gate = ctx.Barrier(2)
    outs = [tmp_path / f"p{n}.pickle" for n in range(2)]
    procs = [
        ctx.Process(target=process_main, args=(urls, f"p{n}-", ids, seconds, str(outs[n]), gate))
        for n in range(2)
    ]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join(timeout=seconds + 180)
    finally:
        stop_children(procs)
    ops, errors = gathered(procs, outs)

    async def final() -> tuple[list[str], int, int]:
        async with await client_for(urls) as client:
            col = await client.get_collection(NAME, embedding_function=None)
            # Racing processes may leave an id in two parts; a read that meets one keeps the
            # newest copy and removes the other once the newer copy is REPAIR_AFTER old (so a
            # move under way is left alone), so wait that long, then read once.
            await asyncio.sleep(REPAIR_AFTER)
            await col.get()
            return await violations(col, urls, ops)

    found, count, distinct = asyncio.run(final())
    assert_busy(ops, errors)
    assert_clean(found, count, distinct, ops, errors)


@pytest.mark.parametrize("kind", list(POLICIES))
def test_two_processes_keep_per_id_order(shard_urls: list[str], kind: str, tmp_path: Path) -> None:
    run_in_two_processes(shard_urls, POLICIES[kind], seconds=5.0, ids=40, tmp_path=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(POLICIES))
def test_two_processes_keep_per_id_order_long(
    request: pytest.FixtureRequest, shard_urls: list[str], kind: str, tmp_path: Path
) -> None:
    skip_unless_slow(request.config)
    run_in_two_processes(shard_urls, POLICIES[kind], seconds=60.0, ids=150, tmp_path=tmp_path)


# -- c. single races under a field policy ---------------------------------------------------------


async def field_collection(sharded: Any) -> Any:
    return await sharded.create_collection(NAME, embedding_function=None, policy=POLICIES["field"])


def region_value(token: str, region: str, **extra: Any) -> Value:
    return Value({"w": token, "region": region, **extra}, token)


def upsert(col: Any, log: Log, rid: str, value: Value) -> Awaitable[None]:
    return log.write(
        "upsert",
        (rid,),
        (value,),
        partial(
            col.upsert,
            ids=[rid],
            embeddings=[[0.1, 0.2, 0.3]],
            metadatas=[dict(value.metadata)],
            documents=[value.document],
        ),
    )


@pytest.mark.anyio
async def test_two_racing_moves_leave_one_copy(sharded: Any, shard_urls: list[str]) -> None:
    col = await field_collection(sharded)
    log = Log()
    for n in range(20):
        rid = f"m{n}"
        await upsert(col, log, rid, region_value(f"{rid}-eu", "eu"))
        await asyncio.gather(
            upsert(col, log, rid, region_value(f"{rid}-us", "us")),
            upsert(col, log, rid, region_value(f"{rid}-ap", "ap")),
        )
    found, count, distinct = await violations(col, shard_urls, log.ops)
    assert distinct == 20
    assert_clean(found, count, distinct, log.ops, log.errors)


@pytest.mark.anyio
async def test_add_of_an_existing_id_in_another_region_is_a_no_op(
    sharded: Any, shard_urls: list[str]
) -> None:
    col = await field_collection(sharded)
    await col.add(ids=["a"], embeddings=[[0.1, 0.2, 0.3]], metadatas=[{"region": "eu", "w": "1"}])
    # One server ignores an add of an id it holds; so must the cluster, wherever it would go.
    await col.add(ids=["a"], embeddings=[[0.4, 0.5, 0.6]], metadatas=[{"region": "us", "w": "2"}])
    got = await col.get(include=["metadatas"])
    parts = await raw_parts(shard_urls, str(col.id))
    assert {k: v for k, v in parts.items() if v} == {f"s0:default_database/{NAME}": ["a"]}
    assert got["metadatas"] == [{"region": "eu", "w": "1"}]
    assert await col.count() == 1


@pytest.mark.anyio
async def test_a_delete_racing_a_move_is_never_undone(sharded: Any, shard_urls: list[str]) -> None:
    col = await field_collection(sharded)
    log = Log()
    for n in range(20):
        rid = f"d{n}"
        await upsert(col, log, rid, region_value(f"{rid}-eu", "eu"))
        await asyncio.gather(
            log.write("delete", (rid,), (), partial(col.delete, ids=[rid])),
            upsert(col, log, rid, region_value(f"{rid}-us", "us")),
        )
    found, count, distinct = await violations(col, shard_urls, log.ops)
    assert_clean(found, count, distinct, log.ops, log.errors)
    # Either order is fine: absent, or the moved value; never the old one.
    final = dict(seen(await col.get()))
    assert all(v.token == f"{rid}-us" for rid, v in final.items()), final


@pytest.mark.anyio
async def test_a_delete_racing_a_move_by_update_is_never_undone(
    sharded: Any, shard_urls: list[str]
) -> None:
    col = await field_collection(sharded)
    log = Log()
    for n in range(20):
        rid = f"e{n}"
        await upsert(col, log, rid, region_value(f"{rid}-eu", "eu"))
        # Metadata only (a document would need embeddings, see the serial-order test).
        moved = Value({"w": f"{rid}-us", "region": "us"})
        await asyncio.gather(
            log.write("delete", (rid,), (), partial(col.delete, ids=[rid])),
            log.write(
                "update",
                (rid,),
                (moved,),
                partial(col.update, ids=[rid], metadatas=[dict(moved.metadata)]),
            ),
        )
    found, count, distinct = await violations(col, shard_urls, log.ops)
    assert_clean(found, count, distinct, log.ops, log.errors)
    # An update never creates a record: in either order the delete leaves it absent.
    assert (await col.get(include=[]))["ids"] == []


@pytest.mark.anyio
async def test_an_update_racing_a_move_is_one_serial_order(
    sharded: Any, shard_urls: list[str]
) -> None:
    col = await field_collection(sharded)
    log = Log()
    allowed: dict[str, list[dict[str, Any]]] = {}
    for n in range(20):
        rid = f"u{n}"
        first = region_value(f"{rid}-a", "eu", topic=0, user="x")
        # The update changes no routing value; the upsert moves the record and leaves topic
        # as stored, so an update lost by the move shows as topic 0 under the upsert's token.
        change = Value({"w": f"{rid}-b", "topic": 1}, f"{rid}-b")
        move = region_value(f"{rid}-c", "us")
        await upsert(col, log, rid, first)
        await asyncio.gather(
            log.write(
                "update",
                (rid,),
                (change,),
                # Embeddings given: chromadb would embed a document-only update with its
                # default embedding function (a model download), not what is tested here.
                partial(
                    col.update,
                    ids=[rid],
                    embeddings=[[0.3, 0.2, 0.1]],
                    metadatas=[dict(change.metadata)],
                    documents=[change.document],
                ),
            ),
            upsert(col, log, rid, move),
        )
        base = dict(first.metadata)
        # update then upsert, or upsert then update (each merges its keys over the record).
        allowed[rid] = [
            {**base, **change.metadata, **move.metadata},
            {**base, **move.metadata, **change.metadata},
        ]
    got = await col.get(include=["metadatas"])
    final = dict(zip(got["ids"], got["metadatas"] or [], strict=True))
    wrong = {rid: final.get(rid) for rid in allowed if final.get(rid) not in allowed[rid]}
    assert not wrong, f"not a serial outcome: {wrong}; errors {log.errors[:3]}"
    found, count, distinct = await violations(col, shard_urls, log.ops)
    assert_clean(found, count, distinct, log.ops, log.errors)
