"""The narrow interface every control-store backend implements: a revisioned key-value store
with compare-and-swap, leases and change notification (the primitives etcd has).

Everything the cluster keeps in the control store (partition maps, migrations, client leases
and acknowledgements) is built on these few calls in ``ControlStore``, so both backends have
the same semantics by construction, and a congruence test runs one suite against each.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Protocol

__all__ = ["ANY", "AnyRevision", "ControlBackend", "Entry"]


class AnyRevision(enum.Enum):
    """``expect=ANY``: write whatever the key holds (no comparison)."""

    ANY = "any"


ANY: Final = AnyRevision.ANY


@dataclass(frozen=True)
class Entry:
    """One key's value and its modification revision (changes on every write of the key)."""

    key: str
    value: bytes
    revision: int
    lease: int | None = None


class ControlBackend(Protocol):
    """A revisioned key-value store. Keys are text; values bytes.

    ``expect`` in ``put`` and ``delete`` is the comparison: ``None`` means the key must not
    exist, an integer that the key's revision must equal, ``ANY`` none at all. A failed
    comparison changes nothing and returns ``None`` (``put``) or ``False`` (``delete``).
    Connection failures raise ``ControlUnavailableError``.
    """

    name: str
    """``sqlite`` or ``etcd``: what errors and status call this store."""
    endpoint: str
    """Where it lives (a file name or the endpoints), for messages; never a secret."""

    async def get(self, key: str) -> Entry | None: ...

    async def list(self, prefix: str) -> list[Entry]:
        """Every key starting with ``prefix``, in key order."""
        ...

    async def put(
        self,
        key: str,
        value: bytes,
        *,
        expect: int | AnyRevision | None = ANY,
        lease: int | None = None,
    ) -> int | None:
        """Write ``key``; the new revision, or None when ``expect`` did not hold. A key written
        with a lease is deleted when the lease expires or is revoked."""
        ...

    async def delete(self, key: str, *, expect: int | AnyRevision | None = ANY) -> bool:
        """Delete ``key``; False when ``expect`` did not hold or the key was absent."""
        ...

    async def grant(self, ttl: float) -> int:
        """A new lease that expires ``ttl`` seconds from now unless refreshed. etcd counts in
        whole seconds and enforces its own minimum; the granted lease is never shorter."""
        ...

    async def refresh(self, lease: int) -> bool:
        """Extend a lease by its ttl; False when it had already expired (its keys are gone)."""
        ...

    async def revoke(self, lease: int) -> None:
        """End a lease now, deleting its keys; a lease already gone is not an error."""
        ...

    async def revision(self) -> int:
        """The store's current revision (grows with every change)."""
        ...

    async def wait(self, prefix: str, after: int, within: float) -> int:
        """Return once something under ``prefix`` may have changed since revision ``after``
        (a key written, deleted, or expired with its lease), or after ``within`` seconds;
        the store's revision then. Wakes may be spurious: callers re-read."""
        ...

    async def aclose(self) -> None: ...
