"""OpenTelemetry: each credential an activity holds is a span, and one trace runs from the webhook to every grant."""

from __future__ import annotations

import json

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.testing import WorkflowEnvironment

from firebreak.contracts import ApprovalOutcome, Phase
from incidents import inject, make_alert, open_incident, report_of, submit, wait_for_phase
from worker import build_worker

EXPORTER = InMemorySpanExporter()
trace.set_tracer_provider(TracerProvider())
trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(EXPORTER))  # type: ignore[attr-defined]


async def test_credentials_are_spans_with_grant_ids(time_env: WorkflowEnvironment, settings, fleet, approvers):
    inject(fleet.url, "checkout", "bad_deploy")
    EXPORTER.clear()
    async with build_worker(time_env.client, settings):
        handle = await open_incident(time_env.client, settings, make_alert("DrillRollback"))
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        approval = approvers.approval("alice", handle.id, waiting.plan_hash)
        assert (await submit(handle, approval)).counted
        report = await report_of(handle)

    spans = [s for s in EXPORTER.get_finished_spans() if s.attributes.get("temporal.workflow_id") == handle.id]
    by_grant = {s.attributes.get("firebreak.grant_id"): s for s in spans}
    step = report.status.steps[0]
    assert by_grant[step.grant.grant_id].attributes["firebreak.scope"] == "fleet.rollback:service/checkout"
    assert by_grant[step.rollback.grant.grant_id].attributes["firebreak.scope"] == "fleet.deploy:service/checkout"
    read = next(e for e in report.status.evidence if e.id == "changes")
    assert by_grant[read.grant.grant_id].attributes["firebreak.step"] == "changes"
    assert all(set(s.attributes) <= {"firebreak.audience", "firebreak.scope", "firebreak.step", "firebreak.grant_id",
                                     "temporal.workflow_id", "temporal.activity_id"} for s in spans)


async def test_one_trace_links_the_webhook_the_workflow_its_activities_and_every_grant(
    dev_env: WorkflowEnvironment, state_dir, runbooks_dir, broker, approvers
):
    """Through the real API and worker, both traced as `firebreak api` and worker.py trace them."""
    import httpx
    from temporalio.client import Client

    from api_harness import TOKEN, bearer, running_api
    from conftest import CONVERTER, worker_settings_for
    from demo.fleet import FleetServer
    from firebreak import signing
    from firebreak.telemetry import temporal_interceptors
    from firebreak.temporal import with_binding
    from test_secrets import RecordingVerifier

    traced = Client(dev_env.client.service_client, namespace=dev_env.client.namespace, data_converter=CONVERTER,
                    interceptors=with_binding(CONVERTER, temporal_interceptors()))
    verifier = RecordingVerifier(signing.TargetVerifier.from_broker(broker.url, "fleet"))
    with FleetServer(verifier=verifier, chaos_token="test-chaos", close_verifier=True) as fleet:
        settings = worker_settings_for(state_dir, runbooks_dir, broker, fleet)
        inject(fleet.url, "checkout", "bad_deploy")
        EXPORTER.clear()
        alert = make_alert("DrillPair").model_dump(mode="json")
        async with running_api(traced, settings, state_dir) as api, httpx.AsyncClient() as http:
            response = await http.post(f"{api.url}/v1/alerts", json=[alert], headers=bearer())
            assert response.status_code == 202, response.text
            incident = response.json()["incidents"][0]["incident_id"]
            handle = traced.get_workflow_handle(incident)
            waiting = await wait_for_phase(handle, Phase.awaiting_approval)
            assert (await submit(handle, approvers.approval("alice", incident, waiting.plan_hash))).decided
            report = await report_of(handle)
    assert report.phase == Phase.resolved, report.outcome

    spans = EXPORTER.get_finished_spans()
    [intake] = [s for s in spans if s.name == "POST /v1/alerts" and s.kind == SpanKind.SERVER]
    trace_id = intake.context.trace_id
    mine = [s for s in spans if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in mine}

    def parent(span):  # noqa: ANN001, ANN202
        return by_id.get(span.parent.span_id) if span.parent else None

    def ancestors(span):  # noqa: ANN001, ANN202
        while (span := parent(span)) is not None:
            yield span

    assert intake.parent is None and intake.attributes["http.response.status_code"] == 202
    # Under load the intake may send its signal-with-start again (its Temporal call timed out): the server
    # joins the retry to the same run, so every start is under the request and one of them starts the run.
    starts = [s for s in mine if s.name == "SignalWithStartWorkflow:IncidentWorkflow"]
    assert starts and all(intake in ancestors(s) for s in starts)  # the request's span, or FastAPI's under it
    [run] = [s for s in mine if s.name == "RunWorkflow:IncidentWorkflow"]
    start = parent(run)
    assert start in starts
    started = [s for s in mine if s.name.startswith("StartActivity:")]
    ran = [s for s in mine if s.name.startswith("RunActivity:")]
    names = {s.name.removeprefix("RunActivity:") for s in ran}
    assert {"investigate", "diagnose", "verify_approval", "execute_step", "file_ticket"} <= names, names
    assert all(parent(s) is start for s in started)  # scheduled in the workflow's context
    assert all(parent(s) in started and parent(s).name.split(":")[1] == s.name.split(":")[1] for s in ran)
    # Every grant the incident held is a span under the activity that held it, in this one trace.
    grants = {s.attributes["firebreak.grant_id"]: s for s in mine if s.name == "firebreak.credential"}
    held = {e.grant.grant_id for e in report.status.evidence if e.grant} | {
        r.grant.grant_id for r in report.status.steps if r.grant}
    assert held and held <= set(grants), (held, set(grants))
    for grant in grants.values():
        assert parent(grant).name in ("RunActivity:investigate", "RunActivity:execute_step")
    # No token value anywhere: not the tokens the target saw, not the intake's bearer token.
    secrets = [*verifier.tokens, TOKEN]
    assert verifier.tokens
    for span in spans:
        text = json.dumps({"attributes": dict(span.attributes or {}), "name": span.name,
                           "events": [dict(e.attributes or {}) for e in span.events]}, default=str)
        assert not any(secret in text for secret in secrets), span.name


