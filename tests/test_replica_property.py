"""A seeded random schedule of writes (add, upsert, update, delete under write concern ``one``)
and reads, interleaved with SIGKILLs and restarts of random copies (never every copy of a shard
at once), against real Chroma servers. Restarts run in the background while the schedule goes
on, so hint replays race with new writes.

Invariants:

- while the schedule runs, a read that succeeds returns exactly the acknowledged state of the
  ids it asked for (a copy that missed a write never serves a read);
- with only replicas killed, every write and every read succeeds;
- afterwards (everything restarted, hints replayed, anti-entropy repair run when the package has
  it), every copy of a shard holds exactly the same records, and together they hold exactly
  the acknowledged writes.

A write that raised is "maybe applied": the ids it touched are don't-care (copies must still
agree on them) until a later acknowledged upsert or delete settles them again.

The default run is bounded (two seeds, well under a minute); ``-m slow`` (or
``SHARDED_CHROMA_SLOW=1``) runs the long form: more seeds and longer schedules.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import sharded_chroma
from sharded_chroma import (
    NodeUnavailableError,
    ShardedClient,
    ShardFailureError,
    Topology,
)
from sharded_chroma.testing import LocalChromaServer, LocalCluster
from tests._nodes import Record, clean, node_records
from tests._servers import all_running, own_cluster

pytestmark = pytest.mark.anyio

DIM = 3
# Server indexes per shard, primary first: s0 has three copies, s1 two.
LAYOUT = ((0, 1, 2), (3, 4))
POOL = [f"id-{k:02d}" for k in range(30)]


# -- servers and nodes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    n = sum(len(s) for s in LAYOUT)
    with own_cluster(n, tmp_path_factory.mktemp("property-cluster")) as c:
        yield c


@pytest.fixture
def servers(cluster: LocalCluster) -> list[LocalChromaServer]:
    return all_running(cluster)


def _slow_requested(config: pytest.Config) -> bool:
    return "slow" in (config.getoption("-m") or "") or bool(os.environ.get("SHARDED_CHROMA_SLOW"))


# -- the acknowledged state -------------------------------------------------------------------


@dataclass
class Model:
    """Acknowledged state of the pool's ids, plus the ids a failed write leaves undetermined."""

    state: dict[str, Record] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)
    version: int = 0

    def absent(self) -> list[str]:
        return [i for i in POOL if i not in self.state and i not in self.unknown]

    def present(self) -> list[str]:
        return [i for i in POOL if i in self.state]

    def record(self, rng: random.Random) -> Record:
        self.version += 1
        # Always the same metadata keys, so an upsert's or update's metadata merge is a replace.
        return (
            f"doc v{self.version}",
            {"v": self.version, "tag": rng.choice("abc")},
            tuple(float(np.float32(rng.random())) for _ in range(DIM)),
        )

    def applied(self, op: str, recs: dict[str, Record]) -> None:
        for i, rec in recs.items():
            if op == "delete":
                self.state.pop(i, None)
            else:
                self.state[i] = rec
            self.unknown.discard(i)

    def maybe_applied(self, ids: list[str]) -> None:
        for i in ids:
            self.state.pop(i, None)
            self.unknown.add(i)


# -- chaos: kills and background restarts -----------------------------------------------------


class Chaos:
    def __init__(
        self, servers: list[LocalChromaServer], rng: random.Random, kill_primaries: bool
    ) -> None:
        self.servers = servers
        self.rng = rng
        self.kill_primaries = kill_primaries
        self.down: set[int] = set()
        self.restarting: set[int] = set()
        self.kills = 0
        self.restarts = 0
        self.log: list[str] = []

    def live(self, shard: tuple[int, ...]) -> list[int]:
        return [i for i in shard if i not in self.down and i not in self.restarting]

    def killable(self) -> list[int]:
        out = []
        for shard in LAYOUT:
            live = self.live(shard)
            if len(live) < 2:
                continue  # never every copy of a shard at once
            out.extend(i for i in live if self.kill_primaries or i != shard[0])
        return out

    def kill(self) -> bool:
        choices = self.killable()
        if not choices:
            return False
        index = self.rng.choice(choices)
        server = self.servers[index]
        pid = server.pid
        assert pid is not None
        server.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 0)
            raise AssertionError(f"pid {pid} still alive after SIGKILL")
        self.down.add(index)
        self.kills += 1
        self.log.append(f"kill {index}")
        return True

    def restart(self, tg: Any, index: int | None = None) -> bool:
        if index is None:
            if not self.down:
                return False
            index = self.rng.choice(sorted(self.down))
        self.down.discard(index)
        self.restarting.add(index)
        self.restarts += 1
        self.log.append(f"restart {index}")
        tg.start_soon(self._restart, index)
        return True

    async def _restart(self, index: int) -> None:
        try:
            await anyio.to_thread.run_sync(self.servers[index].restart)
        finally:
            self.restarting.discard(index)


