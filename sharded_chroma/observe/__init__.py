"""Observability: tracing of calls and node requests (OpenTelemetry, optional), the client's
own counters, and their Prometheus collector (``prometheus-client``, optional)."""

from __future__ import annotations

from typing import Any

from .._errors import ConfigurationError
from ._tracing import NO_TRACING, CallTrace, RequestTrace, Tracing, current_call, noting

__all__ = [
    "NO_TRACING",
    "CallTrace",
    "RequestTrace",
    "Tracing",
    "current_call",
    "make_tracing",
    "noting",
    "prometheus_collector",
]


def make_tracing(tracer_provider: Any = None, meter_provider: Any = None) -> Tracing:
    """``NO_TRACING`` unless a provider is given; OpenTelemetry is imported only then."""
    if tracer_provider is None and meter_provider is None:
        return NO_TRACING
    try:
        from ._otel import OtelTracing
    except ImportError as exc:
        raise ConfigurationError(
            "tracing needs the OpenTelemetry API: pip install 'sharded-chroma[otel]'"
        ) from exc
    return OtelTracing(tracer_provider, meter_provider)


def prometheus_collector(client: Any, *, prefix: str = "sharded_chroma") -> Any:
    """A ``prometheus_client`` collector of ``client.metrics()``, read at every scrape:
    ``prometheus_client.REGISTRY.register(prometheus_collector(client))``."""
    try:
        from ._prometheus import ClientCollector
    except ImportError as exc:
        raise ConfigurationError(
            "metrics export needs prometheus-client: pip install 'sharded-chroma[prometheus]'"
        ) from exc
    return ClientCollector(client.metrics, prefix)
