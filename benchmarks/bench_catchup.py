"""Measure how fast a recovered replica catches up from the hint log while writes continue.

Run from the repository root: ``python benchmarks/bench_catchup.py`` (about 2-3 minutes on two
cores), ``python benchmarks/bench_catchup.py --quick`` (a smoke run under a minute), or longer
with e.g. ``--rounds 5 --cut 10 --rates 50,200,400``.

The script starts two Chroma servers on loopback in a temporary directory (the hint log lives
there too) and builds one shard: server 0 is the primary, server 1 the replica, reached through
the test suite's ``FaultProxy`` (run in a child process, so its forwarding does not share this
process's GIL with the writer and the replayer). One client (``write_concern="one"``, the
background catch-up replayer at its defaults) runs a writer loop: single-record upserts over a
pool of ids, paced to a target rate (``--rates``, open loop, at most ``--inflight`` at once).
Before the rounds, a one-second warm-up cut captures one hinted body. Per round and rate:

1. the writer runs ``--settle`` seconds with both copies up;
2. the proxy cuts the replica for ``--cut`` seconds: its writes go to the hint log (the backlog
   is the pending hint count at the restore); meanwhile the loaded floor (below) runs;
3. the proxy restores the replica while the writer goes on; the catch-up time runs until the
   replica has no pending hint and is not behind (polled every ``--poll`` seconds), at most
   ``--drain-timeout`` seconds. Every write during the drain is hinted too (a copy that is
   behind gets new writes in the log, not directly), so the replayer must outpace them:
   *gross* drain rate = hints applied / time (the backlog and the writes that arrived during
   the drain: the hints the log acknowledged), *net* = (applied - arrived) / time, the backlog
   worked off. The replayer merges runs of hints into one request, so the upserts the
   replica's transport sent (while it is behind only the replayer writes to it) are shown
   beside it as requests. The time
   includes the wait for the replayer's first request (it probes a silent copy every
   ``replay_probe`` seconds), reported on its own with the time to the first acknowledged
   batch. A timed-out round then stops the writer and times the rest.

The baseline, measured in every round in the same run: a bare ``aiohttp`` session posting the
very body the client hinted (one record, the same columns and hidden metadata; the id varies
over the pool) to a collection of its own on the replica's server, straight to its REST API,
one request at a time, as the replayer sends them. Three variants: the upsert POST alone
(the floor), the replayer's pair per hint (a ``/get`` of the record's version, then the upsert)
direct, and the same pair through the proxy (the path the replayer takes); plus the upsert POST
with 8 in flight (what the node takes with concurrency, which the replayer does not use).
These four run between rounds, with no writer. The loaded floor is the direct get+post pair
again, run during each cut (the writer going on, the replica's server otherwise idle, as it is
in the drain but for the replay): what the node takes for the replay's requests under that
round's load. Ratios are per round (same round's floor), shown as median [min-max].
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import logging
import math
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Lets the script run from a checkout without installing the package; the fault proxy is the
# test suite's (tests/_proxy.py), which needs nothing beyond the standard library.
_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_ROOT / "benchmarks"))
sys.path.insert(0, str(_ROOT / "tests"))

import _machine  # noqa: E402
import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402
from _proxy import FaultProxy  # noqa: E402
from _stats import alternate, log, med, paired_ratios, spread  # noqa: E402

import sharded_chroma  # noqa: E402
from sharded_chroma.testing import LocalCluster  # noqa: E402

COLLECTION = "catchup_bench"
FLOOR_COLLECTION = "catchup_floor"
CONFIGURATION: Any = {"hnsw": {"space": "l2"}}
API = "/api/v2/tenants/default_tenant/databases/default_database/collections"
FLOOR_MODES = ("post x1", "get+post x1", "get+post x1 via proxy", "post x8")


# -- the fault proxy, in a process of its own ------------------------------------------------


def _proxy_child(host: str, port: int, conn: Any) -> None:
    with FaultProxy(host, port) as proxy:
        conn.send(proxy.port)
        while True:
            command = conn.recv()
            if command == "stop":
                break
            if command == "bytes_up":
                conn.send(proxy.bytes_up)
            else:
                getattr(proxy, command)()
                conn.send(None)


class ProxyProcess:
    """The test suite's ``FaultProxy`` run in a child process and driven over a pipe: in
    this process its forwarding would share the GIL with the writer and the replayer."""

    def __init__(self, host: str, port: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_proxy_child, args=(host, port, child), daemon=True)
        self._proc.start()
        if not self._conn.poll(60):
            self.stop()
            raise RuntimeError("the proxy process did not start")
        self.port = int(self._conn.recv())
        self.url = f"http://127.0.0.1:{self.port}"

    def _call(self, command: str) -> Any:
        self._conn.send(command)
        return self._conn.recv()

    def cut(self) -> None:
        self._call("cut")

    def restore(self) -> None:
        self._call("restore")

    def reset_counters(self) -> None:
        self._call("reset_counters")

    @property
    def bytes_up(self) -> int:
        return int(self._call("bytes_up"))

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self._conn.send("stop")
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)


# -- the writer ------------------------------------------------------------------------------


class Writer:
    """Single-record upserts paced to ``rate`` per second (open loop, at most ``inflight``
    at once); completion times are kept so writes can be counted over any interval."""

    def __init__(
        self, collection: Any, ids: list[str], vectors: np.ndarray, rate: float, inflight: int
    ) -> None:
        self._col = collection
        self._ids = ids
        self._vectors = vectors
        self._rate = rate
        self._sem = asyncio.Semaphore(inflight)
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self.done: list[float] = []
        self.errors = 0
        self.started = 0.0

    def start(self, first: int) -> None:
        self._task = asyncio.create_task(self._run(first))

    async def _run(self, first: int) -> None:
        self.started = t0 = time.perf_counter()
        n = 0
        while not self._stop.is_set():
            ahead = t0 + n / self._rate - time.perf_counter()
            if ahead > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), ahead)
                if self._stop.is_set():
                    break
            await self._sem.acquire()
            task = asyncio.create_task(self._one(first + n))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            n += 1

    async def _one(self, n: int) -> None:
        k = n % len(self._ids)
        try:
            await self._col.upsert(
                ids=[self._ids[k]], embeddings=self._vectors[k : k + 1], metadatas=[{"n": n}]
            )
            self.done.append(time.perf_counter())
        except Exception as exc:
            self.errors += 1
            if self.errors <= 3:
                log(f"  write failed: {type(exc).__name__}: {exc}")
        finally:
            self._sem.release()

    async def stop(self) -> int:
        """Stop issuing, wait for the writes in flight; how many were issued."""
        self._stop.set()
        if self._task is not None:
            await self._task
        if self._tasks:
            await asyncio.gather(*list(self._tasks))
        return len(self.done) + self.errors

    def between(self, a: float, b: float) -> int:
        return bisect.bisect_right(self.done, b) - bisect.bisect_right(self.done, a)


# -- one cut-and-catch-up round --------------------------------------------------------------


@dataclass
class Drain:
    rate: float
    achieved: float = 0.0
    """Completed writes per second over the whole round (settle, cut and drain)."""
    backlog: int = 0
    """Pending hints of the replica at the restore."""
    cut_writes: int = 0
    """Writes completed during the cut."""
    seconds: float = float("nan")
    """Restore until the replica has no pending hint and is not behind (nan: timed out)."""
    first_request: float = float("nan")
    """Restore until the first byte reached the replica (the replayer's first try: nothing
    else sends it anything while it is behind)."""
    first_ack: float = float("nan")
    """Restore until the pending count first fell (the first acknowledged batch of 200)."""
    arrived: int = 0
    """Writes completed during the drain (each was hinted, the copy being behind)."""
    left: int = 0
    """Pending hints when the drain ended (0 unless it timed out)."""
    replayed: int | None = None
    """The background replayer's own count of hints applied over the drain, when known."""
    quiet_seconds: float = 0.0
    """After a timed-out drain: the time the rest took with the writer stopped."""
    errors: int = 0
    timeout: float = 0.0
    loaded_floor: float = float("nan")
    """The floor's get+post pair, direct to the replica's server, during the cut (the writer
    running, the replica idle but for it): what the node takes under this round's load."""

    @property
    def caught_up(self) -> bool:
        return not math.isnan(self.seconds)

    @property
    def elapsed(self) -> float:
        return self.seconds if self.caught_up else self.timeout

    sent: int = 0
    quiet_sent: int = 0
    """Upserts the replayer sent the replica during the drain (counted at the replica's
    transport: while it is behind nothing else writes to it), one per hint applied."""

    @property
    def acked(self) -> int:
        """Hints acknowledged over the drain (the log's count moves per batch of 200)."""
        return self.backlog + self.arrived - self.left

    @property
    def applied(self) -> int:
        """Hints applied: the log's acknowledgements (requests can carry many hints each)."""
        return self.acked

    @property
    def gross(self) -> float:
        return self.applied / self.elapsed if self.elapsed > 0 else float("nan")

    @property
    def net(self) -> float:
        """Backlog worked off per second: applied minus what arrived meanwhile."""
        return (self.applied - self.arrived) / self.elapsed if self.elapsed > 0 else float("nan")

    @property
    def arrival_rate(self) -> float:
        """Writes per second during the drain (each one a new hint)."""
        return self.arrived / self.elapsed if self.elapsed > 0 else float("nan")

    @property
    def gross_after_first(self) -> float:
        """Gross rate from the replayer's first request on (the probe wait left out)."""
        span = self.elapsed - self.first_request
        return self.applied / span if span > 0 else float("nan")

    @property
    def quiet_rate(self) -> float:
        """After a timed-out drain: hints per second with no more arriving."""
        return self.quiet_sent / self.quiet_seconds if self.quiet_seconds > 0 else float("nan")

    @property
    def behind_by(self) -> int:
        """Hints not yet applied when the drain ended (0 unless it timed out)."""
        return self.backlog + self.arrived - self.sent