async def test_the_request_span_without_fastapis_own_continues_the_senders_trace():
    """Where FastAPI does not trace requests itself (before 0.16x), RequestSpans makes the intake span."""
    import httpx

    from firebreak.api.tracing import RequestSpans

    async def app(scope, receive, send):  # noqa: ANN001, ANN202 - a bare ASGI app
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    EXPORTER.clear()
    parent_trace, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    transport = httpx.ASGITransport(app=RequestSpans(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        response = await http.post("/v1/alerts", headers={"Authorization": "Bearer secret-intake-token",
                                                          "traceparent": f"00-{parent_trace}-{parent_span}-01"})
    assert response.status_code == 202
    # Exactly one span in the sender's trace (work left over from earlier tests may export spans of its own).
    [span] = [s for s in EXPORTER.get_finished_spans() if format(s.context.trace_id, "032x") == parent_trace]
    assert span.name == "POST /v1/alerts" and span.kind == SpanKind.SERVER
    assert format(span.parent.span_id, "016x") == parent_span
    assert span.attributes["http.response.status_code"] == 202
    assert "secret-intake-token" not in json.dumps(dict(span.attributes), default=str)


@pytest.mark.integration
def test_spans_are_exported_over_otlp_only_when_an_endpoint_is_set(tmp_path):
    """In a fresh process, as the API and worker start: OTEL_EXPORTER_OTLP_ENDPOINT decides."""
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    posted: list[str] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            posted.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = ("import sys; from opentelemetry import trace; from firebreak.telemetry import export_from_env;"
              "on = export_from_env('firebreak-test'); trace.get_tracer('t').start_span('x').end(); print(on)")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    try:
        off = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert off.stdout.strip() == "False" and posted == []
        on = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**env, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}"})
        assert on.stdout.strip() == "True", on.stderr
        assert posted == ["/v1/traces"]  # flushed at exit
    finally:
        server.shutdown()
