"""Ingest of two package checkouts, compared process by process with ``bench_client.py``.

```sh
git worktree add <prev-dir> <commit>          # outside the repository
python benchmarks/_ingest_ab.py --prev <prev-dir> --new <new-dir> --pairs 4 -- --records 20000
```

Runs ``bench_client.py --only add --add-rounds 1`` (plus the arguments after ``--``) with
``PYTHONPATH`` at ``--prev``, then at ``--new``, ``--pairs`` times (prev, new, prev, new, ...),
one process at a time, each with its own fresh servers. The benchmark's own data and loop
(``benchmarks/_data.py``) come from this checkout for both sides; only ``sharded_chroma`` differs.
Prints per-round records/s and client CPU per record for both setups (1 server, N shards),
and new / prev per pair (adjacent runs, so a pair meets about the same machine load): median
[min-max] over pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import load_average
from _stats import med, paired_ratios, spread

BENCH = Path(__file__).resolve().parent / "bench_client.py"


def run_side(path: str, extra: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": path}
    cmd = [sys.executable, str(BENCH), "--only", "add", "--add-rounds", "1", *extra]
    subprocess.run([*cmd, "--json", str(out)], env=env, check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prev", required=True, help="checkout of the previous commit")
    p.add_argument("--new", required=True, help="checkout of the new commit")
    p.add_argument("--pairs", type=int, default=4, help="prev/new pairs of runs (default 4)")
    p.add_argument("--json", metavar="PATH", help="also write every run's numbers here")
    p.add_argument("bench_args", nargs="*", help="after --: arguments for bench_client.py")
    args = p.parse_args(argv)
    start_load = load_average()
    runs: dict[str, list[dict]] = {"prev": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="ingest_ab_") as tmp:
        for i in range(args.pairs):
            for side in ("prev", "new"):
                print(f"== pair {i + 1}/{args.pairs}: {side}", flush=True)
                out = Path(tmp) / f"{side}-{i}.json"
                runs[side].append(run_side(getattr(args, side), args.bench_args, out))
    end_load = load_average()
    setups = list(runs["new"][0]["D"])
    lines = ["", f"load average at start: {start_load}; at end: {end_load}"]
    for side in ("prev", "new"):
        m = runs[side][0]["machine"]
        lines.append(f"{side}: sharded_chroma {m['sharded_chroma commit']}")
    summary: dict[str, dict[str, object]] = {}
    for setup in setups:
        for metric, unit, higher in (
            ("add", "records/s", True),
            ("add_cpu", "us client CPU/record", False),
        ):
            prev = [r["D"][setup][metric][0] for r in runs["prev"]]
            new = [r["D"][setup][metric][0] for r in runs["new"]]
            ratios = paired_ratios(new, prev)
            better = "higher" if higher else "lower"
            lines.append(
                f"{setup:<10} {unit:<22} prev {med(prev):8.1f} "
                f"({', '.join(f'{v:.1f}' for v in prev)})  new {med(new):8.1f} "
                f"({', '.join(f'{v:.1f}' for v in new)})  new/prev {spread(ratios)} "
                f"({better} is better)"
            )
            summary[f"{setup} {metric}"] = {"prev": prev, "new": new, "new/prev": ratios}
    print("\n".join(lines), flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"load": [start_load, end_load], "summary": summary, "runs": runs}, indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
