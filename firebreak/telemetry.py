"""OpenTelemetry: one trace from the webhook through the workflow to every activity and credential grant.

opentelemetry-api is the only hard dependency, and every span Firebreak makes through it is a no-op
until a process installs an SDK. The `otel` extra brings the SDK and the OTLP exporter; with it:

- :func:`temporal_interceptors` gives Temporal's ``TracingInterceptor`` (it imports the SDK, so it is
  only offered when the SDK is there). On a client it traces starts, signals, queries and updates and
  carries the context in Temporal headers; a worker built from that client inherits it, so the
  workflow run and every activity join the caller's trace, and the activities' credential spans
  (``firebreak.credential``) are children of their activity's span.
- :func:`export_from_env` exports spans over OTLP when the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``
  (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set. Without it nothing is exported, and nothing
  else changes.
"""

from __future__ import annotations

import atexit
import logging
import os
from typing import Any

log = logging.getLogger("firebreak.telemetry")
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def temporal_interceptors() -> list[Any]:
    """``[TracingInterceptor()]`` where the OpenTelemetry SDK is installed, else ``[]``."""
    try:
        from temporalio.contrib.opentelemetry import TracingInterceptor
    except ImportError:
        return []
    return [TracingInterceptor()]


def export_from_env(service_name: str) -> bool:
    """Install an SDK tracer provider exporting over OTLP/HTTP, if an endpoint is configured.

    Returns whether spans will be exported. An endpoint without the `otel` extra installed is
    logged and ignored: tracing must never stop a service from starting.
    """
    if not any(os.environ.get(name) for name in ENDPOINT_VARS):
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but %s is missing (pip install 'firebreak[otel]'): "
                    "not exporting traces", exc.name)
        return False
    # The exporter reads the endpoint, headers and timeouts from the standard OTEL_* variables itself.
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)  # flush what is batched when the service stops
    log.info("exporting traces over OTLP as %s", resource.attributes.get("service.name"))
    return True
