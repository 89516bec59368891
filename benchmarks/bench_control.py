"""What following the control store costs a client per call, and what a move's mirrored writes
cost, against real Chroma servers.

Run from the repository root: ``python benchmarks/bench_control.py`` (about 3 minutes on two
cores) or ``--quick`` (under a minute).

Three Chroma servers on loopback in a temporary directory, one 3-shard cluster, one collection
per configuration (hash of the id, ``--records`` records of ``--dim`` dimensions):

- ``floor``: a bare aiohttp request to the owning shard's physical collection (what the server
  and one HTTP round trip cost);
- ``plain``: a client without a control store;
- ``control``: a client with a SQLite control store, its collection's map stable at epoch 0;
- ``dual``: the same client, with its collection's map put into the ``dual`` phase of a move
  (s0 and s1 giving slots to s2), so writes of moving ids are mirrored and reads filtered.

Per round, each configuration makes ``--calls`` sequential ``get(ids=[one id])`` calls and
``--calls`` sequential one-record ``upsert`` calls on ids the move would take from s0 to s2
(the ones ``dual`` mirrors); the configurations' order is reversed every other round. Tables
show per-configuration medians over rounds of the per-call median latency, and per-round
ratios against ``plain`` (median [min-max]).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_ROOT / "benchmarks"))

import _machine  # noqa: E402
import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from _percall import getter, print_table, timed, upserter  # noqa: E402
from _stats import alternate, log  # noqa: E402

import sharded_chroma  # noqa: E402
from sharded_chroma.control import SqliteControl  # noqa: E402
from sharded_chroma.control._store import ControlStore  # noqa: E402
from sharded_chroma.rebalance import plan_hash  # noqa: E402
from sharded_chroma.testing import LocalCluster  # noqa: E402

BASE = "/api/v2/tenants/default_tenant/databases/default_database/collections"


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=3000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="records 1000, calls 100, rounds 3")
    args = p.parse_args()
    if args.quick:
        args.records, args.calls, args.rounds = 1000, 100, 3
    print(json.dumps(_machine.machine_info(benchmark="bench_control"), indent=1))
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(3, Path(tmp) / "servers") as servers:
        shards = [{"name": f"s{i}", "primary": u} for i, u in enumerate(servers.urls)]
        control = {"backend": "sqlite", "path": str(Path(tmp) / "control.sqlite3")}
        plain = await sharded_chroma.AsyncHttpClient(
            topology=sharded_chroma.Topology.build({"shards": shards})
        )
        managed = await sharded_chroma.AsyncHttpClient(
            topology=sharded_chroma.Topology.build({"shards": shards, "control": control})
        )
        ids = [f"r{i}" for i in range(args.records)]
        vectors = rng.random((args.records, args.dim), dtype=np.float32)
        cols: dict[str, Any] = {}
        for name, client in (("plain", plain), ("control", managed), ("dual", managed)):
            col = await client.create_collection(f"bench-{name}", embedding_function=None)
            for start in range(0, args.records, 500):
                await col.add(ids=ids[start : start + 500], embeddings=vectors[start : start + 500])
            cols[name] = col
        old = await managed.partition_map("bench-dual")
        goal = plan_hash(old.policy, weights={"s0": 1, "s1": 1, "s2": 2}).goal
        moving = [r for r in ids if old.policy.place(r, None).shard == "s0"]
        moving = [r for r in moving if goal.place(r, None).shard == "s2"]
        store = ControlStore(SqliteControl(control["path"]))
        found = await store.load_map(str(cols["dual"].id))
        assert found is not None
        await store.swap_map(
            str(cols["dual"].id),
            old.advanced(phase="dual", other=goal, tag="bench"),
            found[1],
        )
        await store.wait_for_acks(str(cols["dual"].id), 1, 30.0)
        await store.backend.aclose()
        log(f"{len(moving)} ids move s0 -> s2 under the dual map")
        # The floor: the owning server's own collection, by its physical id.
        async with aiohttp.ClientSession() as http:
            listed = await (await http.get(servers.urls[0] + BASE)).json()
            physical = next(c["id"] for c in listed if c["name"] == "bench-plain")
            floor_url = f"{servers.urls[0]}{BASE}/{physical}/get"

            async def floor_get(i: int) -> None:
                body = {"ids": [moving[i % len(moving)]], "include": ["metadatas"]}
                async with http.post(floor_url, json=body) as answer:
                    await answer.read()

            names = ["floor", "plain", "control", "dual"]
            gets: dict[str, list[float]] = {n: [] for n in names}
            puts: dict[str, list[float]] = {n: [] for n in names[1:]}
            for round_no in range(args.rounds):
                for name in alternate(names, round_no):
                    if name == "floor":
                        gets[name].append(await timed(floor_get, args.calls))
                        continue
                    gets[name].append(await timed(getter(cols[name], moving), args.calls))
                    puts[name].append(
                        await timed(upserter(cols[name], moving, vectors), args.calls)
                    )
                log(f"round {round_no + 1}/{args.rounds} done")
        await plain.aclose()
        await managed.aclose()
    print(f"\nget(ids=[one]) and upsert of one record, {args.calls} calls x {args.rounds} rounds")
    print_table(names, gets, puts, "plain")


if __name__ == "__main__":
    asyncio.run(main())
