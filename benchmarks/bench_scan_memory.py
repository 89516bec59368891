"""Client memory of ``ShardedCollection.scan()`` (and, with ``--export``, of
``export_collection``) against one ``get()`` of the whole collection.

Run from the repository root: ``python benchmarks/bench_scan_memory.py`` (100,000 x 384 records
over 3 local shards; about 15 minutes on a quiet two-core machine and about an hour on a busy
one, most of it in the tracemalloc runs) or ``python benchmarks/bench_scan_memory.py --quick``
(10,000 records, a few minutes).

The script starts its own Chroma servers on loopback in a temporary directory and loads
deterministic clustered vectors (``benchmarks/_data.py``) through the sharded client, with one
metadata field and a short document per record. Every measurement then runs in a fresh child
process (so memory freed by an earlier measurement cannot hide the next one's growth), which
connects, warms up with a tiny get() and scan(), and then either

- iterates ``collection.scan(batch_size=B)`` over every record, or
- does one ``collection.get()`` of every record (the baseline, which holds the whole result),

both with ``include=["embeddings", "metadatas", "documents"]``. It reports

- the peak Python heap during the operation (``tracemalloc``, peak minus the level before; numpy
  buffers are traced too), in a run with tracing on, and
- the peak RSS growth (``VmHWM`` after minus ``VmRSS`` before, from ``/proc/self/status``; the
  high-water mark is reset through ``/proc/self/clear_refs`` first), in a run with tracing off,
  since tracemalloc's own bookkeeping would inflate RSS.

Each child writes the ids it saw to a file; the parent checks that every scan returned each id
exactly once and in the same order as ``get()``. To show that the scan's peak follows the batch
size and not the collection size, one batch size and the full get() are also measured while
only part of the records is loaded (a quarter and a half by default).

Chroma 1.5.9 refuses a get() that matches more than 32766 records on one server ("too many SQL
variables", chroma-core/chroma pull request 7687); 100,000 records over 3 shards is just past
that, so the get() at full size is expected to fail. The script records the failure and then
compares with the largest size where get() worked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import itertools
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

# Lets the script run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _machine
import numpy as np
from _data import Dataset, make_dataset

import sharded_chroma
from sharded_chroma.testing import LocalCluster

COLLECTION = "scan_memory"
CONFIGURATION: Any = {"hnsw": {"space": "l2"}}
INCLUDE: Any = ["embeddings", "metadatas", "documents"]
MIB = 2**20
CHILD_TIMEOUT = 3600.0


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


def document(record_id: str, cluster: int) -> str:
    return f"{record_id} cluster {cluster}"


# -- child: one measurement in a fresh process ----------------------------------------------


def proc_status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{field} not found in /proc/self/status")
    return int(match.group(1))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclasses.dataclass
class Tally:
    """What a child saw: counts, consistency checks and a checksum of the embeddings."""

    records: int = 0
    pages: int = 0
    max_page: int = 0
    bad_rows: int = 0
    bad_shapes: int = 0
    embedding_sum: float = 0.0

    def add(self, result: Any, dim: int, ids_file: Any) -> None:
        ids = result["ids"]
        n = len(ids)
        self.records += n
        self.pages += 1
        self.max_page = max(self.max_page, n)
        emb = result["embeddings"]
        if emb is None or np.shape(emb) != (n, dim):
            self.bad_shapes += 1
        else:
            self.embedding_sum += float(np.asarray(emb, dtype=np.float64).sum())
        metas = result["metadatas"] or []
        docs = result["documents"] or []
        if len(metas) != n or len(docs) != n:
            self.bad_shapes += 1
        for record_id, meta, doc in zip(ids, metas, docs, strict=False):
            cluster = meta.get("cluster") if meta else None
            if cluster is None or doc != document(record_id, int(cluster)):
                self.bad_rows += 1
            ids_file.write(record_id + "\n")


def tally_export(path: Path, tally: Tally, dim: int, batch: int, ids_file: Any) -> None:
    """Feed an export file's records to ``tally`` in pages of ``batch``, then delete it."""
    from sharded_chroma.backup._format import ExportFile, Record

    page: list[Record] = []

    def flush() -> None:
        if page:
            tally.add(
                {
                    "ids": [r.id for r in page],
                    "embeddings": np.stack([r.embedding for r in page]),
                    "metadatas": [r.metadata for r in page],
                    "documents": [r.document for r in page],
                },
                dim,
                ids_file,
            )
            page.clear()

    for item in ExportFile.open(path).read():
        if not isinstance(item, list):
            page.append(item)
            if len(page) >= batch:
                flush()
    flush()
    tally.pages = 0  # pages of the check, not of the export
    path.unlink()


