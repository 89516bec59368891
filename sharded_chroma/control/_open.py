"""Opening the control store a topology names."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ._backend import ControlBackend
from ._etcd import EtcdControl
from ._sqlite import SqliteControl

__all__ = ["default_sqlite_path", "open_backend"]


def default_sqlite_path(topology: Any) -> Path:
    """One file per cluster under the state folder, keyed by the catalog node (the first
    shard's primary) and the tenant and database: adding or removing other shards, which is
    what the store is for, keeps the file."""
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    catalog = topology.shards[0].primary.url
    key = hashlib.sha256("\n".join([topology.tenant, topology.database, catalog]).encode())
    return base / "sharded-chroma" / "control" / f"{key.hexdigest()[:16]}.sqlite3"


def open_backend(topology: Any) -> ControlBackend:
    """The backend of ``topology.control`` (which must be set)."""
    config = topology.control
    if config.backend == "etcd":
        return EtcdControl(
            config.endpoints,
            namespace=config.namespace,
            timeout=config.timeout,
            username=config.username,
            password=config.password(),
        )
    return SqliteControl(Path(config.path) if config.path else default_sqlite_path(topology))
