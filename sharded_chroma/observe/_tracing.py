"""What the layers below the facade know about the call they serve, for tracing: the seams
and their null objects.

A call (``ShardedServer``) opens a ``CallTrace``; the layers under it (reader, replica set,
transport) find it in a context variable instead of a parameter threaded through every
signature, because the call fans out into tasks that copy their context anyway. With tracing
off, the tracer is ``NO_TRACING`` and nothing is ever set: each seam costs one variable read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "NO_TRACING",
    "CallTrace",
    "NoTracing",
    "RequestTrace",
    "Tracing",
    "current_call",
    "noting",
]


@dataclass(frozen=True)
class RequestNote:
    """What the replica set knows of the request about to be sent: which attempt it is and
    whether it is a hedge (a second copy of a slow read)."""

    attempt: int = 1
    hedged: bool = False


class RequestTrace(Protocol):
    """One HTTP request to one node, under a call."""

    headers: Mapping[str, str]
    """Headers that continue the trace at the server (W3C ``traceparent``)."""

    def answered(self, status: int) -> None: ...

    def failed(self, error: BaseException) -> None: ...

    def end(self) -> None: ...


class CallTrace(Protocol):
    """One client call (``query docs``), for what only lower layers learn."""

    def named(self, collection: str) -> None: ...

    def epoch(self, epoch: int) -> None: ...

    def coverage(self, asked: int, answered: int, skipped: int, failed: int) -> None: ...

    def hinted(self, copies: int) -> None: ...

    def request(
        self, method: str, path: str, *, shard: str, url: str, primary: bool
    ) -> RequestTrace: ...


class Tracing(Protocol):
    """Opens call traces; the composition root builds one per client."""

    def call(
        self, operation: str, *, tenant: str, database: str, batch: int | None = None
    ) -> contextlib.AbstractContextManager[CallTrace]: ...


class _NoCall:
    def named(self, collection: str) -> None:
        pass

    def epoch(self, epoch: int) -> None:
        pass

    def coverage(self, asked: int, answered: int, skipped: int, failed: int) -> None:
        pass

    def hinted(self, copies: int) -> None:
        pass

    def request(
        self, method: str, path: str, *, shard: str, url: str, primary: bool
    ) -> RequestTrace:
        raise AssertionError("no request is traced outside a traced call")


NO_CALL: CallTrace = _NoCall()
_CALL: ContextVar[CallTrace | None] = ContextVar("sharded_chroma_call_trace", default=None)
_FIRST = RequestNote()
_NOTE: ContextVar[RequestNote] = ContextVar("sharded_chroma_request_note", default=_FIRST)


_OFF: contextlib.nullcontext[CallTrace] = contextlib.nullcontext(NO_CALL)
_UNLABELLED: contextlib.nullcontext[None] = contextlib.nullcontext()


class NoTracing:
    """Tracing off: calls open nothing and set nothing (one shared, reusable null context)."""

    def call(
        self, operation: str, *, tenant: str, database: str, batch: int | None = None
    ) -> contextlib.AbstractContextManager[CallTrace]:
        return _OFF


NO_TRACING: Tracing = NoTracing()


def current_call() -> CallTrace | None:
    """The traced call the running code serves, or None (tracing off, or outside a call)."""
    return _CALL.get()


def current_note() -> RequestNote:
    return _NOTE.get()


@contextlib.contextmanager
def serving_call(call: CallTrace) -> Iterator[None]:
    """Make ``call`` the current call inside (for tracers' own use)."""
    token = _CALL.set(call)
    try:
        yield
    finally:
        _CALL.reset(token)


def noting(attempt: int, hedged: bool = False) -> contextlib.AbstractContextManager[None]:
    """Label the requests sent inside with their attempt number and hedge flag; a shared null
    context when no traced call is running."""
    if _CALL.get() is None:
        return _UNLABELLED
    return _labelled(RequestNote(attempt, hedged))


@contextlib.contextmanager
def _labelled(note: RequestNote) -> Iterator[None]:
    token = _NOTE.set(note)
    try:
        yield
    finally:
        _NOTE.reset(token)


def describe(error: BaseException) -> str:
    """``error.type`` for an exception: its class's qualified name, as the conventions ask."""
    cls = type(error)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    if module.startswith("sharded_chroma."):
        module = "sharded_chroma"  # the public name, not the private module
    return f"{module}.{cls.__qualname__}"


def as_attributes(values: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes without the unset ones (OpenTelemetry refuses None)."""
    return {k: v for k, v in values.items() if v is not None}