@dataclass
class Bench:
    client: Any
    collection: Any
    proxy: ProxyProcess
    replica_url: str
    ids: list[str]
    vectors: np.ndarray
    args: argparse.Namespace
    written: int = 0
    upserts: int = 0

    @property
    def cluster(self) -> Any:
        return self.client._runtime.cluster

    async def pending(self) -> int:
        return (await self.cluster.pending_hints()).get(self.replica_url, 0)

    def behind(self) -> bool:
        states = self.cluster.node_states
        states.refresh()
        return bool(states.get(self.replica_url).behind)

    def replayed(self) -> int:
        catch_up = self.cluster.catch_up
        return int(catch_up.replayed) if catch_up is not None else 0

    def count_upserts(self) -> None:
        """Count the upserts sent to the replica's node (the replayer's, in its own thread)."""
        transport = self.cluster.shards["s0"].node(self.replica_url).transport
        request = transport.request

        async def counted(method: str, path: str, **kwargs: Any) -> Any:
            answer = await request(method, path, **kwargs)
            if method == "POST" and path.endswith("/upsert"):
                self.upserts += 1
            return answer

        transport.request = counted

    async def wait_caught_up(
        self, timeout: float, on_poll: Callable[[int], None] | None = None
    ) -> bool:
        """Poll until the replica has no pending hint and is not behind; False on timeout."""
        deadline = time.perf_counter() + timeout
        while True:
            n = await self.pending()
            if on_poll is not None:
                on_poll(n)
            if n == 0 and not self.behind():
                return True
            if time.perf_counter() >= deadline:
                return False
            await asyncio.sleep(self.args.poll)

    async def settle_replayer(self) -> int | None:
        """Once the drain has ended, wait (briefly) for the replayer's call to return so its
        counter includes the drain; None if it did not within a second."""
        node = self.cluster.shards["s0"].node(self.replica_url)
        for _ in range(100):
            if not node.replay_lock.locked():
                await asyncio.sleep(0.02)
                return self.replayed()
            await asyncio.sleep(0.01)
        return None

    async def capture_body(self) -> bytes:
        """Cut the replica for a second under a slow writer and keep one hinted body (the
        exact bytes the client posts for one record), then let the replica catch up."""
        writer = Writer(self.collection, self.ids, self.vectors, 20.0, self.args.inflight)
        writer.start(self.written)
        self.proxy.cut()
        await asyncio.sleep(1.0)
        hints = self.cluster.hints.pending(self.replica_url, 1)
        self.proxy.restore()
        self.written += await writer.stop()
        if not hints:
            raise RuntimeError("no hint was written while the replica was cut")
        if not await self.wait_caught_up(60.0):
            raise RuntimeError("the replica did not catch up after the warm-up cut")
        return bytes(hints[0].body)

    async def round(
        self, rate: float, during_cut: Callable[[float], Awaitable[float]] | None = None
    ) -> Drain:
        """One cut and catch-up at ``rate``; ``during_cut(seconds)`` runs while the replica
        is cut (its result kept as ``loaded_floor``)."""
        args = self.args
        out = Drain(rate=rate, timeout=args.drain_timeout)
        if not await self.wait_caught_up(60.0):
            raise RuntimeError("the replica did not catch up before the round")
        writer = Writer(self.collection, self.ids, self.vectors, rate, args.inflight)
        writer.start(self.written)
        await asyncio.sleep(args.settle)
        self.proxy.cut()
        t_cut = time.perf_counter()
        if during_cut is not None:
            await asyncio.sleep(0.25 * args.cut)
            out.loaded_floor = await during_cut(0.6 * args.cut)
        await asyncio.sleep(max(0.0, t_cut + args.cut - time.perf_counter()))
        out.backlog = await self.pending()
        replayed0, upserts0 = self.replayed(), self.upserts
        self.proxy.reset_counters()
        self.proxy.restore()
        t_restore = time.perf_counter()
        out.cut_writes = writer.between(t_cut, t_restore)
        last = [out.backlog]

        def on_poll(n: int) -> None:
            now = time.perf_counter() - t_restore
            if math.isnan(out.first_request) and self.proxy.bytes_up > 0:
                out.first_request = now
            if math.isnan(out.first_ack) and n < last[0]:
                out.first_ack = now
            last[0] = n

        ok = await self.wait_caught_up(args.drain_timeout, on_poll)
        t_end = time.perf_counter()
        if ok:
            out.seconds = t_end - t_restore
        else:
            out.left = await self.pending()
        out.arrived = writer.between(t_restore, t_end)
        out.sent = self.upserts - upserts0
        issued = await writer.stop()
        self.written += issued
        out.errors = writer.errors
        out.achieved = len(writer.done) / (time.perf_counter() - writer.started)
        if ok:
            now = await self.settle_replayer()
            out.replayed = None if now is None else now - replayed0
        else:
            t0, upserts1 = time.perf_counter(), self.upserts
            if not await self.wait_caught_up(120.0):
                raise RuntimeError("the replica did not catch up with the writer stopped")
            out.quiet_seconds = time.perf_counter() - t0
            out.quiet_sent = self.upserts - upserts1
        return out


