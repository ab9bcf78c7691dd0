"""Each activity mints its own credential inside itself and revokes it on the way out.

The token stays a local variable of the activity: it is never returned,
heartbeated, logged or put into an error. What leaves is the Grant.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from opentelemetry import trace
from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.deps import ActivityDeps
from firebreak.broker.client import CredentialsFrozen, IssuedCredential, MintRefused, StepAlreadyWritten
from firebreak.contracts import Approval, Plan, Receipt

MAX_TTL_S = 900.0
# The ApplicationError type a workflow recognises as "held by the kill switch", not failed.
FROZEN = "CredentialsFrozen"
# A no-op unless the worker process configures an OpenTelemetry SDK.
tracer = trace.get_tracer("firebreak.activities")


@asynccontextmanager
async def activity_credential(
    deps: ActivityDeps,
    *,
    audience: str,
    verb: str,
    resource: str,
    runbook: str,
    params: dict[str, str] | None = None,
    step_id: str = "",
    plan: Plan | None = None,
    approvals: Sequence[Approval] = (),
    receipts: Sequence[Receipt] = (),
    undo: bool = False,
) -> AsyncIterator[IssuedCredential]:
    info = activity.info()
    # The credential never outlives the activity that holds it.
    ttl = min(MAX_TTL_S, (info.start_to_close_timeout.total_seconds() if info.start_to_close_timeout else 60.0))
    span = tracer.start_span("firebreak.credential", attributes={
        "firebreak.audience": audience, "firebreak.scope": f"{verb}:{resource}", "firebreak.step": step_id,
        "temporal.workflow_id": info.workflow_id, "temporal.activity_id": info.activity_id,
    })
    try:
        async with deps.broker.credential(
            audience=audience, verb=verb, resource=resource, ttl_s=ttl,
            workflow_id=info.workflow_id, run_id=info.workflow_run_id, activity_id=info.activity_id,
            attempt=info.attempt, step_id=step_id, runbook=runbook, params=params or {}, plan=plan, approvals=list(approvals),
            receipts=list(receipts), undo=undo,
            # A read's answer does not wait for its revocation (still sent at once, retried until it lands):
            # it is on every investigation's critical path. A write's is revoked before the activity returns.
            revoke_in_background=verb.endswith(".read") and plan is None,
        ) as credential:
            # Grant id and scope only: the token itself never reaches a log, span or error.
            span.set_attribute("firebreak.grant_id", credential.grant.grant_id)
            # Events split the span into mint, use and revoke: what a trace says each one cost.
            span.add_event("minted")
            activity.logger.info("holding grant %s for %s:%s", credential.grant.grant_id, verb, resource)
            try:
                yield credential
            finally:
                span.add_event("released")
    except CredentialsFrozen as exc:
        # Not a failure of the step: the workflow holds the incident until the broker thaws.
        span.set_status(trace.Status(trace.StatusCode.ERROR, "credentials frozen"))
        raise ApplicationError(exc.reason, type=FROZEN, non_retryable=True) from None
    except StepAlreadyWritten:
        span.set_status(trace.Status(trace.StatusCode.ERROR, "step already wrote"))
        raise  # the step's own activity knows what that means (activities/execute.py)
    except MintRefused as exc:
        span.set_status(trace.Status(trace.StatusCode.ERROR, "credential refused"))
        raise ApplicationError(f"credential refused: {exc.reason}", type="MintRefused", non_retryable=True) from None
    finally:
        span.end()


class RunClosedReport(BaseModel):
    """The workflow's word to the broker that its run closed (and the run its plan names, if another)."""

    workflow_id: str
    run_ids: list[str] = Field(min_length=1, max_length=4)
    outcome: str = ""


class BrokerActivities:
    def __init__(self, deps: ActivityDeps) -> None:
        self.deps = deps

    @activity.defn(name="report_run_closed")
    async def report_run_closed(self, report: RunClosedReport) -> list[str]:
        """Idempotent at the broker (keyed by workflow and run): a retry records nothing twice.
        Returns the runs the broker newly recorded closed."""
        return await self.deps.broker.run_closed(report.workflow_id, report.run_ids, report.outcome)
