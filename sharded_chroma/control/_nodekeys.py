"""What the shared node state looks like in the control store, and how one host's view is
made of its own hint log's state and every other host's keys (pure; see ``_nodes``).

Keys, under the backend's namespace (``<nk>`` is a digest of the node's URL without
credentials, so every host names a node alike and no secret is stored):

    nodestate/node/<nk>/repair                    {"reason", "by"}
    nodestate/node/<nk>/stale/<log id>/<process>  {"oldest": lowest version pending}
    nodestate/logs/<log id>/<process>             (under the process's lease)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .._nodeconfig import redact_url
from .._nodestate import NodeState
from ._backend import Entry

__all__ = ["PREFIX", "Snapshot", "bound", "merge", "node_key", "parse"]

PREFIX = "nodestate/"
_ORPHANED = "another host's hint log holds writes it missed, and no client of that log is running"


def node_key(url: str) -> str:
    """The control-store name of a node: the same on every host, free of credentials."""
    return hashlib.sha256(redact_url(url).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Snapshot:
    """Every host's published state, as of (at least) ``revision``."""

    revision: int = 0
    repair: dict[str, tuple[str, int]] = field(default_factory=dict)
    """node key -> (reason, revision)"""
    stale: dict[str, dict[str, dict[str, tuple[int, int]]]] = field(default_factory=dict)
    """node key -> log id -> process -> (revision, lowest version pending)"""
    alive: frozenset[str] = frozenset()
    """log ids with a live process"""

    def same(self, other: Snapshot) -> bool:
        """Whether both say the same (whatever their revisions)."""
        return (self.repair, self.stale, self.alive) == (other.repair, other.stale, other.alive)


def parse(revision: int, entries: Iterable[Entry]) -> Snapshot:
    snap = Snapshot(revision)
    alive: set[str] = set()
    for entry in entries:
        parts = entry.key[len(PREFIX) :].split("/")
        if parts[0] == "logs" and len(parts) == 3:
            alive.add(parts[1])
        elif parts[0] == "node" and len(parts) == 3 and parts[2] == "repair":
            try:
                reason = str(json.loads(entry.value)["reason"])
            except (ValueError, KeyError, TypeError):
                reason = "marked by another host"
            snap.repair[parts[1]] = (reason, entry.revision)
        elif parts[0] == "node" and len(parts) == 5 and parts[2] == "stale":
            try:
                oldest = int(json.loads(entry.value)["oldest"])
            except (ValueError, KeyError, TypeError):
                oldest = 0  # unreadable: the most careful reading (everything waits for it)
            logs = snap.stale.setdefault(parts[1], {})
            logs.setdefault(parts[3], {})[parts[4]] = (entry.revision, oldest)
    return Snapshot(revision, snap.repair, snap.stale, frozenset(alive))


def merge(
    local: Mapping[str, NodeState], snap: Snapshot, urls: Mapping[str, str], log_id: str
) -> dict[str, NodeState]:
    """Every node's state as this host sees it: its own hint log's (``local``) plus what
    other hosts' logs published (``snap``); ``urls`` maps node keys to this topology's URLs."""
    out: dict[str, NodeState] = {}
    for nk, url in urls.items():
        mine = local.get(url, NodeState())
        mark = snap.repair.get(nk)
        others = {k: v for k, v in snap.stale.get(nk, {}).items() if k != log_id}
        orphans = tuple(
            sorted(
                (f"{log}/{proc}", rev)
                for log, procs in others.items()
                if log not in snap.alive
                for proc, (rev, _) in procs.items()
            )
        )
        reason = mine.reason
        if reason is None and mark is not None:
            reason = mark[0]
        if reason is None and orphans:
            reason = _ORPHANED
        state = NodeState(
            mine.pending,
            mine.needs_repair or mark is not None or bool(orphans),
            reason,
            mine.quarantined,
            mine.mark_gen,
            mine.last_quarantined,
            elsewhere=len(others),
            shared_mark=0 if mark is None else mark[1],
            orphans=orphans,
        )
        if state != NodeState():
            out[url] = state
    # Nodes this topology does not name (a removed shard's): this host's word only.
    named = set(urls.values())
    out.update({u: s for u, s in local.items() if u not in out and u not in named})
    return out


def bound(snap: Snapshot, nk: str, log_id: str) -> int | None:
    """The newest version log ``log_id`` may replay to node ``nk``: the lowest version
    another host's log holds for it (its hints are older, so they land first; replayed in
    version order across hosts, a delete never lands before an older write it removes).
    A log whose every client is gone holds it up too, until one is back and replays, or a
    repair clears its keys: replayed later, its older writes would undo newer deletes."""
    lowest = [
        oldest
        for log, procs in snap.stale.get(nk, {}).items()
        if log != log_id
        for _, oldest in procs.values()
    ]
    return min(lowest) if lowest else None
