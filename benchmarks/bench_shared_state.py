"""What sharing node state through the control store costs a client per call.

Run from the repository root: ``python benchmarks/bench_shared_state.py`` (about 2 minutes on
two cores) or ``--quick`` (under a minute).

Two Chroma servers on loopback in a temporary directory form one shard (a primary and a
replica); one collection per configuration (``--records`` records of ``--dim`` dimensions):

- ``floor``: a bare aiohttp ``get`` of one id from the primary's own collection;
- ``local``: a client without a control store (node state in this host's hint log only);
- ``sqlite``: a client with a SQLite control store, which shares node state: every record
  read and write first takes in what other hosts published (one list of the store);
- ``etcd``: the same on a real etcd on loopback (left out when no ``etcd`` is installed).

No copy is behind, so the difference is the fence alone. Per round, each configuration makes
``--calls`` sequential ``get(ids=[one id])`` calls and as many one-record upserts; the order is
reversed every other round. Tables show medians over rounds of each round's per-call median,
and per-round ratios against ``local`` (median [min-max]).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
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
from sharded_chroma.testing import LocalCluster  # noqa: E402
from sharded_chroma.testing._etcd import LocalEtcd  # noqa: E402

BASE = "/api/v2/tenants/default_tenant/databases/default_database/collections"


def topology(urls: list[str], folder: Path, control: dict[str, Any] | None) -> Any:
    spec: dict[str, Any] = {
        "shards": [{"name": "s0", "primary": urls[0], "replicas": [urls[1]]}],
        "replication": {"hints_dir": str(folder)},
    }
    if control is not None:
        spec["control"] = control
    return sharded_chroma.Topology.build(spec)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="records 500, calls 100, rounds 3")
    args = p.parse_args()
    if args.quick:
        args.records, args.calls, args.rounds = 500, 100, 3
    print(json.dumps(_machine.machine_info(benchmark="bench_shared_state"), indent=1))
    rng = np.random.default_rng(7)
    ids = [f"r{i}" for i in range(args.records)]
    vectors = rng.random((args.records, args.dim), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(2, Path(tmp) / "servers") as servers:
        root = Path(tmp)
        etcd = LocalEtcd(root / "etcd") if shutil.which("etcd") else None
        controls: dict[str, dict[str, Any] | None] = {
            "local": None,
            "sqlite": {"backend": "sqlite", "path": str(root / "control.sqlite3")},
        }
        if etcd is not None:
            etcd.start()
            controls["etcd"] = {"backend": "etcd", "endpoints": [etcd.endpoint]}
        else:
            log("no etcd installed: the etcd configuration is left out")
        try:
            clients: dict[str, Any] = {}
            cols: dict[str, Any] = {}
            for name, control in controls.items():
                clients[name] = await sharded_chroma.AsyncHttpClient(
                    topology=topology(servers.urls, root / f"hints-{name}", control)
                )
                col = await clients[name].create_collection(
                    f"bench-{name}", embedding_function=None
                )
                for start in range(0, args.records, 500):
                    chunk = slice(start, start + 500)
                    await col.add(ids=ids[chunk], embeddings=vectors[chunk])
                cols[name] = col
            async with aiohttp.ClientSession() as http:
                listed = await (await http.get(servers.urls[0] + BASE)).json()
                physical = next(c["id"] for c in listed if c["name"] == "bench-local")
                floor_url = f"{servers.urls[0]}{BASE}/{physical}/get"

                async def floor_get(i: int) -> None:
                    body = {"ids": [ids[i % len(ids)]], "include": ["metadatas"]}
                    async with http.post(floor_url, json=body) as answer:
                        await answer.read()

                names = ["floor", *controls]
                gets: dict[str, list[float]] = {n: [] for n in names}
                puts: dict[str, list[float]] = {n: [] for n in controls}
                for round_no in range(args.rounds):
                    for name in alternate(names, round_no):
                        if name == "floor":
                            gets[name].append(await timed(floor_get, args.calls))
                            continue
                        gets[name].append(await timed(getter(cols[name], ids), args.calls))
                        puts[name].append(
                            await timed(upserter(cols[name], ids, vectors), args.calls)
                        )
                    log(f"round {round_no + 1}/{args.rounds} done")
            for client in clients.values():
                await client.aclose()
        finally:
            if etcd is not None:
                etcd.stop()
    print(f"\nget(ids=[one]) and upsert of one record, {args.calls} calls x {args.rounds} rounds")
    print_table(names, gets, puts, "local")


if __name__ == "__main__":
    asyncio.run(main())
