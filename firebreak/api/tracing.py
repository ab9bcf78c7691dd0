"""A server span for every API request: the root of an incident's trace (or a child of the sender's).

FastAPI 0.16x makes this span itself (``fastapi.telemetry``, named by route, e.g. ``POST /v1/alerts``)
once a tracer provider is configured; for older FastAPI, :class:`RequestSpans` makes the same one.
Either way it is plain opentelemetry-api (a no-op until the process installs an SDK) and carries the
method, the path or route and the status, never a header or a body, so never a token or a
signature. A sender that propagates W3C ``traceparent`` (Grafana, a proxy) gets the intake as a child
of its own span.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

tracer = trace.get_tracer("firebreak.api")

Scope = dict[str, Any]


def native_request_spans() -> bool:
    """Whether FastAPI traces requests itself (then a second server span would only duplicate it)."""
    return importlib.util.find_spec("fastapi.telemetry") is not None


class RequestSpans:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])
                   if k.lower() in (b"traceparent", b"tracestate")}
        method, path = scope.get("method", ""), scope.get("path", "")
        with tracer.start_as_current_span(
            f"{method} {path}", kind=SpanKind.SERVER, context=propagate.extract(headers),
            attributes={"http.request.method": method, "url.path": path},
        ) as span:
            async def send_with_status(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, send_with_status)