def describe(d: Drain) -> str:
    """One round's figures on one progress line."""
    if d.caught_up:
        end = (
            f"caught up in {d.seconds:.2f} s (first request {d.first_request:.2f} s, "
            f"first ack {d.first_ack:.2f} s)"
        )
    else:
        end = (
            f"NOT caught up in {d.timeout:g} s ({d.behind_by} behind, drained in "
            f"{d.quiet_seconds:.1f} s more without writes)"
        )
    counted = f", replayer counted {d.replayed}" if d.replayed is not None else ""
    return (
        f"achieved {d.achieved:.1f}/s, backlog {d.backlog} ({d.cut_writes} cut writes), {end}, "
        f"{d.arrived} arrived, {d.acked} applied in {d.sent} requests, gross {d.gross:.0f}/s "
        f"net {d.net:.0f}/s{counted}"
    )


# -- the floor: bare aiohttp straight to the replica's server --------------------------------


def floor_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=30),
        timeout=aiohttp.ClientTimeout(total=30),
    )


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> Any:
    headers = {"Content-Type": "application/json"}
    async with session.post(url, data=body, headers=headers) as resp:
        raw = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"POST {url}: {resp.status} {raw[:200]!r}")
        return orjson.loads(raw)


class Floor:
    """Upserts of the hinted body's shape into a collection of its own on one server."""

    def __init__(self, template: bytes, ids: list[str], base: str, via_proxy: str) -> None:
        self._template = orjson.loads(template)
        self._ids = ids
        self._base = base
        self._via_proxy = via_proxy
        self._n = 10**9  # far above the client's versions; only the shape matters here
        self.collection_id = ""

    def body(self, ks: Sequence[int]) -> bytes:
        """The template's record under the ids of ``ks`` (its integers renumbered)."""
        body = dict(self._template)
        body["ids"] = [self._ids[k % len(self._ids)] for k in ks]
        for name in ("embeddings", "documents", "uris"):
            if isinstance(body.get(name), list):
                body[name] = body[name][:1] * len(ks)
        metas = body.get("metadatas")
        if isinstance(metas, list) and metas and isinstance(metas[0], dict):
            body["metadatas"] = []
            for _ in ks:
                self._n += 1
                meta = dict(metas[0])
                for key, value in meta.items():
                    if isinstance(value, int) and not isinstance(value, bool):
                        meta[key] = self._n
                body["metadatas"].append(meta)
        return orjson.dumps(body)

    async def create(self, session: aiohttp.ClientSession) -> None:
        got = await post(
            session,
            self._base + API,
            orjson.dumps(
                {"name": FLOOR_COLLECTION, "configuration": CONFIGURATION, "get_or_create": True}
            ),
        )
        self.collection_id = got["id"]
        # The pool exists first, as it does in the client's collection: upserts are updates.
        for start in range(0, len(self._ids), 500):
            ks = range(start, min(start + 500, len(self._ids)))
            await post(session, self._url(self._base, "upsert"), self.body(ks))

    def _url(self, base: str, verb: str) -> str:
        return f"{base}{API}/{self.collection_id}/{verb}"

    async def run(self, session: aiohttp.ClientSession, mode: str, seconds: float) -> float:
        """Upserts per second for ``seconds`` in ``mode`` (one of FLOOR_MODES)."""
        base = self._via_proxy if mode.endswith("via proxy") else self._base
        upsert, get = self._url(base, "upsert"), self._url(base, "get")
        paired = mode.startswith("get+post")
        workers = 8 if mode.endswith("x8") else 1
        count = 0
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < stop_at:
                k = count
                count += 1
                body = self.body([k])
                if paired:
                    query = {"ids": [self._ids[k % len(self._ids)]], "include": ["metadatas"]}
                    await post(session, get, orjson.dumps(query))
                await post(session, upsert, body)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        return count / (time.perf_counter() - t0)


