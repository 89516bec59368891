"""Calibrate the Chroma server memory model in ``sharded_chroma/_status.py``.

Run from the repository root: ``python benchmarks/bench_server_memory.py`` (about 12 minutes
on two cores) or ``python benchmarks/bench_server_memory.py --quick`` (about 2 minutes).

The model estimates one server's resident memory as

    rss = idle + per_collection x collections + overhead x records x dimension x 4

The script starts throwaway Chroma servers on loopback (one ``LocalChromaServer`` at a time, each
in a temporary directory, always stopped at the end) and reads each server's ``VmRSS`` from
``/proc/<pid>/status``:

- idle, right after start (one point per server started);
- after creating K empty collections (``--collections``, default 1, 5, 10);
- after loading N records of dimension D into one collection through the sharded client with one
  shard (``--records`` x ``--dims``; each dimension gets a fresh server and its collection is
  filled up to each N in turn);
- optionally (``--small-records``), after creating K collections holding a few records each, to
  show what a collection costs once it has an index.

After each step the script waits until the RSS stops moving, runs a few queries (so the index is
loaded), waits again and takes the median of several samples. It then fits the model's three
constants by least squares (numpy) and prints them next to the constants in ``_status.py``, with
the ratio estimate / measured for every point under the fitted constants, the current constants
and the naive ``records x dimension x 4`` rule.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Lets the script run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _machine
import numpy as np
from _data import make_dataset

import sharded_chroma
from sharded_chroma import _status
from sharded_chroma.testing import LocalChromaServer

MIB = 2**20
ADD_BATCH = 1000
CONFIGURATION: Any = {"hnsw": {"space": "l2"}}
SETTLE_POLL = 0.5  # seconds between RSS reads while waiting for it to settle
SETTLE_WINDOW = 3.0  # RSS must stay within SETTLE_TOLERANCE for this long
SETTLE_TOLERANCE = 1 * MIB
SETTLE_MAX = 60.0
SAMPLES = 5
QUERIES = 5


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


# -- reading a server's memory --------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` plus any child processes it has (a Chroma 1.5 server has none)."""
    total = 0
    for p in [pid, *child_pids(pid)]:
        text = Path(f"/proc/{p}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"no VmRSS in /proc/{p}/status")
        total += int(match.group(1)) * 1024
    return total


def child_pids(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    found.append(int(child))
                    found.extend(child_pids(int(child)))
    return found


async def settled_rss(pid: int) -> tuple[float, float]:
    """Wait until RSS has stayed within SETTLE_TOLERANCE for SETTLE_WINDOW seconds (at most
    SETTLE_MAX), then return the median of SAMPLES reads and the seconds waited."""
    t0 = since = time.monotonic()
    low = high = rss_bytes(pid)
    while time.monotonic() - t0 < SETTLE_MAX:
        await asyncio.sleep(SETTLE_POLL)
        value, now = rss_bytes(pid), time.monotonic()
        low, high = min(low, value), max(high, value)
        if high - low > SETTLE_TOLERANCE:
            # Still moving: start a new window at this reading.
            since, low, high = now, value, value
        elif now - since >= SETTLE_WINDOW:
            break
    waited = time.monotonic() - t0
    samples = []
    for _ in range(SAMPLES):
        samples.append(rss_bytes(pid))
        await asyncio.sleep(SETTLE_POLL)
    return float(statistics.median(samples)), waited


# -- the measurements -----------------------------------------------------------------------


@dataclasses.dataclass
class Point:
    """One measured state of one server."""

    phase: str
    server: int
    collections: int
    records: int
    dim: int
    rss: float  # bytes
    # {name: (records, dimension)} as _status.estimate_server_memory takes it
    contents: dict[str, tuple[int, int | None]]

    @property
    def vector_bytes(self) -> float:
        return float(sum(n * (d or 0) * 4 for n, d in self.contents.values()))

    @property
    def label(self) -> str:
        if self.phase == "idle":
            return "idle"
        if self.phase == "empty":
            return f"{self.collections} empty collection(s)"
        if self.phase == "small":
            n, d = next(iter(self.contents.values()))
            return f"{self.collections} collection(s) of {n} x {d}"
        return f"1 collection, {self.records} x {self.dim}"


async def query_all(client: Any, names: Sequence[str], queries: np.ndarray) -> None:
    for name in names:
        coll = await client.get_collection(name, embedding_function=None)
        if await coll.count():
            for q in queries:
                await coll.query(query_embeddings=q[None, :], n_results=10)


async def add(coll: Any, vectors: np.ndarray, ids: list[str], clusters: np.ndarray) -> None:
    for lo in range(0, len(ids), ADD_BATCH):
        hi = lo + ADD_BATCH
        await coll.add(
            ids=ids[lo:hi],
            embeddings=vectors[lo:hi],
            metadatas=[{"cluster": int(c)} for c in clusters[lo:hi]],
        )


async def measure_point(
    server: LocalChromaServer,
    index: int,
    phase: str,
    contents: dict[str, tuple[int, int | None]],
    records: int = 0,
    dim: int = 0,
) -> Point:
    assert server.pid is not None
    rss, waited = await settled_rss(server.pid)
    point = Point(phase, index, len(contents), records, dim, rss, dict(contents))
    log(f"  server {index}: {point.label:<36} RSS {rss / MIB:8.1f} MiB (settled in {waited:.1f} s)")
    return point


class Run:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.points: list[Point] = []
        self.servers = 0
        self.load_rates: dict[int, float] = {}
        self.loads: list[str] = []
        self.fits: dict[str, Model | None] = {}

    def new_server(self) -> tuple[LocalChromaServer, int]:
        index = self.servers
        self.servers += 1
        server = LocalChromaServer(self.tmp / f"server-{index}")
        server.start()
        assert server.pid is not None
        kids = child_pids(server.pid)
        log(
            f"server {index} pid {server.pid} at {server.url}"
            + (f" (child processes {kids}, counted in its RSS)" if kids else "")
        )
        return server, index

    async def idle(self, server: LocalChromaServer, index: int) -> None:
        self.points.append(await measure_point(server, index, "idle", {}))

    async def empty_collections(self) -> None:
        server, index = self.new_server()
        try:
            await self.idle(server, index)
            client = await sharded_chroma.AsyncHttpClient(shards=[server.url])
            try:
                contents: dict[str, tuple[int, int | None]] = {}
                for k in sorted(self.args.collections):
                    while len(contents) < k:
                        name = f"empty-{len(contents):03d}"
                        await client.create_collection(
                            name, configuration=CONFIGURATION, embedding_function=None
                        )
                        contents[name] = (0, None)
                    self.points.append(await measure_point(server, index, "empty", contents))
            finally:
                await client.aclose()
        finally:
            server.stop()

    async def small_collections(self) -> None:
        n, dim = self.args.small_records, self.args.small_dim
        data = make_dataset(n, dim, QUERIES)
        server, index = self.new_server()
        try:
            await self.idle(server, index)
            client = await sharded_chroma.AsyncHttpClient(shards=[server.url])
            try:
                contents: dict[str, tuple[int, int | None]] = {}
                for k in sorted(self.args.collections):
                    while len(contents) < k:
                        name = f"small-{len(contents):03d}"
                        coll = await client.create_collection(
                            name, configuration=CONFIGURATION, embedding_function=None
                        )
                        await add(coll, data.vectors, data.ids, data.clusters)
                        contents[name] = (n, dim)
                    await query_all(client, list(contents), data.queries)
                    self.points.append(await measure_point(server, index, "small", contents))
            finally:
                await client.aclose()
        finally:
            server.stop()

    async def loaded(self, dim: int) -> None:
        top = max(self.args.records)
        data = make_dataset(top, dim, QUERIES)
        server, index = self.new_server()
        try:
            await self.idle(server, index)
            client = await sharded_chroma.AsyncHttpClient(shards=[server.url])
            try:
                name = f"load-{dim}"
                coll = await client.create_collection(
                    name, configuration=CONFIGURATION, embedding_function=None
                )
                loaded = 0
                adding = 0.0  # seconds spent in add() only, not settling or querying
                for n in sorted(self.args.records):
                    t0 = time.perf_counter()
                    await add(
                        coll, data.vectors[loaded:n], data.ids[loaded:n], data.clusters[loaded:n]
                    )
                    adding += time.perf_counter() - t0
                    loaded = n
                    count = await coll.count()
                    if count != n:
                        raise RuntimeError(f"collection holds {count} records, expected {n}")
                    await self.settle(server)
                    await query_all(client, [name], data.queries)
                    self.points.append(
                        await measure_point(server, index, "loaded", {name: (n, dim)}, n, dim)
                    )
                self.load_rates[dim] = top / adding
                self.loads.append(f"after loading {top} x {dim}: {load_average()}")
            finally:
                await client.aclose()
        finally:
            server.stop()

    async def settle(self, server: LocalChromaServer) -> None:
        assert server.pid is not None
        await settled_rss(server.pid)


# -- fit and report -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Model:
    idle: float
    per_collection: float
    overhead: float
    per_record: float = 0.0

    def estimate(self, point: Point) -> float:
        total = self.idle
        for n, d in point.contents.values():
            total += self.per_collection + self.overhead * n * (d or 0) * 4 + self.per_record * n
        return total


def fit(points: Sequence[Point], *, per_record: bool = False, nonneg: bool = False) -> Model:
    """Least squares over every point of rss = idle + pc x collections + ovh x N x D x 4 (and,
    with ``per_record``, + bytes x N). With ``nonneg``, a term whose coefficient comes out
    negative is dropped (fixed at 0) and the rest refitted, until none is negative."""
    rows = []
    for p in points:
        row = [1.0, float(p.collections), p.vector_bytes]
        if per_record:
            row.append(float(sum(n for n, _ in p.contents.values())))
        rows.append(row)
    a = np.array(rows)
    y = np.array([p.rss for p in points])
    keep = list(range(a.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(a[:, keep], y, rcond=None)
        negative = [k for k, c in zip(keep, coef, strict=True) if k and c < 0]
        if not nonneg or not negative:
            break
        keep.remove(negative[0])
    full = [0.0] * a.shape[1]
    for k, c in zip(keep, coef, strict=True):
        full[k] = float(c)
    return Model(*full)


def marginal(run: Run) -> list[str]:
    """What records and collections add at the margin, read off the measured points."""
    lines: list[str] = []
    points = run.points
    slopes: list[tuple[int, float]] = []  # (dim, bytes per record)
    for dim in run.args.dims:
        loaded = sorted(
            (p for p in points if p.phase == "loaded" and p.dim == dim), key=lambda p: p.records
        )
        if len(loaded) < 2:
            continue
        lo, hi = loaded[-2], loaded[-1]
        per_record = (hi.rss - lo.rss) / (hi.records - lo.records)
        slopes.append((dim, per_record))
        lines.append(
            f"    D={dim}: {lo.records} -> {hi.records} records: +{(hi.rss - lo.rss) / MIB:.1f} MiB"
            f" = {per_record:.0f} B per record = {per_record / (dim * 4):.2f}x of D x 4"
        )
    if len({d for d, _ in slopes}) >= 2:
        a = np.array([[1.0, d * 4.0] for d, _ in slopes])
        b = np.array([v for _, v in slopes])
        (fixed, factor), *_ = np.linalg.lstsq(a, b, rcond=None)
        lines.append(
            f"    => per record about {fixed:.0f} B + {factor:.2f} x D x 4 "
            f"(least squares over the {len(slopes)} dimensions)"
        )
    for phase, what in (("empty", "empty"), ("small", "non-empty")):
        series = sorted((p for p in points if p.phase == phase), key=lambda p: p.collections)
        if not series:
            continue
        idle = next(p.rss for p in points if p.phase == "idle" and p.server == series[0].server)
        first = series[0]
        text = (
            f"    {what} collections: first {first.collections} "
            f"+{(first.rss - idle) / MIB:.1f} MiB over idle"
        )
        if len(series) >= 2:
            last = series[-1]
            each = (last.rss - first.rss) / (last.collections - first.collections)
            text += f", then +{each / MIB:.2f} MiB per further collection"
        if phase == "small":
            n, d = next(iter(first.contents.values()))
            text += f" ({n} x {d} each, {n * d * 4 / MIB:.2f} MiB of raw vectors)"
        lines.append(text)
    return lines


class _SDKModel(Model):
    """The SDK's own estimate, exactly as ``status`` computes it (it charges the
    per-collection cost only for collections that hold records)."""

    def estimate(self, point: Point) -> float:
        return float(_status.estimate_server_memory(dict(point.contents)))


def current_model() -> Model:
    return _SDKModel(
        float(_status.IDLE_BYTES),
        float(_status.PER_COLLECTION_BYTES),
        _status.VECTOR_OVERHEAD,
        float(_status.PER_RECORD_BYTES),
    )


load_average = _machine.load_average


def machine_info() -> dict[str, str]:
    return _machine.machine_info(numpy=np.__version__)


def describe(model: Model) -> str:
    text = (
        f"idle {model.idle / MIB:7.1f} MiB, per collection {model.per_collection / MIB:6.2f} MiB, "
        f"vector overhead {model.overhead:5.2f}x"
    )
    if model.per_record:
        text += f", per record {model.per_record:6.0f} B"
    return text


def report(info: dict[str, str], args: argparse.Namespace, run: Run) -> str:
    points = run.points
    model_points = [p for p in points if p.phase != "small"]
    fitted = fit(model_points)
    fitted_nonneg = fit(model_points, nonneg=True)
    current = current_model()
    fitted_all = fit(points, nonneg=True) if any(p.phase == "small" for p in points) else None
    per_record = fit(model_points, per_record=True, nonneg=True)
    run.fits = {
        "fitted": fitted,
        "fitted_nonneg": fitted_nonneg,
        "fitted_with_small": fitted_all,
        "per_record": per_record,
        "current": current,
    }
    lines = ["", "=" * 100, "Chroma server memory model calibration", "=" * 100]
    lines += [f"  {k}: {v}" for k, v in info.items()]
    lines.append(
        f"  run: collections={','.join(map(str, args.collections))} "
        f"records={','.join(map(str, args.records))} dims={','.join(map(str, args.dims))} "
        f"small={args.small_records}x{args.small_dim} add batch={ADD_BATCH} "
        f"hnsw=defaults (l2) servers={run.servers}"
    )
    lines.append(f"  load average: {'; '.join(run.loads)}")
    lines.append(
        "  load rate (records/s, one shard): "
        + ", ".join(f"D={d}: {r:.0f}" for d, r in run.load_rates.items())
    )
    idles = [p.rss for p in points if p.phase == "idle"]
    lines.append(
        f"  idle RSS over {len(idles)} fresh servers: median {statistics.median(idles) / MIB:.1f} "
        f"MiB (min {min(idles) / MIB:.1f}, max {max(idles) / MIB:.1f})"
    )
    lines.append("")
    lines.append(
        f"  model fitted (least squares over the {len(model_points)} idle/empty/loaded points):"
    )
    lines.append(f"    fitted:               {describe(fitted)}")
    lines.append(f"    fitted, terms >= 0:   {describe(fitted_nonneg)}")
    if fitted_all is not None:
        lines.append(
            f"    fitted incl. small:   {describe(fitted_all)}  (terms >= 0; the points with "
            "small non-empty collections too)"
        )
    lines.append(f"    with a per-record term: {describe(per_record)}  (terms >= 0)")
    lines.append(f"    current _status.py:   {describe(current)}")
    lines.append("")
    lines.append("  marginal costs from the measured points:")
    lines += marginal(run)
    lines.append("")
    header = (
        f"  {'srv':>3}  {'state':<36}{'measured MiB':>13}{'fitted':>9}{'fit>=0':>9}"
        f"{'+small':>9}{'per-rec':>9}{'current':>9}{'NxDx4':>9}{'growth/NxDx4':>14}"
    )
    lines.append("  estimate / measured for each point:")
    lines += [header, "  " + "-" * (len(header) - 2)]
    idle_by_server = {p.server: p.rss for p in points if p.phase == "idle"}
    for p in points:
        naive = f"{p.vector_bytes / p.rss:8.3f}x" if p.vector_bytes else f"{'-':>9}"
        growth = (
            f"{(p.rss - idle_by_server[p.server]) / p.vector_bytes:13.2f}x"
            if p.vector_bytes
            else f"{'-':>14}"
        )
        small = f"{fitted_all.estimate(p) / p.rss:8.3f}x" if fitted_all else f"{'-':>9}"
        lines.append(
            f"  {p.server:>3}  {p.label:<36}{p.rss / MIB:>13.1f}"
            f"{fitted.estimate(p) / p.rss:8.3f}x{fitted_nonneg.estimate(p) / p.rss:8.3f}x"
            f"{small}{per_record.estimate(p) / p.rss:8.3f}x"
            f"{current.estimate(p) / p.rss:8.3f}x{naive}{growth}"
        )
    lines.append("")
    lines.append(
        "  Columns: fitted, fit>=0, +small, per-rec = the fitted models above; current = "
        "_status.py's constants;"
    )
    lines.append(
        "  NxDx4 = the naive rule; growth/NxDx4 = RSS over the same server's idle RSS per raw "
        "vector byte."
    )
    lines.append("=" * 100)
    return "\n".join(lines)


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--collections", type=parse_ints, default=[1, 5, 10], help="K empty collections (1,5,10)"
    )
    p.add_argument(
        "--records", type=parse_ints, default=[10_000, 40_000, 80_000], help="N (10000,40000,80000)"
    )
    p.add_argument("--dims", type=parse_ints, default=[128, 384], help="D (128,384)")
    p.add_argument(
        "--small-records",
        type=int,
        default=1000,
        help="records per collection in the small-collections series (1000; 0 to skip)",
    )
    p.add_argument("--small-dim", type=int, default=128, help="their dimension (128)")
    p.add_argument("--quick", action="store_true", help="smoke run, about 2 minutes")
    p.add_argument("--json", metavar="PATH", help="also write every point and fit here")
    args = p.parse_args(argv)
    if args.quick:
        args.collections, args.records, args.dims = [1, 5], [2000, 5000], [64, 128]
        args.small_records = 200
    for name in ("collections", "records", "dims"):
        values = getattr(args, name)
        if not values or any(v < 1 for v in values):
            p.error(f"--{name} needs positive integers")
    if args.small_records < 0 or args.small_dim < 1:
        p.error("--small-records must be >= 0 and --small-dim >= 1")
    return args


async def run_all(args: argparse.Namespace, tmp: Path) -> tuple[str, dict[str, Any]]:
    info = machine_info()
    for key, value in info.items():
        log(f"{key}: {value}")
    run = Run(args, tmp)
    log("empty collections")
    await run.empty_collections()
    run.loads.append(f"after empty collections: {load_average()}")
    if args.small_records:
        log(f"collections of {args.small_records} x {args.small_dim} records")
        await run.small_collections()
        run.loads.append(f"after small collections: {load_average()}")
    for dim in args.dims:
        log(f"one collection of dimension {dim}, filled to {', '.join(map(str, args.records))}")
        await run.loaded(dim)
    text = report(info, args, run)
    raw = {
        "machine": info,
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "points": [dataclasses.asdict(p) for p in run.points],
        "fits": {k: dataclasses.asdict(m) if m else None for k, m in run.fits.items()},
        "load_rates": run.load_rates,
    }
    return text, raw


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_server_memory_") as tmp:
        # Every server is stopped in a finally block right after its series; LocalChromaServer
        # also kills anything still running when the interpreter exits.
        text, raw = asyncio.run(run_all(args, Path(tmp)))
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
    log(f"done in {time.perf_counter() - started:.0f} s; load average {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
