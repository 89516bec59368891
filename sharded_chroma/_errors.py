"""The exception tree for failures that only a sharded cluster can have.

Errors a single Chroma server would raise (a missing collection, a bad argument) surface as the
same ``chromadb.errors`` class the official client raises; everything here is additive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "AuthenticationError",
    "BackupFileError",
    "ClientClosedError",
    "ConfigurationError",
    "ControlStoreError",
    "ControlUnavailableError",
    "HintLogFullError",
    "NodeAccessError",
    "NodeUnavailableError",
    "PartialWriteError",
    "RoutingError",
    "ShardFailureError",
    "ShardMismatchError",
    "ShardedChromaError",
    "TLSError",
]


class ShardedChromaError(Exception):
    """Root of every error that is about sharding rather than about the request itself."""


class ConfigurationError(ShardedChromaError, ValueError):
    """The topology or a client option is invalid. Raised before any request is sent."""


class BackupFileError(ShardedChromaError, ValueError):
    """An export file (or a chain of them) cannot be imported: cut short, corrupted, of an
    unknown format version, out of order, or not matching the target collection. ``path`` and
    ``line`` (1-based; None when about the whole file) say where. Raised before anything is
    written."""

    def __init__(self, message: str, *, path: str, line: int | None = None) -> None:
        where = path if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


class ClientClosedError(ShardedChromaError, RuntimeError):
    """The client (or a collection obtained from it) was used after ``aclose()``."""


class NodeUnavailableError(ShardedChromaError):
    """One node could not be reached or answered with a non-Chroma failure.

    ``attempts`` holds a short description of every attempt, oldest first; the last attempt's
    exception is chained as ``__cause__``.
    """

    def __init__(self, *, shard: str, node: str, attempts: Sequence[str]) -> None:
        self.shard = shard
        self.node = node
        self.attempts = tuple(attempts)
        tries = "; ".join(self.attempts) or "no attempt"
        super().__init__(
            f"shard {shard!r} node {node} unavailable after "
            f"{len(self.attempts)} attempt(s): {tries}"
        )


class NodeAccessError(ShardedChromaError):
    """A node (or the proxy in front of it) refused this client's credentials or TLS setup.

    This is a configuration fault: retrying, or asking another copy with the same
    configuration, does not mend it, so it is raised at once and never reported as
    ``NodeUnavailableError``. The text names the shard, the node and the cause, and never holds
    a secret (any answer body in it is cut and scrubbed). ``status`` is the HTTP status when
    the refusal was an answer, else None.
    """

    def __init__(self, message: str, *, shard: str, node: str, status: int | None = None) -> None:
        self.shard = shard
        self.node = node
        self.status = status
        super().__init__(f"shard {shard!r} node {node}: {message}")


class AuthenticationError(NodeAccessError):
    """The node or its proxy answered 401, 403 or 407: credentials missing, wrong or not
    allowed. A Chroma server's own auth answer stays the ``chromadb.errors`` class it names."""


class TLSError(NodeAccessError):
    """The TLS connection was refused: the server's certificate did not verify (unknown CA,
    expired, wrong host), the proxy wanted a client certificate or refused the one sent, or
    one side spoke plain HTTP to the other's TLS port."""


class ShardFailureError(ShardedChromaError):
    """One or more shards failed a call that needed all of them.

    ``failures`` maps each failed shard's name to the exception it raised. The first failure is
    chained as ``__cause__`` so tracebacks show it.
    """

    def __init__(self, operation: str, failures: Mapping[str, BaseException]) -> None:
        self.operation = operation
        self.failures = dict(failures)
        parts = ", ".join(
            f"{name}: {type(exc).__name__}: {exc}" for name, exc in sorted(self.failures.items())
        )
        super().__init__(f"{operation} failed on {len(self.failures)} shard(s): {parts}")


class PartialWriteError(ShardFailureError):
    """A write reached some shards but not others.

    ``unwritten_ids`` lists, per failed shard, the ids that shard may not hold. Writes are
    idempotent by id (``upsert``, ``delete``), so repeating the same call is safe.
    """

    def __init__(
        self,
        operation: str,
        failures: Mapping[str, BaseException],
        unwritten_ids: Mapping[str, Sequence[str]],
    ) -> None:
        super().__init__(operation, failures)
        self.unwritten_ids = {k: list(v) for k, v in unwritten_ids.items()}
        total = sum(len(v) for v in self.unwritten_ids.values())
        self.args = (f"{self.args[0]} ({total} id(s) possibly not written)",)


class ShardMismatchError(ShardedChromaError):
    """Shards disagree on a fact that must be the same cluster-wide (configuration, space,
    dimension), so their results cannot be merged."""

    def __init__(self, message: str, *, shard: str) -> None:
        self.shard = shard
        super().__init__(f"shard {shard!r}: {message}")


class HintLogFullError(ShardedChromaError):
    """The durable hint log for missed replica writes reached its size or count bound, so a
    missed write could not be recorded; the write is reported as failed for that node."""

    def __init__(self, message: str, *, node: str) -> None:
        self.node = node
        super().__init__(message)


class WriteConcernError(ShardFailureError):
    """A write reached fewer copies of a shard than its write concern requires.

    ``acknowledged`` lists the nodes that stored it; the nodes that missed it are in
    ``failures`` and have the write recorded in the hint log, to be replayed when they answer.
    """

    def __init__(
        self,
        operation: str,
        failures: Mapping[str, BaseException],
        *,
        shard: str,
        concern: str,
        acknowledged: Sequence[str],
    ) -> None:
        self.shard = shard
        self.concern = concern
        self.acknowledged = tuple(acknowledged)
        super().__init__(operation, failures)
        self.args = (
            f"{operation} on shard {shard!r} reached {len(self.acknowledged)} node(s), "
            f"write concern {concern!r} not met; missed: {self.args[0]}",
        )


class RoutingError(ShardedChromaError, ValueError):
    """A record cannot be placed by its collection's policy: the routing value is missing, of
    the wrong type, malformed, or unknown to the policy. Raised before anything is written.

    ``record_id`` names the first record that failed; ``value`` is its routing value (None when
    missing).
    """

    def __init__(self, message: str, *, record_id: str | None = None, value: object = None):
        self.record_id = record_id
        self.value = value
        super().__init__(message)


class ControlStoreError(ShardedChromaError):
    """The control store refused a change: a compare-and-swap lost a race, a lease is held by
    someone else, or a stored value is not one this client can read. Nothing was changed."""


class ControlUnavailableError(ControlStoreError):
    """The control store could not be reached (or did not answer in time).

    ``backend`` names it (``sqlite`` or ``etcd``) and ``endpoint`` where it was asked; the
    underlying error is chained as ``__cause__``."""

    def __init__(self, message: str, *, backend: str, endpoint: str) -> None:
        self.backend = backend
        self.endpoint = endpoint
        super().__init__(f"control store {backend} at {endpoint}: {message}")