# -- driver ----------------------------------------------------------------------------------


async def run(
    cluster: LocalCluster, proxy: ProxyProcess, hints: Path, args: argparse.Namespace
) -> str:
    info = _machine.machine_info(aiohttp=aiohttp.__version__)
    primary, replica = cluster.servers
    rng = np.random.default_rng(20261202)
    ids = [f"id-{i:05d}" for i in range(args.pool)]
    vectors = rng.standard_normal((args.pool, args.dim), dtype=np.float32)
    drains: dict[float, list[Drain]] = {r: [] for r in args.rates}
    floors: dict[str, list[float]] = {m: [] for m in FLOOR_MODES}
    topology = sharded_chroma.Topology.build(
        {
            "shards": [{"name": "s0", "primary": primary.url, "replicas": [proxy.url]}],
            "replication": {"hints_dir": str(hints), "write_concern": "one"},
        }
    )
    client = await sharded_chroma.AsyncHttpClient(topology=topology)
    try:
        col = await client.create_collection(
            COLLECTION, configuration=CONFIGURATION, embedding_function=None
        )
        for start in range(0, args.pool, 500):
            await col.upsert(
                ids=ids[start : start + 500],
                embeddings=vectors[start : start + 500],
                metadatas=[{"n": -1}] * len(ids[start : start + 500]),
            )
        log(f"pool of {args.pool} ids x {args.dim} dims loaded on both copies")
        bench = Bench(client, col, proxy, proxy.url, ids, vectors, args)
        bench.count_upserts()
        rc = client._runtime.cluster.replication
        settings = (
            f"replay_interval={rc.replay_interval} replay_probe={rc.replay_probe} "
            f"replay_rate={rc.replay_rate} write_grace={rc.write_grace}"
        )
        body = await bench.capture_body()
        async with floor_session() as session:
            floor = Floor(body, ids, replica.url, proxy.url)
            await floor.create(session)

            async def loaded(seconds: float) -> float:
                return await floor.run(session, "get+post x1", seconds)

            log("warm-up cut done; floor collection loaded on the replica's server")
            for r in range(args.rounds):
                for rate in alternate(list(args.rates), r):
                    d = await bench.round(rate, loaded if args.loaded_floor else None)
                    drains[rate].append(d)
                    log(f"  round {r + 1} rate {rate:g}/s: {describe(d)}")
                for mode in alternate(list(FLOOR_MODES), r):
                    v = await floor.run(session, mode, args.floor_seconds)
                    floors[mode].append(v)
                    log(f"  round {r + 1} floor {mode:<22} {v:8.1f} upserts/s")
    finally:
        await client.aclose()
    template = orjson.loads(body)
    shape = {
        k: (len(v[0]) if k == "embeddings" else v) if isinstance(v, list) else v
        for k, v in template.items()
        if k != "ids"
    }
    return report(info, args, settings, shape, drains, floors)