async def child_run(spec: dict[str, Any], ids_file: TextIO) -> dict[str, Any]:
    client = await sharded_chroma.AsyncHttpClient(shards=spec["urls"])
    try:
        coll = await client.get_collection(COLLECTION, embedding_function=None)
        # Warm-up: connections, lazy imports and first-use allocations happen here, not in the
        # measured operation.
        await coll.get(limit=10, include=INCLUDE)
        async with contextlib.aclosing(coll.scan(batch_size=10, include=INCLUDE)) as pages:
            async for _ in pages:
                break
        gc.collect()
        trace = bool(spec["trace"])
        if trace:
            tracemalloc.start()
            heap_before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
        hwm_reset = reset_peak_rss()
        rss_before = proc_status_kib("VmRSS")
        tally = Tally()
        error = None
        started = time.perf_counter()
        try:
            if spec["op"] == "get":
                result = await coll.get(include=INCLUDE)
                tally.add(result, spec["dim"], ids_file)
                del result
            elif spec["op"] == "export":
                await client.export_collection(
                    COLLECTION, spec["export_out"], batch_size=spec["batch"]
                )
            else:
                async for page in coll.scan(batch_size=spec["batch"], include=INCLUDE):
                    tally.add(page, spec["dim"], ids_file)
        except Exception as exc:  # reported by the parent, e.g. a get() the server refuses
            error = f"{type(exc).__name__}: {exc}"[:400]
        elapsed = time.perf_counter() - started
        hwm = proc_status_kib("VmHWM")
        if spec["op"] == "export" and error is None:
            # Checked after the measurement: the file holds what a scan would have returned.
            tally_export(Path(spec["export_out"]), tally, spec["dim"], spec["batch"], ids_file)
        out: dict[str, Any] = {
            "seconds": elapsed,
            "rss_before_kib": rss_before,
            "hwm_kib": hwm,
            "hwm_reset": hwm_reset,
            "error": error,
            **dataclasses.asdict(tally),
        }
        if trace:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            out["heap_peak_bytes"] = peak - heap_before
        return out
    finally:
        await client.aclose()


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    # Ids go to a file as they arrive, so checking them costs the measured process no memory.
    with open(spec["ids_out"], "w") as ids_file:
        result = asyncio.run(child_run(spec, ids_file))
    print(json.dumps(result), flush=True)
    return 0


# -- parent: load, spawn measurements, check, report -----------------------------------------


