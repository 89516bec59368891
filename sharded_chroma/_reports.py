"""What ``verify`` and ``repair`` report: per (collection, shard, replica) pair and in all."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["PairRepair", "PairReport", "RepairReport", "VerifyReport"]


@dataclass(frozen=True)
class PairReport:
    """One replica of one shard compared with its primary, for one collection."""

    collection: str
    shard: str
    primary: str
    replica: str
    primary_records: int = 0
    replica_records: int = 0
    missing: tuple[str, ...] = ()
    """On the primary, not on the replica."""
    extra: tuple[str, ...] = ()
    """On the replica, not on the primary."""
    differing: tuple[str, ...] = ()
    """On both, with a different embedding, document, uri or metadata."""
    stale: bool = False
    """The replica has missed writes waiting in this host's hint log."""
    pending_hints: int = 0
    error: str | None = None
    """Why the pair could not be compared (a node down, the collection missing on a node)."""

    @property
    def differences(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.differing)

    @property
    def clean(self) -> bool:
        return self.differences == 0 and self.error is None


@dataclass(frozen=True)
class VerifyReport:
    collections: tuple[str, ...]
    pairs: tuple[PairReport, ...]
    """One entry per (collection, shard, replica node); empty when no shard has replicas."""
    records_read: int = 0
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return all(p.clean for p in self.pairs)

    @property
    def differences(self) -> int:
        return sum(p.differences for p in self.pairs)


@dataclass(frozen=True)
class PairRepair:
    """What repair did to one replica for one collection, and what still differs."""

    collection: str
    shard: str
    primary: str
    replica: str
    copied: tuple[str, ...] = ()
    """Ids written to the replica from the primary (they were missing or differed)."""
    deleted: tuple[str, ...] = ()
    """Ids removed from the replica (the primary does not have them)."""
    rounds: int = 0
    remaining: tuple[str, ...] = ()
    """Ids still different after the last round (concurrent writes kept changing them)."""
    error: str | None = None

    @property
    def clean(self) -> bool:
        return not self.remaining and self.error is None


@dataclass(frozen=True)
class RepairReport:
    before: VerifyReport
    """The scan that found what to repair."""
    pairs: tuple[PairRepair, ...]
    """Pairs that had differences or could not be compared."""
    hints_replayed: Mapping[str, int] = field(default_factory=dict)
    """Missed writes replayed from this host's hint log before comparing, per node URL."""
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        """Nothing known to differ after repair: every pair was compared and settled."""
        return all(p.clean for p in self.pairs)


# -- digests ----------------------------------------------------------------------------------
