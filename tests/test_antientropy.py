"""Anti-entropy against real servers: verify finds exactly what was corrupted on a replica,
repair fixes it (also under concurrent writes), hints are replayed first, and the CLI exit codes
say whether the replicas match their primaries."""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import chromadb
import httpx
import numpy as np
import pytest

import sharded_chroma
from sharded_chroma import ShardedClient, Topology
from sharded_chroma._antientropy import verify
from sharded_chroma._antirepair import repair
from sharded_chroma._digest import page_digests
from sharded_chroma.cli import main
from sharded_chroma.cli._repair import render_verify
from sharded_chroma.testing import LocalCluster

pytestmark = pytest.mark.anyio

DIM = 8


class Cluster:
    """Two shards, each a primary and one replica: servers 0+1 are s0, 2+3 are s1."""

    def __init__(self, local: LocalCluster, tmp: Path) -> None:
        self.local = local
        self.urls = local.urls
        self.hints_dir = tmp / "hints"
        self.topology = Topology.build(
            {
                "shards": [
                    {"name": "s0", "primary": self.urls[0], "replicas": [self.urls[1]]},
                    {"name": "s1", "primary": self.urls[2], "replicas": [self.urls[3]]},
                ],
                "replication": {"hints_dir": str(self.hints_dir)},
            }
        )
        self.toml = tmp / "cluster.toml"
        self.toml.write_text(
            f'[replication]\nhints_dir = "{self.hints_dir.as_posix()}"\n'
            f'[[shards]]\nname = "s0"\nprimary = "{self.urls[0]}"\nreplicas = ["{self.urls[1]}"]\n'
            f'[[shards]]\nname = "s1"\nprimary = "{self.urls[2]}"\nreplicas = ["{self.urls[3]}"]\n'
        )

    @property
    def replicas(self) -> dict[str, str]:
        return {"s0": self.urls[1], "s1": self.urls[3]}

    async def client(self) -> ShardedClient:
        return await sharded_chroma.AsyncHttpClient(topology=self.topology)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("antientropy")
    local = LocalCluster(4, tmp / "servers")
    local.start(timeout=180)
    try:
        yield Cluster(local, tmp)
    finally:
        local.stop()


@functools.cache
def official(url: str) -> Any:
    # Cached: creating one costs a few hundred milliseconds of pre-flight checks.
    parts = urlsplit(url)
    return chromadb.HttpClient(
        host=parts.hostname or "",
        port=parts.port or 80,
        settings=chromadb.Settings(anonymized_telemetry=False),
    )


def direct(url: str, name: str) -> Any:
    """The collection on one node, through the official client: how drift is made."""
    return official(url).get_collection(name, embedding_function=None)


def rewrite(col: Any, record_id: str, **fields: Any) -> None:
    """Change a document or uri in place; the stored embedding is passed along, because
    without one the official client computes it with its default model."""
    kept = col.get(ids=[record_id], include=["embeddings"])["embeddings"]
    col.update(ids=[record_id], embeddings=kept, **fields)


def vectors(n: int, seed: int) -> list[list[float]]:
    return np.random.default_rng(seed).random((n, DIM), dtype=np.float32).tolist()


