"""Per-call options, set for a block of code: ``with sharded_chroma.options(write_concern=...)``.

A context variable rather than extra keyword arguments keeps chromadb's method signatures
unchanged, and it follows the calls into the tasks a fan-out starts.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["CallOptions", "current_options", "options"]

_CONCERNS = ("all", "quorum", "one")


@dataclass(frozen=True)
class CallOptions:
    write_concern: str | None = None


_DEFAULT = CallOptions()
_current: contextvars.ContextVar[CallOptions] = contextvars.ContextVar(
    "sharded_chroma_options",
    default=_DEFAULT,
)


def current_options() -> CallOptions:
    return _current.get()


@contextmanager
def options(*, write_concern: str | None = None) -> Iterator[CallOptions]:
    """Override the client's options for the calls made inside the block.

    ``write_concern``: ``"all"``, ``"quorum"`` or ``"one"`` copies of a shard must store a
    write before it is acknowledged (the topology's ``replication.write_concern`` otherwise).
    """
    if write_concern is not None and write_concern not in _CONCERNS:
        raise ValueError(f"write_concern must be one of {_CONCERNS}, got {write_concern!r}")
    token = _current.set(CallOptions(write_concern=write_concern))
    try:
        yield _current.get()
    finally:
        _current.reset(token)
