"""`sharded-chroma plan`, `rebalance` and `abort`, run in-process against real Chroma servers
and a SQLite control store: a hash-placed collection on s0..s2 grows onto s3."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

import sharded_chroma
from sharded_chroma.cli import main

NAME = "cli-rebalance"
THREE = ("s0", "s1", "s2")
RECORDS = 400
COLLECTIONS = "/api/v2/tenants/default_tenant/databases/default_database/collections"


def _toml(urls: list[str], control: Path) -> str:
    lines = [
        "repair_after = 1.5",
        "",
        "[control]",
        'backend = "sqlite"',
        f'path = "{control}"',
        "lease_ttl = 4.0",
        "ack_timeout = 60.0",
        "",
    ]
    for i, url in enumerate(urls):
        lines += ["[[shards]]", f'name = "s{i}"', f'primary = "{url}"', ""]
    return "\n".join(lines)


@pytest.fixture
def urls(shard_urls: list[str], oracle_url: str) -> list[str]:
    """Four wiped servers: s0..s2 are the shards, s3 the oracle's server."""
    return [*shard_urls, oracle_url]


@pytest.fixture
def topology(urls: list[str], tmp_path: Path) -> Path:
    """A topology file with a SQLite control store, and the collection on s0..s2 in it."""
    path = tmp_path / "cluster.toml"
    path.write_text(_toml(urls, tmp_path / "control.sqlite3"), encoding="utf-8")

    async def create() -> None:
        async with await _client(path) as client:
            col = await client.create_collection(
                NAME,
                embedding_function=None,
                policy=sharded_chroma.HashPolicy(shards=THREE),
            )
            for start in range(0, RECORDS, 100):
                ids = [f"r{i:04d}" for i in range(start, start + 100)]
                vectors = [[i / RECORDS, (i % 7) / 7, 1.0] for i in range(start, start + 100)]
                await col.add(ids=ids, embeddings=vectors)

    asyncio.run(create())
    return path


async def _client(path: Path) -> Any:
    return await sharded_chroma.AsyncHttpClient(topology=sharded_chroma.Topology.from_toml(path))


def _state(path: Path) -> tuple[Any, int, list[str]]:
    """The partition map, the count and every id, through a fresh client."""

    async def read() -> tuple[Any, int, list[str]]:
        async with await _client(path) as client:
            col = await client.get_collection(NAME, embedding_function=None)
            current = await client.partition_map(NAME)
            return current, await col.count(), sorted((await col.get(include=[]))["ids"])

    return asyncio.run(read())


def _ids_on(url: str) -> list[str]:
    """The ids the collection's physical part on one server holds (plain HTTP, every copy)."""
    with httpx.Client(base_url=url, trust_env=False, timeout=30) as http:
        found = http.get(f"{COLLECTIONS}/{NAME}")
        if found.status_code in (400, 404):
            return []  # the collection was never made on this server
        found.raise_for_status()
        got = http.post(f"{COLLECTIONS}/{found.json()['id']}/get", json={"include": []})
        got.raise_for_status()
        return list(got.json()["ids"])


def _layout(urls: list[str]) -> dict[str, list[str]]:
    return {f"s{i}": sorted(_ids_on(url)) for i, url in enumerate(urls)}


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_unmoved(path: Path, urls: list[str], before: dict[str, list[str]]) -> None:
    current, count, ids = _state(path)
    assert (current.epoch, current.phase) == (0, "stable")
    assert current.policy.shards == THREE and not current.policy.table
    assert count == RECORDS and len(ids) == RECORDS
    assert _layout(urls) == before


