"""What every placement policy shares: where a record lives, what a filter leaves to ask, the
strategy interface, and reading a record's routing value."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ConfigDict

from ._errors import RoutingError
from ._prune import Intervals

__all__ = ["Placement", "Policy", "Scope", "routing_value"]

FROZEN = ConfigDict(frozen=True, extra="forbid")
SHOW = 20
"""Values listed at most in an "unknown value" error."""


@dataclass(frozen=True)
class Placement:
    """Where one record lives: a shard, and a time bucket (its own physical collection)."""

    shard: str
    bucket: str | None = None


@dataclass(frozen=True)
class Scope:
    """What a filter leaves to ask: shards (None: all) and time intervals (None: all times)."""

    shards: frozenset[str] | None = None
    times: Intervals | None = None


class Policy(Protocol):
    """The strategy interface every placement policy implements."""

    kind: str

    def shards_named(self) -> frozenset[str]:
        """Every shard the policy can place a record on."""
        ...

    def place(self, record_id: str, metadata: Mapping[str, Any] | None) -> Placement:
        """The placement of one record; raises RoutingError when it cannot be placed."""
        ...

    def scope(self, where: Mapping[str, Any] | None) -> Scope:
        """A superset of the places records matching ``where`` can be."""
        ...


def routing_value(record_id: str, metadata: Mapping[str, Any] | None, field: str) -> Any:
    value = None if metadata is None else metadata.get(field)
    if value is None:
        raise RoutingError(
            f"record {record_id!r} has no value for the routing field {field!r}; "
            "every record of this collection needs one, nothing was written",
            record_id=record_id,
        )
    return value
