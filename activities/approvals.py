"""Approval checks: the broker verifies the signature and records when it arrived.

Asking the broker (not a local roster copy) makes the verdict the one the broker
will hold at mint time: judged once, at arrival. A roster the broker cannot
read, or a broker that cannot be reached, is a refusal with its reason, never an
exception that could fail the incident.

When it arrived is told by components the worker cannot forge: the broker's first
sight; for an approval the API took while no worker answered, the API's signed
arrival receipt (verified here with the intake's public key); and, for one judged
after the approval deadline, the time Temporal's server recorded its signal in the
incident's history. The earliest is ``arrived_at``; the workflow compares it with
the approval deadline.
"""

from __future__ import annotations

from datetime import datetime, timezone

from temporalio import activity
from temporalio.converter import WorkflowSerializationContext
from temporalio.service import RPCError

from activities.deps import ActivityDeps
from firebreak.broker.client import BrokerError
from firebreak.codec import unbind
from firebreak.contracts import Approval, ApprovalArrival, ApprovalCheck, approval_sha256
from firebreak.receipts import load_intake_public_keys, verify_arrival


class ApprovalActivities:
    def __init__(self, deps: ActivityDeps) -> None:
        self.deps = deps

    @activity.defn(name="verify_approval")
    async def verify_approval(self, approval: Approval, arrival: ApprovalArrival | None = None,
                              deadline: datetime | None = None) -> ApprovalCheck:
        # Called with the approval alone (runs from before arrival times), the SDK decodes without type
        # hints, since the arity differs: read the plain JSON as the models.
        approval = Approval.model_validate(approval) if isinstance(approval, dict) else approval
        arrival = ApprovalArrival.model_validate(arrival) if isinstance(arrival, dict) else arrival
        if isinstance(deadline, str):
            deadline = datetime.fromisoformat(deadline)
        try:
            check = await self.deps.broker.check_approval(approval)
        except BrokerError as exc:
            if exc.status is None or exc.status >= 500:
                raise  # unreachable or failing: worth the activity's retries
            return ApprovalCheck(valid=False, reason=f"the broker refused to check it: {exc}")
        seen = [check.received_at] if check.received_at else []
        if arrival is not None:
            problem = verify_arrival(arrival, approval, load_intake_public_keys(self.deps.settings.state_dir))
            if problem is None:
                seen.append(arrival.received)
            else:
                activity.logger.warning("approval by %s: arrival receipt ignored: %s", approval.approver, problem)
        if deadline is not None and check.valid and not any(at <= deadline for at in seen):
            # Judged after the deadline with nothing yet saying it came before: ask Temporal's history.
            signaled = await _signaled_at(approval)
            seen += [signaled] if signaled else []
        return check.model_copy(update={"arrived_at": min(seen) if seen else None})


async def _signaled_at(approval: Approval) -> datetime | None:
    """When the server recorded the ``approval`` signal carrying exactly this approval in this run's history."""
    info = activity.info()
    if info.workflow_id is None or info.workflow_namespace is None:
        return None  # not run by a workflow: no history to ask
    client = activity.client()
    converter = client.data_converter.with_context(
        WorkflowSerializationContext(namespace=info.workflow_namespace, workflow_id=info.workflow_id))
    digest = approval_sha256(approval)
    try:
        async for event in client.get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id) \
                .fetch_history_events():
            if not event.HasField("workflow_execution_signaled_event_attributes"):
                continue
            signaled = event.workflow_execution_signaled_event_attributes
            if signaled.signal_name != "approval" or len(signaled.input.payloads) != 1:
                continue
            try:
                [value] = await converter.decode(signaled.input.payloads)
                value, _ = unbind(value)  # a bound message reads as its envelope: the approval is inside
                if approval_sha256(Approval.model_validate(value)) != digest:
                    continue
            except Exception:  # noqa: BLE001 - a signal this cannot read is not this approval
                continue
            return event.event_time.ToDatetime(tzinfo=timezone.utc)
    except RPCError as exc:
        activity.logger.warning("approval by %s: history not readable, its signal time unknown: %s",
                                approval.approver, exc)
    return None
