"""Backups against real servers: export a collection, import it into another shard count,
resume a killed import, restore a chain of incremental exports, and refuse bad files before
anything is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import orjson
import pytest

import sharded_chroma
from sharded_chroma import BackupFileError, HashPolicy, TimePolicy
from sharded_chroma.testing import LocalChromaServer
from tests._servers import own_cluster

pytestmark = pytest.mark.anyio

DAY = 86400
T0 = 1_764_115_200  # 2025-11-26T00:00:00Z
FULL: Any = ["embeddings", "metadatas", "documents", "uris"]


def _records(n: int, start: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(start)
    ids = [f"r{i:04d}" for i in range(start, start + n)]
    metas = [
        {
            "ts": T0 + (i % 4) * DAY + i,
            "i": i,
            "f": i / 7,
            "b": i % 2 == 0,
            "s": f"v{i % 5}",
            **({"extra": "x"} if i % 3 == 0 else {}),
        }
        for i in range(start, start + n)
    ]
    return {
        "ids": ids,
        "embeddings": rng.standard_normal((n, 8)).astype(np.float32),
        "metadatas": metas,
        "documents": [f"doc {i}" for i in range(start, start + n)],
        "uris": [f"s3://bucket/{i}" for i in range(start, start + n)],
    }


@pytest.fixture(params=["jsonl", "parquet"])
def fmt(request: pytest.FixtureRequest) -> str:
    """The backup file's format, chosen by its suffix."""
    return str(request.param)


def _typed(meta: Any) -> Any:
    return None if meta is None else {k: (type(v).__name__, v) for k, v in meta.items()}


def assert_same_records(a: Any, b: Any) -> None:
    """Equal record for record, in order: float32 embeddings bit for bit, metadata types."""
    assert a["ids"] == b["ids"]
    assert a["documents"] == b["documents"] and a["uris"] == b["uris"]
    assert [_typed(m) for m in a["metadatas"]] == [_typed(m) for m in b["metadatas"]]
    ea = np.asarray(a["embeddings"], dtype=np.float32)
    eb = np.asarray(b["embeddings"], dtype=np.float32)
    assert ea.tobytes() == eb.tobytes()


async def _source(shard_urls: list[str]) -> tuple[Any, Any]:
    client = await sharded_chroma.AsyncHttpClient(shards=shard_urls)
    policy = TimePolicy(
        field="ts", granularity="day", hot="s2", buckets={"2025-11-26": "s0", "2025-11-27": "s1"}
    )
    col = await client.create_collection(
        "backed",
        embedding_function=None,
        metadata={"owner": "team-a"},
        configuration={"hnsw": {"space": "ip", "ef_construction": 150}},
        policy=policy,
    )
    await col.add(**_records(150))
    return client, col


async def test_round_trip_into_two_and_four_shards(
    oracle_url: str, shard_urls: list[str], tmp_path: Path, fmt: str
) -> None:
    client, col = await _source(shard_urls)
    try:
        path = tmp_path / f"backed.{fmt}"
        report = await client.export_collection("backed", path, batch_size=40)
        assert report.records == report.scanned == 150
        live = await col.get(include=FULL)
    finally:
        await client.aclose()
    for urls, name in ((shard_urls[:2], "two"), ([oracle_url, *shard_urls], "four")):
        async with await sharded_chroma.AsyncHttpClient(shards=urls) as target:
            done = await target.import_collection(
                [path], name=name, policy={"kind": "hash"}, batch_size=35
            )
            assert done.records == 150
            restored = await target.get_collection(name, embedding_function=None)
            assert_same_records(live, await restored.get(include=FULL))
            assert restored.metadata == {"owner": "team-a"}
            hnsw = restored.configuration_json["hnsw"]
            assert (hnsw["space"], hnsw["ef_construction"]) == ("ip", 150)
            assert isinstance(await restored.get_policy(), HashPolicy)
            layout = await target.layout(name)
            assert len(layout.shards) == len(urls) and all(layout.shards.values())
            # Importing again changes nothing and duplicates nothing.
            again = await target.import_collection(
                [path], name=name, cursor=tmp_path / f"again-{name}"
            )
            assert again.records == 150
            assert await restored.count() == 150
            assert_same_records(live, await restored.get(include=FULL))


