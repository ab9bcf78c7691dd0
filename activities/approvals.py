"""Approval checks: the broker verifies the signature and records when it arrived.

Asking the broker (not a local roster copy) makes the verdict the one the broker
will hold at mint time: judged once, at arrival. A roster the broker cannot
read, or a broker that cannot be reached, is a refusal with its reason, never an
exception that could fail the incident.

When it arrived is told by components the worker cannot forge: the broker's first
sight, and, for an approval the API took while no worker answered, the API's
signed arrival receipt (verified here with the intake's public key). The earlier
of the two is ``arrived_at``; the workflow compares it with the approval deadline.
"""

from __future__ import annotations

from temporalio import activity

from activities.deps import ActivityDeps
from firebreak.broker.client import BrokerError
from firebreak.contracts import Approval, ApprovalArrival, ApprovalCheck
from firebreak.receipts import load_intake_public_keys, verify_arrival


class ApprovalActivities:
    def __init__(self, deps: ActivityDeps) -> None:
        self.deps = deps

    @activity.defn(name="verify_approval")
    async def verify_approval(self, approval: Approval, arrival: ApprovalArrival | None = None) -> ApprovalCheck:
        # Called with the approval alone (runs from before arrival receipts), the SDK decodes without type
        # hints, since the arity differs: read the plain JSON as the models.
        approval = Approval.model_validate(approval) if isinstance(approval, dict) else approval
        arrival = ApprovalArrival.model_validate(arrival) if isinstance(arrival, dict) else arrival
        try:
            check = await self.deps.broker.check_approval(approval)
        except BrokerError as exc:
            if exc.status is None or exc.status >= 500:
                raise  # unreachable or failing: worth the activity's retries
            return ApprovalCheck(valid=False, reason=f"the broker refused to check it: {exc}")
        arrived = check.received_at
        if arrival is not None:
            problem = verify_arrival(arrival, approval, load_intake_public_keys(self.deps.settings.state_dir))
            if problem is None and (arrived is None or arrival.received < arrived):
                arrived = arrival.received
            elif problem is not None:
                activity.logger.warning("approval by %s: arrival receipt ignored: %s", approval.approver, problem)
        return check.model_copy(update={"arrived_at": arrived})
