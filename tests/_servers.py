"""Local Chroma servers in tests: crashing one by its pid, and a module's own cluster."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from sharded_chroma.testing import LocalChromaServer, LocalCluster


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def crash(server: LocalChromaServer) -> None:
    """SIGKILL ``server`` by its pid, as a crash would, and check that it is gone."""
    pid = server.pid
    assert pid is not None, "server should be running"
    server.kill()
    assert not pid_alive(pid)
    assert not server.heartbeat(timeout=0.5)


@contextlib.contextmanager
def own_cluster(n: int, folder: Path) -> Iterator[LocalCluster]:
    """``n`` servers for one test module (its layout differs from the session cluster)."""
    cluster = LocalCluster(n, folder)
    cluster.start(timeout=180.0)
    try:
        yield cluster
    finally:
        cluster.stop()


def all_running(cluster: LocalCluster) -> list[LocalChromaServer]:
    """The cluster's servers, restarting any an earlier test left stopped or killed."""
    for server in cluster.servers:
        if not server.running:
            server.restart()
    return cluster.servers
