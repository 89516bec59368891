"""OpenTelemetry behind the tracing seam: a CLIENT span per call and one per node request,
named and labelled by the stable database semantic conventions, and the
``db.client.operation.duration`` histogram.

Only the providers the application hands in are used; nothing here installs a global one.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .._version import VERSION
from ._tracing import CallTrace, RequestTrace, as_attributes, current_note, describe, serving_call

__all__ = ["OtelTracing"]

_SCOPE = "sharded_chroma"
# The conventions' advice for db.client.operation.duration, in seconds.
_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
_W3C = TraceContextTextMapPropagator()


@functools.lru_cache(maxsize=1024)
def _address(url: str) -> tuple[str | None, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


class _Request:
    def __init__(self, span: trace.Span) -> None:
        self._span = span
        carrier: dict[str, str] = {}
        _W3C.inject(carrier, context=trace.set_span_in_context(span))
        self.headers: Mapping[str, str] = carrier

    def answered(self, status: int) -> None:
        self._span.set_attribute("http.response.status_code", status)
        if status >= 400:
            self._span.set_attribute("error.type", str(status))
            self._span.set_status(Status(StatusCode.ERROR))

    def failed(self, error: BaseException) -> None:
        self._span.set_attribute("error.type", describe(error))
        self._span.set_status(Status(StatusCode.ERROR))

    def end(self) -> None:
        self._span.end()


class _Call:
    def __init__(self, tracer: trace.Tracer, span: trace.Span, operation: str) -> None:
        self._tracer = tracer
        self.span = span
        self._operation = operation
        self.collection: str | None = None
        self._hinted = 0

    def named(self, collection: str) -> None:
        self.collection = collection
        self.span.update_name(f"{self._operation} {collection}")
        self.span.set_attribute("db.collection.name", collection)

    def epoch(self, epoch: int) -> None:
        self.span.set_attribute("sharded_chroma.epoch", epoch)

    def coverage(self, asked: int, answered: int, skipped: int, failed: int) -> None:
        self.span.set_attributes(
            {
                "sharded_chroma.shards.asked": asked,
                "sharded_chroma.shards.answered": answered,
                "sharded_chroma.shards.skipped": skipped,
                "sharded_chroma.shards.failed": failed,
            }
        )

    def hinted(self, copies: int) -> None:
        # Summed over the shards a write reached: copies that missed it and have it kept.
        self._hinted += copies
        self.span.set_attribute("sharded_chroma.hinted_copies", self._hinted)

    def request(
        self, method: str, path: str, *, shard: str, url: str, primary: bool
    ) -> RequestTrace:
        host, port = _address(url)
        note = current_note()
        endpoint = path.rsplit("/", 1)[-1] or path
        span = self._tracer.start_span(
            f"{method} {endpoint}",
            kind=SpanKind.CLIENT,
            attributes=as_attributes(
                {
                    "db.system.name": "chroma",
                    "db.operation.name": self._operation,
                    "db.collection.name": self.collection,
                    "server.address": host,
                    "server.port": port,
                    "http.request.method": method,
                    "sharded_chroma.shard": shard,
                    "sharded_chroma.node.role": "primary" if primary else "replica",
                    "sharded_chroma.attempt": note.attempt,
                    "sharded_chroma.hedged": note.hedged,
                }
            ),
        )
        return _Request(span)


class OtelTracing:
    """Tracing (and the duration histogram) through the given providers."""

    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        self._tracer = (
            None if tracer_provider is None else tracer_provider.get_tracer(_SCOPE, VERSION)
        )
        self._duration = None
        if meter_provider is not None:
            meter = meter_provider.get_meter(_SCOPE, VERSION)
            self._duration = meter.create_histogram(
                "db.client.operation.duration",
                unit="s",
                description="Duration of database client operations.",
                explicit_bucket_boundaries_advisory=list(_BUCKETS),
            )

    @contextlib.contextmanager
    def call(
        self, operation: str, *, tenant: str, database: str, batch: int | None = None
    ) -> Iterator[CallTrace]:
        attributes = as_attributes(
            {
                "db.system.name": "chroma",
                "db.namespace": f"{tenant}|{database}",
                "db.operation.name": operation,
                # The conventions set it only for batches of two or more.
                "db.operation.batch.size": batch if batch is not None and batch > 1 else None,
            }
        )
        tracer = self._tracer or trace.NoOpTracer()
        span = tracer.start_span(operation, kind=SpanKind.CLIENT, attributes=attributes)
        call = _Call(tracer, span, operation)
        started = time.perf_counter()
        error: BaseException | None = None
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            with serving_call(call):
                yield call
        except BaseException as exc:
            error = exc
            span.set_attribute("error.type", describe(exc))
            span.set_status(Status(StatusCode.ERROR))
            raise
        finally:
            otel_context.detach(token)
            span.end()
            if self._duration is not None:
                labels = {k: v for k, v in attributes.items() if k != "db.operation.batch.size"}
                if call.collection is not None:
                    labels["db.collection.name"] = call.collection
                if error is not None:
                    labels["error.type"] = describe(error)
                self._duration.record(time.perf_counter() - started, labels)
