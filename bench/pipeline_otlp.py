"""A minimal OTLP/HTTP trace receiver for benchmarks: the worker exports its spans here.

The worker exports over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (``firebreak.telemetry``);
this keeps what the bench needs of each span (name, times, attributes, events) in memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: dict[str, int] = field(default_factory=dict)  # name -> time (ns), first of each name

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class SpanReceiver:
    """``POST /v1/traces`` on a free port; ``endpoint`` is what OTEL_EXPORTER_OTLP_ENDPOINT takes."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.keep = True  # off while a phase floods spans nobody will read
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.keep:
                    receiver._ingest(body)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> SpanReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _ingest(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        found: list[Span] = []
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                for s in scope.spans:
                    events: dict[str, int] = {}
                    for e in s.events:
                        events.setdefault(e.name, e.time_unix_nano)
                    found.append(Span(
                        name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(), start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano, attributes={a.key: _value(a.value) for a in s.attributes},
                        events=events,
                    ))
        with self._lock:
            self.spans.extend(found)

    def by_workflow(self, workflow_ids: set[str]) -> dict[str, list[Span]]:
        """Spans naming one of these workflows (activity and credential spans carry the id)."""
        with self._lock:
            spans = list(self.spans)
        out: dict[str, list[Span]] = {}
        for span in spans:
            wid = span.attributes.get("temporal.workflow_id") or span.attributes.get("temporalWorkflowID")
            if wid in workflow_ids:
                out.setdefault(wid, []).append(span)
        return out