@dataclasses.dataclass
class Cell:
    """Every run of one (records, operation, batch) measurement."""

    records: int
    op: str
    batch: int | None
    heap: list[float] = dataclasses.field(default_factory=list)  # bytes, traced runs
    rss: list[float] = dataclasses.field(default_factory=list)  # bytes, untraced runs
    seconds: list[float] = dataclasses.field(default_factory=list)  # untraced runs
    ids_files: list[Path] = dataclasses.field(default_factory=list)
    hwm_reset: bool = True
    error: str | None = None  # the operation failed (the first failure; no more runs)
    problems: list[str] = dataclasses.field(default_factory=list)
    ids_check: str = ""
    ids_note: str = ""

    @property
    def label(self) -> str:
        if self.op == "export":
            return f"export(batch_size={self.batch})"
        return "get() everything" if self.op == "get" else f"scan(batch_size={self.batch})"

    @property
    def heap_median(self) -> float:
        return statistics.median(self.heap) if self.heap else math.nan

    @property
    def rss_median(self) -> float:
        return statistics.median(self.rss) if self.rss else math.nan

    @property
    def seconds_median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"measurement {spec['op']} batch={spec.get('batch')} failed "
            f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def measure(
    cell: Cell,
    urls: list[str],
    dim: int,
    repeats: int,
    traced_repeats: int,
    workdir: Path,
    expected_sum: float,
) -> None:
    rounds = max(repeats, traced_repeats)
    for rnd in range(rounds):
        # Alternate traced and untraced runs so slow drifts on a shared machine hit both.
        order = (False, True) if rnd % 2 == 0 else (True, False)
        for trace in order:
            if rnd >= (traced_repeats if trace else repeats):
                continue
            mode = "traced  " if trace else "untraced"
            ids_out = workdir / (
                f"ids-{cell.records}-{cell.op}-{cell.batch}-{rnd}-{'t' if trace else 'r'}.txt"
            )
            spec = {
                "urls": urls,
                "op": cell.op,
                "batch": cell.batch,
                "dim": dim,
                "trace": trace,
                "ids_out": str(ids_out),
                "export_out": str(ids_out.with_suffix(".jsonl")),
            }
            out = run_child(spec)
            if out["error"]:
                # A refusal repeats identically; one is enough to report it.
                cell.error = out["error"]
                log(
                    f"  {cell.records:>7} {cell.label:<22} run {rnd + 1}/{rounds} {mode}: "
                    f"FAILED after {out['seconds']:.1f} s: {out['error']}"
                )
                return
            cell.ids_files.append(ids_out)
            cell.hwm_reset = cell.hwm_reset and bool(out["hwm_reset"])
            if trace:
                cell.heap.append(float(out["heap_peak_bytes"]))
                detail = f"heap peak {out['heap_peak_bytes'] / MIB:8.1f} MiB"
            else:
                growth = float(out["hwm_kib"] - out["rss_before_kib"]) * 1024
                cell.rss.append(growth)
                cell.seconds.append(float(out["seconds"]))
                detail = f"RSS growth {growth / MIB:8.1f} MiB"
            bad = []
            if out["records"] != cell.records:
                bad.append(f"{out['records']} records, expected {cell.records}")
            if out["bad_rows"] or out["bad_shapes"]:
                bad.append(f"{out['bad_rows']} bad rows, {out['bad_shapes']} bad shapes")
            if cell.batch is not None and out["max_page"] > cell.batch:
                bad.append(f"a page of {out['max_page']} records")
            if not math.isclose(out["embedding_sum"], expected_sum, rel_tol=1e-6, abs_tol=1e-3):
                bad.append(f"embedding sum {out['embedding_sum']:.6g} != {expected_sum:.6g}")
            log(
                f"  {cell.records:>7} {cell.label:<22} run {rnd + 1}/{rounds} {mode}: {detail}  "
                f"{out['seconds']:6.1f} s  {out['records']} records in {out['pages']} page(s), "
                f"max page {out['max_page']}" + (f"  PROBLEM: {'; '.join(bad)}" if bad else "")
            )
            cell.problems += bad


def read_ids(path: Path) -> list[str]:
    return path.read_text().splitlines()


def id_problems(ids: list[str], expected: set[str]) -> list[str]:
    """Duplicates, missing and unexpected ids, empty when each expected id came once."""
    problems = []
    counts = Counter(ids)
    dupes = sum(c - 1 for c in counts.values() if c > 1)
    if dupes:
        problems.append(f"{dupes} duplicate ids")
    missing, extra = len(expected - counts.keys()), len(counts.keys() - expected)
    if missing or extra:
        problems.append(f"{missing} ids missing, {extra} unexpected")
    return problems


