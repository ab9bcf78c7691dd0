"""OpenTelemetry: each credential an activity holds is a span, named by grant id and scope."""

from __future__ import annotations

from opentelemetry import trace
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