async def load(client: ShardedClient, name: str, n: int) -> None:
    """``n`` records with documents and uris, and ``n // 4`` plain ones with neither."""
    col = await client.create_collection(name, embedding_function=None)
    await col.add(
        ids=[f"doc-{i}" for i in range(n)],
        embeddings=vectors(n, 1),
        documents=[f"text {i}" for i in range(n)],
        metadatas=[{"n": i, "tag": "a" if i % 2 else "b"} for i in range(n)],
        uris=[f"s3://bucket/{i}" for i in range(n)],
    )
    await col.add(ids=[f"plain-{i}" for i in range(n // 4)], embeddings=vectors(n // 4, 2))


def on(url: str, name: str, prefix: str) -> list[str]:
    """Ids with ``prefix`` held by one node, in a stable order."""
    ids = direct(url, name).get(include=[])["ids"]
    return sorted(i for i in ids if i.startswith(prefix))


# -- pure -------------------------------------------------------------------------------------


def test_digest_is_canonical() -> None:
    def page(**row: Any) -> dict[str, Any]:
        base = {"embedding": [1.1, 2.0], "document": "d", "uri": None, "metadata": {"a": 1}}
        base.update(row)
        return {
            "ids": ["x"],
            "embeddings": [base["embedding"]],
            "documents": [base["document"]],
            "uris": [base["uri"]],
            "metadatas": [base["metadata"]],
        }

    (_, ref), *_ = page_digests(page())
    # The float32 the server stores, however its float text is written; keys in any order.
    assert page_digests(page(embedding=[1.100000023841858, 2]))[0][1] == ref
    assert page_digests(page(metadata={"a": 1}))[0][1] == ref
    two = page_digests(page(metadata={"b": 2, "a": 1}))[0][1]
    assert two == page_digests(page(metadata={"a": 1, "b": 2}))[0][1] != ref
    for changed in (
        {"embedding": [1.1, 2.5]},
        {"document": None},
        {"document": ""},
        {"uri": "d"},
        {"metadata": None},
        {"metadata": {"a": 1.5}},
        {"metadata": {"a": "1"}},
    ):
        assert page_digests(page(**changed))[0][1] != ref, changed


# -- verify and repair ------------------------------------------------------------------------


async def test_verify_finds_exactly_the_drift_and_repair_fixes_it(cluster: Cluster) -> None:
    name = "ae-drift"
    async with await cluster.client() as client:
        await load(client, name, 400)
        first = await verify(client, collections=[name])
        assert first.clean and len(first.pairs) == 2
        assert sum(p.primary_records for p in first.pairs) == 500
        assert all(p.primary_records == p.replica_records for p in first.pairs)

        # s0's replica: 15 records lost, one new document, one extra metadata key, one moved
        # embedding, one record the primary never had.
        r0 = direct(cluster.replicas["s0"], name)
        docs0 = on(cluster.replicas["s0"], name, "doc-")
        lost0 = docs0[:15]
        r0.delete(ids=lost0)
        rewrite(r0, docs0[20], documents=["rewritten"])
        r0.update(ids=[docs0[21]], metadatas=[{"stray": True}])
        r0.update(ids=[docs0[22]], embeddings=vectors(1, 99))
        r0.add(ids=["intruder-0"], embeddings=vectors(1, 3))
        # s1's replica: a changed value, a document and a uri on records that have none on the
        # primary (upsert cannot clear those, so repair must replace the record), two extras.
        r1 = direct(cluster.replicas["s1"], name)
        docs1 = on(cluster.replicas["s1"], name, "doc-")
        plain1 = on(cluster.replicas["s1"], name, "plain-")
        r1.delete(ids=[docs1[0]])
        r1.update(ids=[docs1[1]], metadatas=[{"n": 999}])
        rewrite(r1, plain1[0], documents=["should not be here"])
        rewrite(r1, plain1[1], uris=["s3://nowhere"])
        r1.add(ids=["intruder-1", "intruder-2"], embeddings=vectors(2, 4))

        progress: list[tuple[int, int]] = []
        found = await verify(
            client, collections=[name], page_size=64, progress=lambda d, t: progress.append((d, t))
        )
        assert not found.clean
        by_shard = {p.shard: p for p in found.pairs}
        assert by_shard["s0"].missing == tuple(sorted(lost0))
        assert by_shard["s0"].extra == ("intruder-0",)
        assert set(by_shard["s0"].differing) == {docs0[20], docs0[21], docs0[22]}
        assert by_shard["s1"].missing == (docs1[0],)
        assert by_shard["s1"].extra == ("intruder-1", "intruder-2")
        assert set(by_shard["s1"].differing) == {docs1[1], plain1[0], plain1[1]}
        assert found.differences == 15 + 1 + 3 + 1 + 2 + 3
        assert all(p.replica == cluster.replicas[p.shard] for p in found.pairs)
        # Progress counts records read, never past its total, and ends at it.
        assert progress[-1][0] == progress[-1][1] == found.records_read
        assert all(done <= total for done, total in progress)
        # The text caps id lists; the object keeps them all.
        text = render_verify(found)
        assert "missing on replica (15)" in text and "... and 5 more" in text
        assert "intruder-0" in text and "DIFFERENT" in text

        fixed = await repair(client, collections=[name], page_size=64)
        assert fixed.clean, fixed
        by_shard_fixed = {p.shard: p for p in fixed.pairs}
        # Versions decide: the edits by hand kept each record's version, so the tie goes to
        # the primary; a record on one copy only with no tombstone of a missed delete is a
        # write the other copy missed, so the intruders are copied to the primaries.
        assert set(by_shard_fixed["s0"].copied) == {
            *lost0,
            docs0[20],
            docs0[21],
            docs0[22],
            "intruder-0",
        }
        assert by_shard_fixed["s0"].deleted == ()
        assert set(by_shard_fixed["s1"].copied) == {
            docs1[0],
            docs1[1],
            plain1[0],
            plain1[1],
            "intruder-1",
            "intruder-2",
        }
        assert by_shard_fixed["s1"].deleted == ()
        assert (await verify(client, collections=[name])).clean
    assert len(on(cluster.replicas["s1"], name, "late-")) == len(on(cluster.urls[2], name, "late-"))

    # Exactly the primary's records, the hidden sequence included.
    for shard, primary in (("s0", cluster.urls[0]), ("s1", cluster.urls[2])):
        ids = on(primary, name, "")
        include: Any = ["embeddings", "documents", "metadatas", "uris"]
        want = direct(primary, name).get(ids=ids, include=include)
        have = direct(cluster.replicas[shard], name).get(ids=ids, include=include)
        order = {i: k for k, i in enumerate(have["ids"])}
        for k, record_id in enumerate(want["ids"]):
            j = order[record_id]
            assert have["metadatas"][j] == want["metadatas"][k]
            # Intruders were added by hand, without the client's hidden keys.
            assert record_id.startswith("intruder") or "_sc_seq" in want["metadatas"][k]
            assert have["documents"][j] == want["documents"][k]
            assert have["uris"][j] == want["uris"][k]
            assert np.array_equal(have["embeddings"][j], want["embeddings"][k])


async def test_repair_under_concurrent_writes_settles(cluster: Cluster) -> None:
    name = "ae-live"
    async with await cluster.client() as client:
        await load(client, name, 300)
        col = await client.get_collection(name, embedding_function=None)
        # Drift on ids the writer never touches, so what repair must fix is known.
        lost = on(cluster.replicas["s0"], name, "doc-")[:10]
        changed = on(cluster.replicas["s1"], name, "doc-")[:5]
        direct(cluster.replicas["s0"], name).delete(ids=lost)
        direct(cluster.replicas["s1"], name).update(
            ids=changed, metadatas=[{"n": -1}] * len(changed)
        )
        rng = random.Random(7)
        stop = anyio.Event()
        writes = 0

        async def writer() -> None:
            nonlocal writes
            deadline = time.monotonic() + 3.0
            k = 0
            while time.monotonic() < deadline:
                k += 1
                ids = [f"live-{rng.randrange(120)}" for _ in range(6)]
                ids = list(dict.fromkeys(ids))
                await col.upsert(
                    ids=ids,
                    embeddings=vectors(len(ids), k),
                    documents=[f"v{k}" for _ in ids],
                    metadatas=[{"k": k} if k % 2 else {"other": k} for _ in ids],
                )
                if k % 3 == 0:
                    gone = {f"live-{rng.randrange(120)}" for _ in range(3)}
                    await col.delete(ids=sorted(gone))
                writes += 1
                await anyio.sleep(0.005)
            stop.set()

        reports = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            while not stop.is_set():
                reports.append(await repair(client, collections=[name], page_size=50, rounds=2))
        assert writes >= 3 and reports
        final = await repair(client, collections=[name])
        assert final.clean, final
        # A scan under traffic can miss a record (offsets shift); the next run finds it.
        fixed = {i for r in [*reports, final] for p in r.pairs for i in p.copied}
        assert set(lost) | set(changed) <= fixed
        after = await verify(client, collections=[name])
        assert after.clean, render_verify(after)
        assert sum(p.primary_records for p in after.pairs) == await col.count()


async def test_hints_are_replayed_before_repair(cluster: Cluster) -> None:
    name = "ae-hints"
    replica = cluster.local.servers[3]  # s1's replica
    async with await cluster.client() as client:
        await load(client, name, 40)
        col = await client.get_collection(name, embedding_function=None)
        replica.kill()
        try:
            with sharded_chroma.options(write_concern="one"):
                await col.upsert(ids=[f"late-{i}" for i in range(30)], embeddings=vectors(30, 5))
            down = await verify(client, collections=[name])
            s1 = next(p for p in down.pairs if p.shard == "s1")
            assert s1.error is not None and "unavailable" in s1.error
            assert s1.stale and s1.pending_hints > 0
            assert not down.clean and "NOT COMPARED" in render_verify(down)
        finally:
            replica.restart()
    # A fresh client on this host finds the hints and repair replays them first. Without the
    # background replayer, which would otherwise often drain them before repair starts.
    quiet = cluster.topology.model_copy(
        update={
            "replication": cluster.topology.replication.model_copy(
                update={"replay_in_background": False}
            )
        }
    )
    async with ShardedClient(quiet) as client:
        fixed = await repair(client, collections=[name])
        assert fixed.hints_replayed.get(cluster.replicas["s1"], 0) > 0
        assert fixed.clean and not any(p.copied for p in fixed.pairs)
        assert (await verify(client, collections=[name])).clean
    assert len(on(cluster.replicas["s1"], name, "late-")) == len(on(cluster.urls[2], name, "late-"))


async def pending(client: ShardedClient, url: str) -> int:
    """Hints pending for one copy, as ``status()`` reports them."""
    (found,) = [s for s in await client.status(node_deadline=2.0) if s.url == url]
    return found.pending_hints


async def test_time_buckets_are_replicated_hinted_and_repaired(cluster: Cluster) -> None:
    name = "ae-time"
    t0 = 1_764_115_200  # 2025-11-26T00:00:00Z
    policy = sharded_chroma.TimePolicy(field="ts", granularity="day", hot="s1")
    replica = cluster.local.servers[3]  # s1's replica
    async with await cluster.client() as client:
        col = await client.create_collection(name, embedding_function=None, policy=policy)
        await col.add(ids=["a", "b"], embeddings=vectors(2, 1), metadatas=[{"ts": t0}] * 2)
        # The replica's companion database of time buckets, read with the official client.
        parts = chromadb.HttpClient(
            host=urlsplit(cluster.replicas["s1"]).hostname or "",
            port=urlsplit(cluster.replicas["s1"]).port or 80,
            database="default_database.sc-parts",
            settings=chromadb.Settings(anonymized_telemetry=False),
        )
        bucket = f"{col.id}-2025-11-26"
        assert set(parts.get_collection(bucket).get()["ids"]) == {"a", "b"}
        replica.kill()
        try:
            with sharded_chroma.options(write_concern="one"):
                await col.add(ids=["c"], embeddings=vectors(1, 2), metadatas=[{"ts": t0 + 5}])
            # The missed write is kept as a hint for that copy.
            assert await pending(client, cluster.replicas["s1"]) >= 1
        finally:
            replica.restart()
        # Replayed by this call or already by the background replayer (which also starts when
        # the copy answers again): either way none is left and the copy has the record.
        await client.replay_hints()
        assert await pending(client, cluster.replicas["s1"]) == 0
        assert set(parts.get_collection(bucket).get()["ids"]) == {"a", "b", "c"}
        # Drift inside a bucket is found and repaired like any collection's.
        parts.get_collection(bucket).delete(ids=["a"])
        report = await verify(client, collections=[name])
        drifted = [p for p in report.pairs if not p.clean]
        assert [(p.collection, p.missing) for p in drifted] == [(f"{name}/2025-11-26", ("a",))]
        assert (await repair(client, collections=[name])).clean
        assert set(parts.get_collection(bucket).get()["ids"]) == {"a", "b", "c"}
        # A bucket missing on a copy altogether is made there by repair, then filled.
        parts.delete_collection(bucket)
        assert not (await verify(client, collections=[name])).clean
        assert (await repair(client, collections=[name])).clean
        assert set(parts.get_collection(bucket).get()["ids"]) == {"a", "b", "c"}


# -- CLI --------------------------------------------------------------------------------------


def test_cli_exit_codes(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    name = "ae-cli"

    async def setup() -> None:
        async with await cluster.client() as client:
            await load(client, name, 60)

    anyio.run(setup)
    victim = on(cluster.replicas["s0"], name, "doc-")[0]
    direct(cluster.replicas["s0"], name).delete(ids=[victim])
    args = ["--topology", str(cluster.toml), "--collection", name]

    assert main(["verify", *args]) == 1
    out = capsys.readouterr().out
    assert f"missing on replica (1): {victim}" in out and "DIFFERENT" in out
    assert main(["repair", *args, "--page-size", "25"]) == 0
    out = capsys.readouterr().out
    assert "copied 1, deleted 0" in out and "clean" in out
    assert main(["verify", *args]) == 0
    assert "clean: every replica matches its primary" in capsys.readouterr().out

    # Primaries only: nothing to compare, and it says so.
    assert main(["verify", "--shards", cluster.urls[0], cluster.urls[2]]) == 0
    assert "nothing to compare" in capsys.readouterr().out
    assert main(["verify", "--topology", str(cluster.toml), "--collection", "no-such"]) == 1
    assert "NotFoundError" in capsys.readouterr().err


async def test_a_rebuilt_collections_generation_is_verified_and_repaired(
    cluster: Cluster, tmp_path: Path
) -> None:
    """After a rebuild the records live in the new generation's collections: a replica copy
    of one that lost records is found and repaired there (the emptied roots agree anyway)."""
    name = "ae-rebuilt"
    shards = [
        {"name": "s0", "primary": cluster.urls[0], "replicas": [cluster.urls[1]]},
        {"name": "s1", "primary": cluster.urls[2], "replicas": [cluster.urls[3]]},
    ]
    topology = Topology.build(
        {
            "shards": shards,
            "replication": {"hints_dir": str(cluster.hints_dir)},
            "control": {"backend": "sqlite", "path": str(tmp_path / "control.db")},
        }
    )
    async with await sharded_chroma.AsyncHttpClient(topology=topology) as client:
        await load(client, name, 120)
        report = await client.rebuild(name, {"max_neighbors": 12})
        assert report.steps[-1] == "done"
        col = await client.get_collection(name, embedding_function=None)
        assert (await verify(client, collections=[name])).clean

        # Lose records on s0's replica copy of generation 1, behind the client's back.
        base = "/api/v2/tenants/default_tenant/databases/default_database.sc-parts/collections"
        async with httpx.AsyncClient(base_url=cluster.replicas["s0"], trust_env=False) as http:
            raw = (await http.get(f"{base}/{col.id}-gen1")).json()
            held = (await http.post(f"{base}/{raw['id']}/get", json={"include": []})).json()
            lost = sorted(held["ids"])[:7]
            deleted = await http.post(f"{base}/{raw['id']}/delete", json={"ids": lost})
            deleted.raise_for_status()

        found = await verify(client, collections=[name])
        assert not found.clean
        by_name = {(p.collection, p.shard): p for p in found.pairs}
        assert by_name[(f"{name}/gen1", "s0")].missing == tuple(lost)
        assert by_name[(name, "s0")].primary_records == 0  # the emptied root
        await repair(client, collections=[name])
        assert (await verify(client, collections=[name])).clean
        assert await col.count() == 150
