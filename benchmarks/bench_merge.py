"""Time merge_query on a 16-shard x 100-result query against a naive dict-row baseline.

Run from the repository root: ``python benchmarks/bench_merge.py [--shards 16] [--k 100]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Lets the script run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sharded_chroma._merge import merge_query

FIELDS = ("distances", "metadatas", "documents")


def make_responses(
    shards: int, k: int, dims: int, seed: int, ties: bool = False
) -> list[dict[str, Any]]:
    """One query's worth of shard responses, each sorted by distance as Chroma returns them."""
    rng = random.Random(seed)
    responses = []
    for s in range(shards):
        # Coarse distances force (distance, id) ties, which take merge_query's sorting path.
        dists = sorted(round(rng.random(), 1) if ties else rng.random() for _ in range(k))
        ids = [f"id-{s}-{i}" for i in range(k)]
        responses.append(
            {
                "ids": [ids],
                "distances": [dists],
                "embeddings": [[[rng.random() for _ in range(dims)] for _ in ids]],
                "metadatas": [[{"n": i} for i in range(k)]],
                "documents": [[f"doc-{i}" for i in ids]],
                "uris": None,
            }
        )
    return responses


def naive_merge(
    responses: Sequence[Mapping[str, Any]], n_results: int, fields: Sequence[str]
) -> dict[str, Any]:
    """The obvious implementation: one dict per row, sorted() with a key, dedupe, slice."""
    names = ("distances", "embeddings", "metadatas", "documents", "uris")
    n_queries = len(responses[0]["ids"])
    out: dict[str, Any] = {"ids": []}
    for f in names:
        out[f] = [] if f in fields else None
    for q in range(n_queries):
        rows = []
        for resp in responses:
            for r, rid in enumerate(resp["ids"][q]):
                row = {"id": rid}
                for f in names:
                    col = resp.get(f)
                    row[f] = None if col is None else col[q][r]
                rows.append(row)
        rows = sorted(rows, key=lambda row: (row["distances"], row["id"]))
        seen: set[str] = set()
        kept = []
        for row in rows:
            if row["id"] not in seen:
                seen.add(row["id"])
                kept.append(row)
        kept = kept[:n_results]
        out["ids"].append([row["id"] for row in kept])
        for f in names:
            if f in fields:
                out[f].append([row[f] for row in kept])
    return out


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of ``runs`` calls, after a short warm-up."""
    for _ in range(min(runs, 20)):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, check both merges agree, and print their median times and ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--k", type=int, default=100, help="results per shard and n_results")
    parser.add_argument("--dims", type=int, default=8, help="embedding width (copied by ref)")
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ties", action="store_true", help="coarse distances with many ties")
    args = parser.parse_args(argv)

    responses = make_responses(args.shards, args.k, args.dims, args.seed, args.ties)
    fast = merge_query(responses, args.k, FIELDS)
    if fast != naive_merge(responses, args.k, FIELDS):
        raise SystemExit("merge_query and the naive merge disagree")

    t_fast = median_seconds(lambda: merge_query(responses, args.k, FIELDS), args.runs)
    t_naive = median_seconds(lambda: naive_merge(responses, args.k, FIELDS), args.runs)
    label = f"{args.shards}x{args.k}{' ties' if args.ties else ''}"
    print(f"merge_query {label}: median {t_fast * 1e6:9.1f} us over {args.runs} runs")
    print(f"naive       {label}: median {t_naive * 1e6:9.1f} us over {args.runs} runs")
    print(f"speed-up: {t_naive / t_fast:.1f}x")


if __name__ == "__main__":
    main()
