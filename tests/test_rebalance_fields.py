"""Growing and shrinking collections placed by metadata (field and composite policies) while
two writer processes add, upsert (moving records between routing values), update, delete,
get and query the same ids; judged by the history checker afterwards. These moves go through
a new generation of physical collections (see ``rebalance._rebuild``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sharded_chroma import CompositePolicy, FieldPolicy
from sharded_chroma.rebalance import plan_field
from tests._rebalancing import topology_for
from tests.test_concurrent_writes import POLICIES, assert_busy, skip_unless_slow
from tests.test_rebalance import control_table, final_checks, run_migration_under_writers

FOUR = ["s0", "s1", "s2", "s3"]


def _goal(policy: Any, move: dict[str, tuple[str, ...]]) -> Any:
    plan = plan_field(policy, move=move, known_shards=FOUR)
    assert not plan.problems, plan.problems
    return plan.goal


def _moved(
    urls: list[str],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
    start: Any,
    move: dict[str, tuple[str, ...]],
) -> Any:
    topology = topology_for(urls, control_table(backend, tmp_path, request))
    report, goal, ops, errors, dupes = run_migration_under_writers(
        urls, topology, tmp_path, start, lambda p: _goal(p, move), seconds=120.0
    )
    assert report.steps[-1] == "done", report
    assert report.copied > 0
    assert not dupes, dupes[:5]
    assert_busy(ops, errors)
    final_checks(urls, topology, goal, ops, errors)
    return goal


# These are the long form (slow marker): under field and composite policies the two-process
# writers also meet Chroma's non-atomic delete(ids, where) and the other known windows of the
# design notes; in CI (2026-12-04) one of these tests failed in two of three runs.
LONG = pytest.mark.slow
pytestmark = LONG


@pytest.mark.parametrize(
    ("kind", "backend"), [("field", "sqlite"), ("field", "etcd"), ("composite", "sqlite")]
)
def test_grow_three_to_four_under_two_writer_processes(
    shard_urls: list[str],
    oracle_url: str,
    tmp_path: Path,
    kind: str,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    skip_unless_slow(request.config)
    move = {"ap": ("s2", "s3")} if kind == "field" else {"eu": ("s0", "s1", "s3")}
    goal = _moved([*shard_urls, oracle_url], tmp_path, request, backend, POLICIES[kind], move)
    assert "s3" in goal.shards_named()


@pytest.mark.parametrize("kind", ["field", "composite"])
def test_shrink_four_to_three_under_two_writer_processes(
    shard_urls: list[str],
    oracle_url: str,
    tmp_path: Path,
    kind: str,
    request: pytest.FixtureRequest,
) -> None:
    skip_unless_slow(request.config)
    if kind == "field":
        start: Any = FieldPolicy(
            field="region", partitions={"eu": ("s0",), "us": ("s1", "s3"), "ap": ("s2",)}
        )
        move = {"us": ("s1",)}
    else:
        start = CompositePolicy(
            field="region",
            partitions={"eu": ("s0", "s3"), "us": ("s1", "s2"), "ap": ("s2", "s3", "s0")},
            hash_key="user",
        )
        move = {"eu": ("s0",), "ap": ("s2", "s0")}
    goal = _moved([*shard_urls, oracle_url], tmp_path, request, "sqlite", start, move)
    assert "s3" not in goal.shards_named()