def test_plan_shows_the_moves_and_moves_nothing(
    topology: Path, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = _layout(urls)
    assert before["s3"] == [] and sum(map(len, before.values())) == RECORDS
    code, out, err = _cli(capsys, "plan", "--topology", str(topology), "--collection", NAME)
    assert code == 0, err
    assert f"collection {NAME}: epoch 0, phase stable" in out
    assert "no moves" in out

    code, out, err = _cli(
        capsys, "plan", "--topology", str(topology), "--collection", NAME, "--add", "s3"
    )
    assert code == 0, err
    assert f"collection {NAME}: epoch 0, phase stable" in out
    assert re.search(r"hash policy: [1-9]\d* move\(s\), 1024 of 4096 slots \(25\.0%\)", out), out
    moves = re.findall(r"^  (s[0-2]) -> s3: ", out, re.MULTILINE)
    assert sorted(set(moves)) == list(THREE), out
    assert "balance after the plan (records per shard):" in out
    balance = dict(re.findall(r"^  (s[0-3])\s+([\d,]+)\s+[\d.]+%$", out, re.MULTILINE))
    assert set(balance) == {"s0", "s1", "s2", "s3"}, out
    assert sum(int(n.replace(",", "")) for n in balance.values()) == RECORDS
    assert "problems:" not in out
    _assert_unmoved(topology, urls, before)


@pytest.mark.parametrize("weight", ["s0=abc", "s0", "=2"])
def test_plan_refuses_a_malformed_weight(
    topology: Path, urls: list[str], capsys: pytest.CaptureFixture[str], weight: str
) -> None:
    before = _layout(urls)
    args = ("--topology", str(topology), "--collection", NAME, "--add", "s3")
    code, _, err = _cli(capsys, "plan", *args, "--weight", weight)
    assert code != 0
    assert f"--weight takes SHARD=NUMBER, got {weight!r}" in err
    code, _, err = _cli(capsys, "rebalance", *args, "--weight", weight)
    assert code != 0
    assert f"--weight takes SHARD=NUMBER, got {weight!r}" in err
    _assert_unmoved(topology, urls, before)


def test_plan_reports_a_weight_for_an_unknown_shard(
    topology: Path, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = _layout(urls)
    args = ("--topology", str(topology), "--collection", NAME)
    code, out, _ = _cli(capsys, "plan", *args, "--weight", "s9=2")
    assert code == 1
    assert "problems:" in out and "weights name unknown shard 's9'" in out
    _assert_unmoved(topology, urls, before)


@pytest.mark.parametrize(
    ("command", "option"),
    [("plan", "--add"), ("plan", "--remove"), ("rebalance", "--add"), ("rebalance", "--remove")],
)
def test_an_unknown_shard_is_refused(
    topology: Path, urls: list[str], capsys: pytest.CaptureFixture[str], command: str, option: str
) -> None:
    before = _layout(urls)
    args = ("--topology", str(topology), "--collection", NAME)
    code, out, err = _cli(capsys, command, *args, option, "s9")
    assert code != 0, out
    assert re.search(r"unknown shard.*'s9'", out + err), out + err
    _assert_unmoved(topology, urls, before)


def test_rebalance_grows_onto_the_fourth_shard(
    topology: Path, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, ids_before = _state(topology)
    args = ("--topology", str(topology), "--collection", NAME)
    code, out, err = _cli(capsys, "rebalance", *args, "--add", "s3", "--batch", "50")
    assert code == 0, err
    assert re.search(r"hash policy: [1-9]\d* move\(s\), 1024 of 4096 slots", out), out
    steps = re.findall(r"^step (\S+)$", out, re.MULTILINE)
    assert steps, out
    summary = re.search(
        rf"^migration (\S+) of {NAME}: (.+); ([\d,]+) record\(s\) copied, (\d+) verify "
        r"pass\(es\) fixing ([\d,]+); epoch (\d+); [\d.]+ s$",
        out,
        re.MULTILINE,
    )
    assert summary, out
    assert summary.group(2).split(" -> ")[-1] == "done"
    assert int(summary.group(3).replace(",", "")) > 0

    current, count, ids = _state(topology)
    assert current.phase == "stable" and not current.migrating
    assert current.epoch > 0 and current.epoch == int(summary.group(6))
    assert current.policy.shards == (*THREE, "s3")
    assert count == RECORDS and ids == ids_before
    layout = _layout(urls)
    assert sorted(rid for held in layout.values() for rid in held) == ids  # one copy each
    assert all(
        current.policy.place(rid, None).shard == s for s, held in layout.items() for rid in held
    )
    assert 60 <= len(layout["s3"]) <= 140, {s: len(held) for s, held in layout.items()}

    # The map stays put: nothing is under way, and a plan without goal options moves nothing.
    code, out, err = _cli(capsys, "plan", *args)
    assert code == 0, err
    assert f"epoch {current.epoch}, phase stable" in out and "no moves" in out
    assert _state(topology)[0].epoch == current.epoch


def test_rebalance_without_a_goal_has_nothing_to_resume(
    topology: Path, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = _layout(urls)
    code, out, err = _cli(capsys, "rebalance", "--topology", str(topology), "--collection", NAME)
    assert code != 0, out
    assert f"collection {NAME!r} has no migration to resume" in err
    _assert_unmoved(topology, urls, before)


def test_abort_without_a_migration_is_refused(
    topology: Path, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = _layout(urls)
    code, out, err = _cli(capsys, "abort", "--topology", str(topology), "--collection", NAME)
    assert code != 0, out
    assert f"collection {NAME!r} has no migration to abort" in err
    _assert_unmoved(topology, urls, before)


# -- a time-placed collection: buckets and the hot shard --------------------------------------

TIMED = "cli-time"
DAYS = ("2025-11-26", "2025-11-27", "2025-11-28", "2025-11-29")
T0 = 1764115200  # 2025-11-26T00:00:00Z


@pytest.fixture
def timed(urls: list[str], tmp_path: Path) -> Path:
    """Days 0 and 1 mapped to s0 and s1, days 2 and 3 in buckets of the hot shard s2; 40
    records a day."""
    path = tmp_path / "cluster.toml"
    path.write_text(_toml(urls, tmp_path / "control.sqlite3"), encoding="utf-8")
    policy = sharded_chroma.TimePolicy(
        field="ts", granularity="day", hot="s2", buckets={DAYS[0]: "s0", DAYS[1]: "s1"}
    )

    async def create() -> None:
        async with await _client(path) as client:
            col = await client.create_collection(TIMED, embedding_function=None, policy=policy)
            ids = [f"t{i:03d}" for i in range(160)]
            await col.add(
                ids=ids,
                embeddings=[[i / 160, 1.0, 0.5] for i in range(160)],
                metadatas=[{"ts": T0 + (i // 40) * 86400 + i} for i in range(160)],
            )

    asyncio.run(create())
    return path


def _days_where(path: Path) -> tuple[Any, dict[str, tuple[str, int]]]:
    async def read() -> tuple[Any, dict[str, tuple[str, int]]]:
        async with await _client(path) as client:
            layout = await client.layout(TIMED)
            current = await client.partition_map(TIMED)
            return current, {p.partition: (p.shards[0], p.records) for p in layout.partitions}

    return asyncio.run(read())


def test_time_buckets_and_the_hot_shard_are_planned_and_moved(
    timed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, before = _days_where(timed)
    assert before == {
        DAYS[0]: ("s0", 40),
        DAYS[1]: ("s1", 40),
        DAYS[2]: ("s2", 40),
        DAYS[3]: ("s2", 40),
    }
    args = ("--topology", str(timed), "--collection", TIMED)
    goal = ("--move", f"{DAYS[0]}=s3", "--move", f"{DAYS[2]}=s3", "--hot", "s3")
    code, out, err = _cli(capsys, "plan", *args, *goal)
    assert code == 0, err
    assert "time policy: 2 move(s), 80 records" in out, out
    assert "  new buckets go to s3 (was s2)" in out, out
    assert re.search(rf"^  s0 -> s3: bucket\(s\) {DAYS[0]}, 40 records$", out, re.MULTILINE), out
    assert re.search(rf"^  s2 -> s3: bucket\(s\) {DAYS[2]}, 40 records$", out, re.MULTILINE), out
    assert _days_where(timed)[1] == before, "plan moved something"

    code, out, err = _cli(capsys, "rebalance", *args, *goal, "--batch", "25")
    assert code == 0, err
    assert re.search(rf"^migration \S+ of {TIMED}: .* -> done;", out, re.MULTILINE), out
    current, after = _days_where(timed)
    assert current.phase == "stable" and current.policy.hot == "s3"
    # Day 3 stays where it was: pinned to the old hot shard, not moved with it.
    assert after == {
        DAYS[0]: ("s3", 40),
        DAYS[1]: ("s1", 40),
        DAYS[2]: ("s3", 40),
        DAYS[3]: ("s2", 40),
    }
    assert current.policy.shard_of("2025-12-01") == "s3"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--add", "s3"), "--add do not apply to it"),
        (("--move", "2025-11-26"), "--move takes BUCKET=SHARD"),
        (("--move", "2025-11-26=s3", "--move", "2025-11-26=s1"), "names bucket '2025-11-26' twice"),
    ],
)
def test_time_goal_options_are_checked_before_anything_moves(
    timed: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], message: str
) -> None:
    _, before = _days_where(timed)
    for command in ("plan", "rebalance"):
        code, out, err = _cli(
            capsys, command, "--topology", str(timed), "--collection", TIMED, *extra
        )
        assert code != 0, out
        assert message in err, err
    assert _days_where(timed)[1] == before


def test_a_bucket_that_does_not_exist_is_a_problem_of_the_plan(
    timed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("--topology", str(timed), "--collection", TIMED, "--move", "2024-01-01=s3")
    code, out, _ = _cli(capsys, "plan", *args)
    assert code == 1
    assert "unknown bucket '2024-01-01'" in out


def test_hash_collections_refuse_time_options(
    topology: Path, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = _layout(urls)
    args = ("--topology", str(topology), "--collection", NAME, "--hot", "s3")
    code, _, err = _cli(capsys, "plan", *args)
    assert code != 0 and "--hot do not apply to it" in err, err
    _assert_unmoved(topology, urls, before)


def test_rebuild_command_swaps_in_a_new_index_and_refuses_bad_parameters(
    topology: Path, urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = _layout(urls)
    with pytest.raises(SystemExit):
        main(["rebuild", "--topology", str(topology), "--collection", NAME, "--max-neighbors"])
    capsys.readouterr()
    code, out, err = _cli(
        capsys, "rebuild", "--topology", str(topology), "--collection", NAME, "--max-neighbors", "0"
    )
    assert code != 0 and "positive int" in err, (out, err)
    _assert_unmoved(topology, urls, before)

    code, out, err = _cli(
        capsys,
        "rebuild",
        "--topology",
        str(topology),
        "--collection",
        NAME,
        "--max-neighbors",
        "24",
        "--batch",
        "50",
    )
    assert code == 0, err
    assert re.search(rf"rebuild \w+ of {NAME}: dual -> .* -> done; {RECORDS} record", out), out
    assert "now generation 1" in out
    current, count, ids = _state(topology)
    assert (current.phase, current.generation, count, len(ids)) == ("stable", 1, RECORDS, RECORDS)
    assert all(not ids_here for ids_here in _layout(urls).values()), "roots not emptied"

    code, out, err = _cli(
        capsys, "rebuild", "--topology", str(topology), "--collection", NAME, "--resume"
    )
    assert code != 0 and "no rebuild to resume" in err, (out, err)


def test_a_field_placed_collection_is_planned_and_moved_by_partition(
    urls: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--move PARTITION=S1,S2` gives a partition new shards: planned, then moved online
    into a new generation, every record ending where the goal puts it."""
    path = tmp_path / "fields.toml"
    path.write_text(_toml(urls, tmp_path / "fields.sqlite3"), encoding="utf-8")
    policy = sharded_chroma.FieldPolicy(
        field="region", partitions={"eu": ("s0",), "us": ("s1",), "ap": ("s2",)}
    )
    regions = ("eu", "us", "ap")

    async def create() -> None:
        async with await _client(path) as client:
            col = await client.create_collection(NAME, embedding_function=None, policy=policy)
            await col.add(
                ids=[f"f{i:03d}" for i in range(120)],
                embeddings=[[i / 120, 0.5, 1.0] for i in range(120)],
                metadatas=[{"region": regions[i % 3]} for i in range(120)],
            )

    asyncio.run(create())
    args = ["--topology", str(path), "--collection", NAME, "--move", "ap=s2,s3"]
    code, out, err = _cli(capsys, "plan", *args)
    assert code == 0, err
    assert "s2 -> s2,s3: partition(s) ap, 40 records" in out, out
    assert "copies every record" in out, out
    code, out, err = _cli(capsys, "plan", *args[:4], "--add", "s3")
    assert code != 0 and "do not apply" in err, (out, err)

    code, out, err = _cli(capsys, "rebalance", *args, "--batch", "50")
    assert code == 0, err
    assert re.search(rf"migration \w+ of {NAME}: .* -> done; 120 record", out), out
    current, count, ids = _state(path)
    assert current.policy.partitions["ap"] == ("s2", "s3") and current.generation == 1
    assert (count, len(ids)) == (120, 120)
    layout = asyncio.run(_layout_of(path))
    assert {p.partition: sorted(p.shards) for p in layout.partitions}["ap"] == ["s2", "s3"]


async def _layout_of(path: Path) -> Any:
    async with await _client(path) as client:
        return await client.layout(NAME)
