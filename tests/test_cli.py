"""The sharded-chroma command: demo, status and dev, run for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sharded_chroma
from sharded_chroma.cli import main
from sharded_chroma.cli._corpus import batches
from sharded_chroma.cli._progress import Progress
from sharded_chroma.testing import LocalChromaServer

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "sharded_chroma.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def test_demo_runs_end_to_end() -> None:
    proc = _run_cli("demo", "--records", "3000", "--dim", "16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "ingested 3,000 records" in out
    assert "collection count (summed over shards): 3,000" in out
    assert "doc-001000" in out  # get(limit=5, offset=1000) starts at the 1001st record
    assert "query where={'region': 'eu'}: asked 1 of 3 shard(s)" in out
    assert "query where=None: asked 3 of 3 shard(s)" in out
    assert out.count(" ok ") == 3  # three healthy shards in the status table
    assert "collection 'demo-regions' (field policy)" in out
    assert "servers stopped" in out


def test_bad_arguments_exit_cleanly() -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--records", "0"])
    assert "--records must be at least 1" in str(info.value)
    with pytest.raises(SystemExit):
        main(["status"])  # needs --topology or --shards


def test_status_shows_counts_and_down_shards(
    shard_urls: list[str],
    cluster_servers: list[LocalChromaServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    import anyio

    async def load() -> None:
        async with await sharded_chroma.AsyncHttpClient(shards=shard_urls) as client:
            col = await client.create_collection("cli-status", embedding_function=None)
            await col.add(
                ids=[f"r{i}" for i in range(90)], embeddings=[[i, 1.0] for i in range(90)]
            )

    anyio.run(load)
    assert main(["status", "--shards", *shard_urls]) == 0
    out = capsys.readouterr().out
    assert "total records 90" in out
    assert out.count("cli-status") == 3
    cluster_servers[2].kill()
    try:
        assert main(["status", "--shards", *shard_urls]) == 0
        out = capsys.readouterr().out
        assert "DOWN" in out and shard_urls[2] in out
        assert out.count(" ok ") == 2
    finally:
        cluster_servers[2].restart()


def test_status_layout_and_drop_partitions(
    shard_urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    import anyio

    day = 86400
    t0 = 1_764_115_200  # 2025-11-26T00:00:00Z

    async def load() -> None:
        async with await sharded_chroma.AsyncHttpClient(shards=shard_urls) as client:
            regions = await client.create_collection(
                "cli-regions",
                embedding_function=None,
                policy=sharded_chroma.FieldPolicy(
                    field="region", partitions={"eu": ("s0",), "us": ("s1", "s2")}
                ),
            )
            await regions.add(
                ids=[f"r{i}" for i in range(30)],
                embeddings=[[i, 1.0] for i in range(30)],
                metadatas=[{"region": "eu" if i < 10 else "us"} for i in range(30)],
            )
            events = await client.create_collection(
                "cli-events",
                embedding_function=None,
                policy=sharded_chroma.TimePolicy(field="ts", granularity="day", hot="s1"),
            )
            await events.add(
                ids=[f"e{i}" for i in range(12)],
                embeddings=[[i, 1.0] for i in range(12)],
                metadatas=[{"ts": t0 + (i % 3) * day} for i in range(12)],
            )

    anyio.run(load)
    args = ["--shards", *shard_urls]
    assert main(["status", *args, "--collection", "cli-regions", "--collection", "cli-events"]) == 0
    out = capsys.readouterr().out
    assert "collection 'cli-regions' (field policy)" in out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "eu s0 10" in lines and "us s1, s2 20" in lines
    assert "2025-11-26 s1 4" in lines and "2025-11-28 s1 4" in lines
    assert "total records 12; largest deviation from the mean 0.0%" in lines
    assert out.count("cli-events/2025-11-27") == 1  # the bucket as a physical collection on s1
    drop = ["drop-partitions", *args, "--collection", "cli-events", "--before", "2025-11-28"]
    assert main([*drop, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would drop bucket 2025-11-26 on shard s1" in out
    assert "2 bucket(s) would be dropped (dry run)" in out
    assert main(drop) == 0
    assert "dropped bucket 2025-11-27 on shard s1" in capsys.readouterr().out
    assert main([*drop[:-1], "not-a-time"]) == 1
    assert "is not an ISO-8601" in capsys.readouterr().err
    assert main(["drop-partitions", *args, "--collection", "cli-regions", "--before", "0"]) == 1
    assert "only a time policy" in capsys.readouterr().err


@pytest.mark.parametrize("control", ["sqlite", "etcd"])
def test_dev_writes_topology_and_stops_on_sigterm(tmp_path: Path, control: str) -> None:
    topo = tmp_path / "cluster.toml"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sharded_chroma.cli",
            "dev",
            "--shards",
            "2",
            "--data-dir",
            str(tmp_path / "data"),
            "--topology-out",
            str(topo),
            "--control",
            control,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not topo.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert topo.exists(), "dev did not write its topology"
        loaded = sharded_chroma.Topology.from_toml(topo)
        assert len(loaded.shards) == 2
        assert loaded.control is not None and loaded.control.backend == control
        import anyio

        async def ping() -> int:
            # The client follows the control store dev set up (for etcd: the member it runs).
            async with await sharded_chroma.AsyncHttpClient(topology=topo) as client:
                col = await client.create_collection("dev-check", embedding_function=None)
                assert (await client.partition_map(col.name)).epoch == 0
                return await client.heartbeat()

        assert anyio.run(ping) > 0
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "stopped." in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The servers (and the etcd member) are gone once dev has exited.
    ports = [int(shard.primary.url.rsplit(":", 1)[1]) for shard in loaded.shards]
    ports += [int(e.rsplit(":", 1)[1]) for e in loaded.control.endpoints]
    for port in ports:
        with pytest.raises(OSError):
            import socket

            socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_corpus_is_deterministic_and_batch_independent() -> None:
    whole = next(batches(10, 8, 10))
    again = next(batches(10, 8, 10))
    assert whole.ids == again.ids and (whole.embeddings == again.embeddings).all()
    parts = list(batches(10, 8, 4))
    assert [i for b in parts for i in b.ids] == [f"doc-{k:06d}" for k in range(10)]
    assert len({m["region"] for m in whole.metadatas}) == 3


def test_progress_lines() -> None:
    import io

    stream = io.StringIO()
    p = Progress("ingest", 10, stream=stream, every=0)
    p.advance(4)
    p.advance(6)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("ingest: 4/10 (40%)")
    assert lines[-1].startswith("ingest: 10/10 (100%)")


def test_status_latency_percentiles_and_watch(
    shard_urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    import anyio

    async def probe() -> tuple[sharded_chroma.ShardStatus, ...]:
        async with sharded_chroma.ShardedClient(
            sharded_chroma.Topology.from_urls(shard_urls)
        ) as client:
            return await client.status(probes=7)

    for s in anyio.run(probe):
        assert (s.probes, s.probe_errors, s.error_rate) == (7, 0, 0.0)
        assert s.latency_ms is not None and s.latency_p99_ms is not None
        assert 0 < s.latency_ms <= s.latency_p99_ms
    assert main(["status", "--shards", *shard_urls, "--watch", "0.05", "--times", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("every 0.05 s; Ctrl-C stops") == 2
    header = next(line for line in out.splitlines() if line.startswith("shard "))
    assert "p50" in header and "p99" in header and "errors" in header
    assert out.count(" ok ") == 2 * len(shard_urls)
    assert main(["status", "--shards", *shard_urls, "--probes", "0"]) == 1