async def test_incremental_chain_equals_the_live_collection(
    shard_urls: list[str], oracle_url: str, tmp_path: Path, fmt: str
) -> None:
    client, col = await _source(shard_urls)
    try:
        await anyio.sleep(1.2)  # the records get older than the margin below
        await client.export_collection("backed", tmp_path / f"0.{fmt}")
        await col.upsert(**{k: v[:10] for k, v in _records(20, start=140).items()})
        await col.update(ids=["r0003", "r0006"], metadatas=[{"i": -3}, {"i": -6, "extra": None}])
        await col.update(ids=["r0009"], documents=["rewritten"], embeddings=[[0.5] * 8])
        await col.delete(ids=["r0001", "r0002", "r0100"])
        # Deleted and added again without a document or uri: the restore must lose them too.
        await col.delete(ids=["r0020"])
        await col.add(ids=["r0020"], embeddings=[[0.25] * 8], metadatas=[{"ts": T0}])
        first = await client.export_collection(
            "backed", tmp_path / f"1.{fmt}", since=tmp_path / f"0.{fmt}", since_margin=1.0
        )
        assert first.incremental and first.records < first.scanned
        await col.delete(ids=["r0010"])
        await col.add(**_records(3, start=500))
        await client.export_collection(
            "backed", tmp_path / f"2.{fmt}", since=tmp_path / f"1.{fmt}", since_margin=1.0
        )
        live = await col.get(include=FULL)
    finally:
        await client.aclose()
    chain = [tmp_path / f"{n}.{fmt}" for n in range(3)]
    async with await sharded_chroma.AsyncHttpClient(shards=[oracle_url]) as target:
        report = await target.import_collection(chain, name="chain", policy={"kind": "hash"})
        assert report.deleted == 4
        restored = await target.get_collection("chain", embedding_function=None)
        got = await restored.get(include=FULL)
        assert_same_records(live, got)
        assert got["documents"][got["ids"].index("r0020")] is None
        # The default cursor beside the first file says "done"; after the target is
        # dropped it refuses to skip anything rather than import nothing.
        again = await target.import_collection(chain, name="chain")
        assert again.resumed and again.records == 0
        await target.delete_collection("chain")
        with pytest.raises(BackupFileError, match="which is gone"):
            await target.import_collection(chain, name="chain")
        assert await target.count_collections() == 0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sharded_chroma.cli", *args]


def _kill_midway(args: list[str], cursor: Path) -> None:
    """Start the import and SIGKILL it (by its pid) once its cursor is past 20 records."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if cursor.exists() and orjson.loads(cursor.read_bytes())["records"] >= 20:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the import ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)


def _run(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, capture_output=True, timeout=120, check=False)


async def test_killed_import_resumes_without_duplicates(
    shard_urls: list[str], oracle_url: str, tmp_path: Path, fmt: str
) -> None:
    client, col = await _source(shard_urls)
    try:
        path = tmp_path / f"backed.{fmt}"
        await client.export_collection("backed", path)
        live = await col.get(include=FULL)
    finally:
        await client.aclose()
    cursor = tmp_path / "cursor"
    args = _cli("import", "--shards", *shard_urls[:2], "--collection", "resumed")
    args += ["--policy", '{"kind": "hash"}']
    args += ["--batch", "5", "--cursor", str(cursor), str(path)]
    await anyio.to_thread.run_sync(_kill_midway, args, cursor)
    async with await sharded_chroma.AsyncHttpClient(shards=shard_urls[:2]) as target:
        restored = await target.get_collection("resumed", embedding_function=None)
        partial = await restored.count()
        assert 20 <= partial < 150
    done = await anyio.to_thread.run_sync(_run, args)
    assert done.returncode == 0, done.stderr.decode()
    assert b"(resumed)" in done.stdout
    async with await sharded_chroma.AsyncHttpClient(shards=shard_urls[:2]) as target:
        restored = await target.get_collection("resumed", embedding_function=None)
        assert await restored.count() == 150
        assert_same_records(live, await restored.get(include=FULL))


async def test_bad_files_are_refused_before_anything_is_written(
    shard_urls: list[str], oracle_url: str, tmp_path: Path
) -> None:
    client, col = await _source(shard_urls)
    try:
        good = tmp_path / "good.jsonl"
        await client.export_collection("backed", good)
        await col.upsert(**{k: v[:1] for k, v in _records(1, start=900).items()})
        inc = tmp_path / "inc.jsonl"
        await client.export_collection("backed", inc, since=good)
        await client.export_collection("backed", tmp_path / "inc2.jsonl", since=inc)
        with pytest.raises(ValueError, match="would overwrite"):
            await client.export_collection("backed", inc, since=inc)
    finally:
        await client.aclose()
    lines = good.read_bytes().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(lines[:-1]) + lines[-1][:10])
    changed = tmp_path / "changed.jsonl"
    changed.write_bytes(b"".join([lines[0], lines[1].replace(b"doc", b"dog"), *lines[2:]]))
    future = tmp_path / "future.jsonl"
    future.write_bytes(b"".join([lines[0].replace(b'"version":1', b'"version":9'), *lines[1:]]))
    cases = [
        ([cut], "cut short"),
        ([tmp_path / "truncated.jsonl"], "cut short: no end line after 39 records"),
        ([tmp_path / "missing.jsonl"], "no such export file"),
        ([changed], "changed since it was written"),
        ([future], "format version 9"),
        ([inc], "is an incremental export"),
        ([good, tmp_path / "inc2.jsonl"], "out of order or has a gap"),
        ([good, good], "is a full export"),
    ]
    (tmp_path / "truncated.jsonl").write_bytes(b"".join(lines[:40]))
    async with await sharded_chroma.AsyncHttpClient(shards=[oracle_url]) as target:
        for files, message in cases:
            with pytest.raises(BackupFileError, match=message) as info:
                await target.import_collection(files, name="refused")
            assert str(files[-1]) in str(info.value) or "gap" in message
        # A mismatching existing target: other dimension, then other space.
        other = await target.create_collection(
            "dims", embedding_function=None, configuration={"hnsw": {"space": "ip"}}
        )
        await other.add(ids=["x"], embeddings=[[1.0, 2.0]])
        with pytest.raises(BackupFileError, match="8 dimensions"):
            await target.import_collection([good], name="dims")
        await target.create_collection(
            "space", embedding_function=None, configuration={"hnsw": {"space": "l2"}}
        )
        with pytest.raises(BackupFileError, match="'ip'"):
            await target.import_collection([good], name="space")
        with pytest.raises(sharded_chroma.ConfigurationError, match="keeps its own policy"):
            await target.import_collection([good], name="space", policy={"kind": "hash"})
        names = sorted(c.name for c in await target.list_collections())
        assert names == ["dims", "space"]
        assert await other.count() == 1


@pytest.fixture(scope="module")
def extra_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two more servers, so the source can have three shards with a replica each."""
    with own_cluster(2, tmp_path_factory.mktemp("backup-replicas")) as cluster:
        yield cluster.urls