def rspread(num: Sequence[float], den: Sequence[float]) -> str:
    """Per-round ratios as median [min-max], rounds without both figures left out."""
    return spread([r for r in paired_ratios(num, den) if not math.isnan(r)])


def fmt(values: Sequence[float], spec: str = ".0f") -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "n/a"
    m = format(med(vals), spec)
    if len(vals) == 1:
        return m
    return f"{m} [{format(min(vals), spec)}-{format(max(vals), spec)}]"


def report(
    info: dict[str, str],
    args: argparse.Namespace,
    settings: str,
    shape: dict[str, Any],
    drains: dict[float, list[Drain]],
    floors: dict[str, list[float]],
) -> str:
    lines = ["", "=" * 78, "Results: median [min-max] over rounds", "=" * 78]
    lines += [f"  {k}: {v}" for k, v in info.items()]
    lines.append("  load average at end: " + _machine.load_average())
    lines.append(
        f"  run: rates={','.join(f'{r:g}' for r in args.rates)}/s rounds={args.rounds} "
        f"settle={args.settle}s cut={args.cut}s drain_timeout={args.drain_timeout}s "
        f"pool={args.pool} dim={args.dim} inflight={args.inflight} poll={args.poll}s "
        f"floor_seconds={args.floor_seconds}"
    )
    lines.append(f"  client: write_concern=one, {settings}")
    lines.append(f"  hinted body (also the floor's): {shape}")

    post1 = floors["post x1"]
    lines += [
        "",
        "Baseline: bare aiohttp to the replica's server, single-record upserts/s",
        f"  {'mode':<24}{'upserts/s':>26}{'/ post x1':>22}",
    ]
    for mode in FLOOR_MODES:
        lines.append(
            f"  {mode:<24}{fmt(floors[mode], '.1f'):>26}{rspread(floors[mode], post1):>22}"
        )

    lines += ["", "Catch-up after a cut, writes continuing (times in s, rates in hints/s)"]
    for rate, ds in drains.items():
        ok = sum(d.caught_up for d in ds)
        gross = [d.gross for d in ds]
        lines += [
            "",
            f"  target write rate {rate:g}/s: caught up in {ok} of {len(ds)} rounds "
            f"(timeout {args.drain_timeout:g} s)",
            f"    achieved write rate          {fmt([d.achieved for d in ds], '.1f')}"
            + (
                f"  (write errors {sum(d.errors for d in ds)})" if sum(d.errors for d in ds) else ""
            ),
            f"    backlog at restore (hints)   {fmt([d.backlog for d in ds])}"
            f"  (writes during the cut {fmt([d.cut_writes for d in ds])})",
            f"    time to catch up             {fmt([d.seconds for d in ds], '.2f')}",
            f"    time to first request        {fmt([d.first_request for d in ds], '.2f')}"
            "  (the probe wait)",
            f"    time to first acked batch    {fmt([d.first_ack for d in ds], '.2f')}",
            f"    hints arrived during drain   {fmt([d.arrived for d in ds])}"
            f"  (arrival rate {fmt([d.arrival_rate for d in ds], '.1f')}/s)",
            f"    hints applied (gross)        {fmt([d.applied for d in ds])}"
            f"  (in requests {fmt([d.sent for d in ds])}"
            + (
                f", replayer's count {fmt([d.replayed for d in ds if d.replayed is not None])})"
                if any(d.replayed is not None for d in ds)
                else ")"
            ),
            f"    drain rate net               {fmt([d.net for d in ds])}",
            f"    drain rate gross             {fmt(gross)}",
            f"    gross from first request on  {fmt([d.gross_after_first for d in ds])}",
            f"    gross / arrival rate         {rspread(gross, [d.arrival_rate for d in ds])}",
            f"    gross / target write rate    {spread([g / rate for g in gross])}",
            f"    gross / floor post x1        {rspread(gross, post1)}",
            f"    gross / floor get+post proxy {rspread(gross, floors['get+post x1 via proxy'])}",
            f"    floor get+post x1 during cut {fmt([d.loaded_floor for d in ds], '.1f')}"
            "  (writer running)",
            f"    gross / that loaded floor    {rspread(gross, [d.loaded_floor for d in ds])}",
        ]
        if ok < len(ds):
            lines.append(
                f"    timed-out rounds: {fmt([d.behind_by for d in ds if not d.caught_up])} hints "
                f"behind, drained in {fmt([d.quiet_seconds for d in ds if not d.caught_up], '.1f')}"
                f" s with the writer stopped ({fmt([d.quiet_rate for d in ds if not d.caught_up])}"
                " hints/s)"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    p.add_argument("--rates", default="20,50,200", help="target write rates, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settle", type=float, default=1.0, help="seconds of writes before a cut")
    p.add_argument("--cut", type=float, default=4.0, help="seconds the replica is cut")
    p.add_argument("--drain-timeout", type=float, default=10.0)
    p.add_argument("--pool", type=int, default=1000, help="ids the writer upserts over")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--inflight", type=int, default=32, help="most writes in flight at once")
    p.add_argument("--poll", type=float, default=0.02, help="pending-hint poll interval (s)")
    p.add_argument(
        "--no-loaded-floor",
        dest="loaded_floor",
        action="store_false",
        help="skip the get+post floor measured during each cut",
    )
    p.add_argument("--verbose", action="store_true", help="show the client's warnings")
    p.add_argument("--floor-seconds", type=float, default=1.0, help="per floor variant")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.cut, args.floor_seconds, args.pool = 1, 2.0, 1.0, 200
        args.drain_timeout = 8.0
    args.rates = [float(x) for x in str(args.rates).split(",") if x.strip()]
    if not args.rates or min(args.rates) <= 0:
        p.error("--rates needs positive numbers")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        # Every write and replay attempt during a cut warns; the counts are in the report.
        logging.getLogger("sharded_chroma").setLevel(logging.ERROR)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_catchup_") as tmp:
        cluster = LocalCluster(2, Path(tmp) / "servers")
        log("starting 2 local chroma servers")
        # LocalCluster.start stops whatever it started if a server fails; the with-block
        # stops both servers (by pid) when the benchmark ends, on error or Ctrl-C too.
        with cluster:
            log(f"servers: {', '.join(cluster.urls)}")
            replica = cluster.servers[1]
            proxy = ProxyProcess(replica.host, replica.port)
            try:
                text = asyncio.run(run(cluster, proxy, Path(tmp) / "hints", args))
            finally:
                proxy.stop()
    print(text)
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