# -- one schedule -----------------------------------------------------------------------------


@dataclass
class Outcome:
    writes: int = 0
    acknowledged: int = 0
    reads: int = 0
    reads_ok: int = 0
    problems: list[str] = field(default_factory=list)


async def _write(
    col: Any, model: Model, rng: random.Random, outcome: Outcome, strict: bool
) -> None:
    r = rng.random()
    absent, present = model.absent(), model.present()
    if r < 0.25 and absent:
        op, ids = "add", rng.sample(absent, min(len(absent), rng.randint(1, 4)))
    elif r < 0.65:
        op, ids = "upsert", rng.sample(POOL, rng.randint(1, 5))
    elif r < 0.8 and present:
        op, ids = "update", rng.sample(present, min(len(present), rng.randint(1, 3)))
    else:
        op, ids = "delete", rng.sample(POOL, rng.randint(1, 4))
    recs = {i: model.record(rng) for i in ids}
    outcome.writes += 1
    try:
        if op == "delete":
            await col.delete(ids=ids)
        else:
            await getattr(col, op)(
                ids=ids,
                documents=[recs[i][0] for i in ids],
                metadatas=[recs[i][1] for i in ids],
                embeddings=[list(recs[i][2]) for i in ids],
            )
    except (ShardFailureError, NodeUnavailableError) as exc:
        model.maybe_applied(ids)
        if strict:
            outcome.problems.append(f"{op} {ids} failed with a live primary: {exc!r}")
    else:
        outcome.acknowledged += 1
        model.applied(op, recs)


async def _read(col: Any, model: Model, rng: random.Random, outcome: Outcome, strict: bool) -> None:
    ask = rng.sample(POOL, 8)
    outcome.reads += 1
    try:
        got = await col.get(ids=ask, include=["documents", "metadatas", "embeddings"])
    except (ShardFailureError, NodeUnavailableError) as exc:
        if strict:
            outcome.problems.append(f"read {ask} failed with a live primary: {exc!r}")
        return
    outcome.reads_ok += 1
    embs = got["embeddings"]
    assert embs is not None
    seen = {
        i: (d, m, tuple(float(x) for x in np.asarray(e, dtype=np.float32)))
        for i, d, m, e in zip(
            got["ids"], got["documents"] or [], got["metadatas"] or [], embs, strict=True
        )
    }
    for i in ask:
        if i in model.unknown:
            continue
        if model.state.get(i) != seen.get(i):
            outcome.problems.append(
                f"stale read of {i}: got {seen.get(i)}, acknowledged {model.state.get(i)}"
            )


async def _repair_if_available(client: ShardedClient, name: str) -> None:
    """Run the anti-entropy pass when the package has one: verify first (hinted handoff alone
    must have converged the copies), then repair (which must then find nothing to do)."""
    if importlib.util.find_spec("sharded_chroma._antientropy") is None:
        return
    from sharded_chroma import _antientropy, _antirepair

    report = await _antientropy.verify(client, collections=[name])
    assert report.pairs, "verify compared no replica"
    assert report.clean, f"copies differ after hint replay: {report}"
    fixed = await _antirepair.repair(client, collections=[name])
    assert fixed.clean, fixed
    copied = sum(len(p.copied) for p in fixed.pairs)
    deleted = sum(len(p.deleted) for p in fixed.pairs)
    assert copied == 0 and deleted == 0, fixed


async def _assert_converged(topology: Topology, name: str, model: Model) -> None:
    union: dict[str, Record] = {}
    for shard in topology.shards:
        primary = await node_records(shard.primary.url, name)
        for replica in shard.replicas:
            held = await node_records(replica.url, name)
            missing = sorted(set(primary) - set(held))
            extra = sorted(set(held) - set(primary))
            differ = sorted(i for i in set(primary) & set(held) if primary[i] != held[i])
            assert not (missing or extra or differ), (
                f"shard {shard.name}: {replica.url} differs from {shard.primary.url}: "
                f"missing {missing}, extra {extra}, different {differ}"
            )
        assert not set(union) & set(primary)
        union.update(primary)
    settled = {i: rec for i, rec in clean(union).items() if i not in model.unknown}
    assert sorted(settled) == sorted(model.state), (
        f"missing {sorted(set(model.state) - set(settled))}, "
        f"unexpected {sorted(set(settled) - set(model.state))}"
    )
    wrong = {i: (settled[i], model.state[i]) for i in model.state if settled[i] != model.state[i]}
    assert not wrong, f"wrong content: {wrong}"