async def test_export_of_replicated_shards_with_a_copy_behind(
    oracle_url: str,
    cluster_servers: list[LocalChromaServer],
    extra_servers: list[str],
    tmp_path: Path,
) -> None:
    """Three shards with a replica each and a time policy; one copy is down while records
    are written and deleted, then comes back behind (its missed writes are hints). The export
    reads only copies that hold everything acknowledged, and its restores into two and into
    four shards (hash policy) equal the live collection."""
    primaries = [s.url for s in cluster_servers]
    replicas = [extra_servers[0], extra_servers[1], oracle_url]
    topology = sharded_chroma.Topology.build(
        {
            "shards": [
                {"name": f"s{i}", "primary": primaries[i], "replicas": [replicas[i]]}
                for i in range(3)
            ],
            "replication": {"hints_dir": str(tmp_path / "hints"), "write_concern": "one"},
        }
    )
    async with await sharded_chroma.AsyncHttpClient(topology=topology) as client:
        policy = TimePolicy(
            field="ts",
            granularity="day",
            hot="s2",
            buckets={"2025-11-26": "s0", "2025-11-27": "s1"},
        )
        col = await client.create_collection("replicated", embedding_function=None, policy=policy)
        await col.add(**_records(60))
        cluster_servers[1].stop()  # s1's primary: s1's replica alone takes the next writes
        await col.add(**_records(60, start=60))
        await col.delete(ids=["r0001", "r0065"])
        cluster_servers[1].restart()  # back, and behind until its hints are replayed
        path = tmp_path / "replicated.jsonl"
        report = await client.export_collection("replicated", path, batch_size=25)
        assert report.records == 118
        live = await col.get(include=FULL)
    for urls in ([primaries[0], replicas[0]], [oracle_url, *primaries]):
        async with await sharded_chroma.AsyncHttpClient(shards=urls) as target:
            name = f"from_replicated_{len(urls)}"
            await target.import_collection([path], name=name, policy={"kind": "hash"})
            restored = await target.get_collection(name, embedding_function=None)
            assert_same_records(live, await restored.get(include=FULL))
            assert all((await target.layout(name)).shards.values())


async def test_bad_parquet_files_are_refused(
    shard_urls: list[str], oracle_url: str, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    client, _ = await _source(shard_urls)
    try:
        good = tmp_path / "good.parquet"
        await client.export_collection("backed", good)
    finally:
        await client.aclose()
    data = good.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    # Rewritten with one document changed but the header and end copied: the digest differs.
    table = pq.read_table(good)
    docs = table.column("document").to_pylist()
    docs[3] = "changed"
    changed = tmp_path / "changed.parquet"
    kv = pq.ParquetFile(good).metadata.metadata
    writer = pq.ParquetWriter(changed, table.schema)
    writer.write_table(table.set_column(2, "document", [docs]))
    writer.add_key_value_metadata({k.decode(): v.decode() for k, v in kv.items() if b"end" in k})
    writer.close()
    unfinished = tmp_path / "unfinished.parquet"
    pq.write_table(table, unfinished)  # the header, but no end: the export never finished
    async with await sharded_chroma.AsyncHttpClient(shards=[oracle_url]) as target:
        for path, message in (
            (cut, "not a sharded-chroma export|cut short or not a Parquet file"),
            (changed, "changed since it was written"),
            (unfinished, "cut short: the export never finished"),
        ):
            with pytest.raises(BackupFileError, match=message) as info:
                await target.import_collection([path], name="refused")
            assert str(path) in str(info.value)
        assert await target.count_collections() == 0