def first_difference(a: list[str], b: list[str]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def check_ids(cells: list[Cell], data: Dataset) -> None:
    """Sets ``ids_check`` (OK / FAIL / -) and ``ids_note`` on every cell.

    get(): every loaded id exactly once, the same order in every run. scan(): every loaded id
    exactly once and, where a get() of the same size worked, exactly get()'s order. Where it
    did not, every scan at that size must agree on one order, and that order must start with
    the get() order of the largest smaller size (records loaded earlier come first in get()
    order, since each add takes later sequence numbers).
    """
    references: dict[int, list[str]] = {}
    for cell in cells:
        if cell.op != "get":
            continue
        if cell.error:
            cell.ids_check = "-"
            continue
        expected = set(data.ids[: cell.records])
        problems = list(cell.problems)
        reference: list[str] | None = None
        for path in cell.ids_files:
            ids = read_ids(path)
            problems += id_problems(ids, expected)
            if reference is None:
                reference = ids
            elif ids != reference:
                problems.append("two get() runs gave different orders")
        if reference is not None:
            references[cell.records] = reference
        cell.ids_check = "FAIL" if problems else "OK"
        cell.ids_note = "; ".join(dict.fromkeys(problems))
    scan_orders: dict[int, list[str]] = {}
    for cell in cells:
        if cell.op == "get":
            continue
        expected = set(data.ids[: cell.records])
        reference = references.get(cell.records)
        problems = list(cell.problems)
        notes: list[str] = []
        for path in cell.ids_files:
            ids = read_ids(path)
            problems += id_problems(ids, expected)
            if reference is not None:
                if ids != reference:
                    problems.append(
                        f"order differs from get() at position {first_difference(ids, reference)}"
                    )
                continue
            # No get() at this size: all scans here must agree, and start with the get()
            # order of the largest smaller size.
            agreed = scan_orders.setdefault(cell.records, ids)
            if ids != agreed:
                problems.append(
                    f"order differs from another scan at position {first_difference(ids, agreed)}"
                )
            smaller = [n for n in references if n < cell.records]
            if smaller:
                prefix = references[max(smaller)]
                if ids[: len(prefix)] != prefix:
                    problems.append(
                        f"first {len(prefix)} ids differ from get() at {len(prefix)} records"
                    )
                else:
                    notes.append(
                        f"no get() at this size; each id once, every run and batch size in one "
                        f"order, whose first {len(prefix)} ids are get()'s order at "
                        f"{len(prefix)} records"
                    )
            else:
                notes.append("no get() to compare with; each id once, one order in every run")
        cell.ids_check = "FAIL" if problems else ("OK*" if notes else "OK")
        cell.ids_note = "; ".join(dict.fromkeys(problems or notes))


async def load(urls: list[str], data: Dataset, start: int, stop: int, batch: int) -> float:
    """Add records [start, stop) through the sharded client; returns records per second."""
    client = await sharded_chroma.AsyncHttpClient(shards=urls)
    try:
        coll = await client.get_or_create_collection(
            COLLECTION, configuration=CONFIGURATION, embedding_function=None
        )
        t0 = time.perf_counter()
        for lo in range(start, stop, batch):
            hi = min(lo + batch, stop)
            await coll.add(
                ids=data.ids[lo:hi],
                embeddings=data.vectors[lo:hi],
                metadatas=[{"cluster": int(c)} for c in data.clusters[lo:hi]],
                documents=[document(data.ids[i], int(data.clusters[i])) for i in range(lo, hi)],
            )
            if (hi - start) % (20 * batch) == 0 or hi == stop:
                log(f"  loaded {hi}/{len(data)}")
        rate = (stop - start) / (time.perf_counter() - t0)
        count = await coll.count()
        if count != stop:
            raise RuntimeError(f"collection holds {count} records after loading {stop}")
        return rate
    finally:
        await client.aclose()


load_average = _machine.load_average


def machine_info() -> dict[str, str]:
    return _machine.machine_info(numpy=np.__version__)


def fmt_ratio(value: float, base: float) -> str:
    if not base or math.isnan(value) or math.isnan(base):
        return "-"
    return f"{value / base:.3f}x"


def baseline_for(cell: Cell, gets: dict[int, Cell]) -> tuple[Cell | None, bool]:
    """The get() to compare ``cell`` with: the same size if it worked, else the largest smaller
    size where it did (second value True)."""
    same = gets.get(cell.records)
    if same is not None and not same.error:
        return same, False
    smaller = [n for n, g in gets.items() if n < cell.records and not g.error]
    return (gets[max(smaller)], True) if smaller else (None, False)


def report(
    info: dict[str, str],
    args: argparse.Namespace,
    cells: list[Cell],
    load_rates: list[float],
    loads: list[str],
) -> str:
    width = 112
    lines = ["", "=" * width, "Client memory: scan() vs one get() of everything", "=" * width]
    lines += [f"  {k}: {v}" for k, v in info.items()]
    lines.append(
        f"  run: records={args.records} dim={args.dim} shards={args.shards} "
        f"batches={','.join(map(str, args.batches))} partials={','.join(map(str, args.partials))} "
        f"partial-batch={args.partial_batch} repeats={args.repeats} "
        f"traced-repeats={args.traced_repeats} add-batch={args.add_batch} include={INCLUDE}"
    )
    lines.append(f"  load average: {'; '.join(loads)}")
    lines.append(
        "  load rate (records/s, sharded client, per stage): "
        + ", ".join(f"{rate:.0f}" for rate in load_rates)
    )
    if not all(cell.hwm_reset for cell in cells):
        lines.append("  WARNING: /proc/self/clear_refs refused; VmHWM was not reset per run")
    lines.append("")
    lines.append(
        f"  heap = tracemalloc peak minus the level before (median of {args.traced_repeats} "
        f"traced run(s)); RSS = VmHWM minus VmRSS before and time (median of {args.repeats} "
        "untraced run(s))"
    )
    header = (
        f"  {'records':>8}  {'operation':<22}{'heap peak MiB':>14}{'RSS growth MiB':>16}"
        f"{'heap vs get':>13}{'RSS vs get':>12}{'time s':>8}   ids"
    )
    lines += [header, "  " + "-" * (width - 2)]
    gets = {c.records: c for c in cells if c.op == "get"}
    footnotes: list[str] = []
    for cell in sorted(cells, key=lambda c: (-c.records, c.op != "get", c.batch or 0)):
        if cell.error:
            lines.append(f"  {cell.records:>8}  {cell.label:<22}  FAILED: {cell.error[:70]}")
            continue
        base, smaller = baseline_for(cell, gets)
        mark = "^" if smaller else ""
        heap_ratio = fmt_ratio(cell.heap_median, base.heap_median if base else math.nan) + mark
        rss_ratio = fmt_ratio(cell.rss_median, base.rss_median if base else math.nan) + mark
        if smaller and base is not None:
            note = (
                f"^ against get() at {base.records} records, the largest size where get() "
                f"worked; a get() of {cell.records} would hold more, so the true ratio is lower"
            )
            if note not in footnotes:
                footnotes.append(note)
        lines.append(
            f"  {cell.records:>8}  {cell.label:<22}{cell.heap_median / MIB:>14.1f}"
            f"{cell.rss_median / MIB:>16.1f}{heap_ratio:>13}{rss_ratio:>12}"
            f"{cell.seconds_median:>8.1f}   {cell.ids_check}"
        )
    for cell in cells:
        if cell.error:
            footnotes.append(f"{cell.label} at {cell.records} records failed: {cell.error}")
    notes = {c.ids_note for c in cells if c.ids_note}
    footnotes += [f"ids: {note}" for note in sorted(notes)]
    lines += [f"  {note}" for note in footnotes]
    lines.append("")
    lines.append("  Peak per record of one batch (peak / batch_size), full collection:")
    full_scans = sorted(
        (c for c in cells if c.op == "scan" and c.records == args.records and not c.error),
        key=lambda c: c.batch or 0,
    )
    for cell in full_scans:
        assert cell.batch is not None
        lines.append(
            f"    batch_size={cell.batch:<6} {cell.heap_median / cell.batch / 1024:8.1f} KiB heap,"
            f" {cell.rss_median / cell.batch / 1024:8.1f} KiB RSS"
        )
    lines.append("")
    probe = sorted(
        (
            c
            for c in cells
            if c.op == "scan" and c.batch == args.partial_batch and not c.error and c.heap
        ),
        key=lambda c: c.records,
    )
    good_gets = sorted(
        (g for g in gets.values() if not g.error and g.heap), key=lambda g: g.records
    )
    if len(probe) >= 2:
        lines.append("  Scaling with the number of records:")
        for label, series in (
            (f"scan(batch_size={args.partial_batch})", probe),
            ("get() everything", good_gets),
        ):
            if not series:
                continue
            lines.append(
                f"    {label:<22} heap "
                + ", ".join(f"{c.records}: {c.heap_median / MIB:.1f}" for c in series)
                + " MiB; RSS "
                + ", ".join(f"{c.records}: {c.rss_median / MIB:.1f}" for c in series)
                + " MiB"
            )
        exports = sorted(
            (c for c in cells if c.op == "export" and not c.error and c.rss),
            key=lambda c: c.records,
        )
        if exports:
            lines.append(
                f"    export(batch_size={args.partial_batch}) RSS "
                + ", ".join(f"{c.records}: {c.rss_median / MIB:.1f}" for c in exports)
                + " MiB"
            )
        for cell in cells:
            if cell.op == "get" and cell.error:
                lines.append(f"    get() everything       {cell.records}: failed (see above)")
        scan_ratio = probe[-1].heap_median / probe[0].heap_median
        size_ratio = probe[-1].records / probe[0].records
        get_ratio = (
            good_gets[-1].heap_median / good_gets[0].heap_median if len(good_gets) >= 2 else None
        )
        grows_with_batch = len(full_scans) >= 2 and all(
            a.heap_median < b.heap_median for a, b in itertools.pairwise(full_scans)
        )
        flat_in_n = 0.75 <= scan_ratio <= 1.33
        verdict = (
            "scan's peak scales with batch size, not N"
            if flat_in_n and grows_with_batch
            else "scan's peak does NOT clearly scale with batch size alone"
        )
        get_text = (
            f"; get() heap x{get_ratio:.2f} for x{good_gets[-1].records / good_gets[0].records:.1f}"
            " records"
            if get_ratio is not None
            else ""
        )
        if probe[0].records < args.shards * args.partial_batch:
            lines.append(
                f"    (at {probe[0].records} records, fewer than shards x batch = "
                f"{args.shards * args.partial_batch}, the scan's first pages hold everything)"
            )
        lines.append(
            f"    => {verdict}: scan heap x{scan_ratio:.2f} for x{size_ratio:.1f} records"
            f"{get_text}; heap peak grows with batch size: {'yes' if grows_with_batch else 'no'}"
        )
    checks = [c.ids_check for c in cells if c.op in ("scan", "export")]
    overall = "OK" if checks and all(c.startswith("OK") for c in checks) else "FAIL"
    lines.append(f"  scan() (and export) returned every id exactly once, in get() order: {overall}")
    lines.append("=" * width)
    return "\n".join(lines)


def parse_fractions(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--records", type=int, default=100_000, help="records loaded (100000)")
    p.add_argument("--dim", type=int, default=384, help="vector dimension (384)")
    p.add_argument("--shards", type=int, default=3, help="local Chroma servers (3)")
    p.add_argument(
        "--batches",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[100, 1000, 5000],
        help="comma-separated scan batch sizes (100,1000,5000)",
    )
    p.add_argument(
        "--partials",
        type=parse_fractions,
        default=[0.25, 0.5],
        help="fractions of --records at which --partial-batch and get() are also measured,\n"
        "while loading (0.25,0.5; empty to skip)",
    )
    p.add_argument(
        "--partial-batch",
        type=int,
        default=None,
        help="scan batch size at those sizes (1000; 100 with --quick)",
    )
    p.add_argument("--repeats", type=int, default=3, help="untraced (RSS) runs per measurement (3)")
    p.add_argument(
        "--traced-repeats",
        type=int,
        default=1,
        help="tracemalloc runs per measurement (1: tracing slows the client 5-20x; the\n"
        "traced peak has varied by up to 11%% between runs at the largest batches)",
    )
    p.add_argument("--add-batch", type=int, default=3000, help="records per add() call (3000)")
    p.add_argument(
        "--export",
        action="store_true",
        help="also measure export_collection(batch_size=--partial-batch) to a file at each size",
    )
    p.add_argument("--quick", action="store_true", help="10000 records (a few minutes)")
    p.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.records = 10_000
    if args.partial_batch is None:
        # Below shards x batch records a scan holds the whole collection anyway.
        args.partial_batch = 100 if args.quick else 1000
    for name in ("records", "dim", "shards", "repeats", "traced_repeats", "add_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if any(b < 1 for b in args.batches) or args.partial_batch < 1:
        p.error("batch sizes must be positive")
    if any(not 0 < f < 1 for f in args.partials):
        p.error("--partials must be fractions between 0 and 1")
    return args


def run(args: argparse.Namespace, urls: list[str], data: Dataset, workdir: Path) -> str:
    info = machine_info()
    for key, value in info.items():
        log(f"{key}: {value}")
    cells: list[Cell] = []
    load_rates: list[float] = []
    loads: list[str] = []
    stages = sorted({int(args.records * f) for f in args.partials} - {0} | {args.records})
    loaded = 0
    for stage in stages:
        log(f"loading records {loaded}..{stage} over {len(urls)} shards")
        load_rates.append(asyncio.run(load(urls, data, loaded, stage, args.add_batch)))
        log(f"  {load_rates[-1]:.0f} records/s; load average {load_average()}")
        loaded = stage
        loads.append(f"after loading {stage}: {load_average()}")
        expected_sum = float(data.vectors[:stage].astype(np.float64).sum())
        batches = args.batches if stage == args.records else [args.partial_batch]
        stage_cells = [Cell(stage, "scan", b) for b in batches] + [Cell(stage, "get", None)]
        if args.export:
            stage_cells.append(Cell(stage, "export", args.partial_batch))
        for cell in stage_cells:
            log(f"measuring {cell.label} over {stage} records")
            measure(cell, urls, args.dim, args.repeats, args.traced_repeats, workdir, expected_sum)
        cells += stage_cells
        loads.append(f"after measuring {stage}: {load_average()}")
    check_ids(cells, data)
    return report(info, args, cells, load_rates, loads)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child)
    started = time.perf_counter()
    data = make_dataset(args.records, args.dim, 1)
    log(f"dataset: {args.records} x {args.dim} float32")
    with tempfile.TemporaryDirectory(prefix="bench_scan_memory_") as tmp:
        cluster = LocalCluster(args.shards, Path(tmp) / "servers")
        workdir = Path(tmp) / "ids"
        workdir.mkdir()
        log(f"starting {args.shards} local chroma server(s)")
        # LocalCluster.start stops whatever it started if a server fails; the with-block
        # stops every server when the benchmark ends, on error or Ctrl-C too.
        with cluster:
            log(f"servers: {', '.join(cluster.urls)}")
            text = run(args, cluster.urls, data, workdir)
    print(text, flush=True)
    log(f"done in {time.perf_counter() - started:.0f} s; load average {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