async def run_schedule(
    servers: list[LocalChromaServer],
    hints_dir: Path,
    seed: int,
    steps: int,
    kill_primaries: bool,
) -> tuple[Outcome, Chaos, Model]:
    rng = random.Random(seed)
    topology = Topology.build(
        {
            "shards": [
                {
                    "name": f"s{n}",
                    "primary": servers[shard[0]].url,
                    "replicas": [servers[i].url for i in shard[1:]],
                }
                for n, shard in enumerate(LAYOUT)
            ],
            "replication": {
                "write_concern": "one",
                "read_selection": rng.choice(["round_robin", "least_outstanding", "latency"]),
                "hints_dir": str(hints_dir),
                "node_retry_after": 0.1,
                "node_retry_cap": 0.5,
            },
        }
    )
    name = f"property-{seed}"
    chaos = Chaos(servers, rng, kill_primaries)
    model = Model()
    outcome = Outcome()
    strict = not kill_primaries
    client = await sharded_chroma.AsyncHttpClient(topology=topology)
    try:
        col = await client.create_collection(name, embedding_function=None)
        async with anyio.create_task_group() as tg:
            for _ in range(steps):
                r = rng.random()
                if r < 0.07:
                    chaos.kill()
                elif r < 0.13:
                    chaos.restart(tg)
                elif r < 0.28:
                    await _read(col, model, rng, outcome, strict)
                elif r < 0.31:
                    await anyio.sleep(rng.uniform(0.1, 0.5))
                else:
                    await _write(col, model, rng, outcome, strict)
            # Bring everything back, and keep writing and reading while the servers boot and
            # their hints replay.
            for index in sorted(chaos.down):
                chaos.restart(tg, index)
            deadline = time.monotonic() + 60
            while chaos.restarting and time.monotonic() < deadline:
                if rng.random() < 0.7:
                    await _write(col, model, rng, outcome, strict)
                else:
                    await _read(col, model, rng, outcome, strict)
                await anyio.sleep(0.1)
            for _ in range(10):
                await _write(col, model, rng, outcome, strict)
                await _read(col, model, rng, outcome, strict)

        for _ in range(20):
            await client.replay_hints()
            if not await client._runtime.cluster.pending_hints():
                break
            await anyio.sleep(0.2)
        status = await client.status()
        assert all(s.healthy and not s.stale and s.pending_hints == 0 for s in status), status
        await _repair_if_available(client, name)
        assert not outcome.problems, "\n".join(outcome.problems[:20])
        await _assert_converged(topology, name, model)
    finally:
        await client.aclose()
    return outcome, chaos, model


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "kill_primaries"),
    [(1, False), (2, True)],
    ids=["replicas-killed", "any-copy-killed"],
)
async def test_random_kills_and_writes_converge(
    servers: list[LocalChromaServer], tmp_path: Path, seed: int, kill_primaries: bool
) -> None:
    outcome, chaos, model = await run_schedule(
        servers, tmp_path / "hints", seed, steps=70, kill_primaries=kill_primaries
    )
    assert chaos.kills >= 2, chaos.log
    assert outcome.writes >= 40 and outcome.reads >= 10
    if not kill_primaries:
        assert outcome.acknowledged == outcome.writes
        assert outcome.reads_ok == outcome.reads
        assert not model.unknown
    else:
        assert outcome.acknowledged >= 0.7 * outcome.writes, outcome
    assert model.state, "the schedule left records to compare"


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 106))
async def test_random_kills_and_writes_converge_long(
    request: pytest.FixtureRequest, servers: list[LocalChromaServer], tmp_path: Path, seed: int
) -> None:
    if not _slow_requested(request.config):
        pytest.skip("long form: run with -m slow or SHARDED_CHROMA_SLOW=1")
    outcome, chaos, _ = await run_schedule(
        servers, tmp_path / "hints", seed, steps=250, kill_primaries=seed % 2 == 1
    )
    assert chaos.kills >= 4, chaos.log
    if seed % 2 == 0:
        assert outcome.acknowledged == outcome.writes
        assert outcome.reads_ok == outcome.reads
