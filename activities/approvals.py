"""Approval checks: the broker verifies the signature and records when it arrived.

Asking the broker (not a local roster copy) makes the verdict the one the broker
will hold at mint time: judged once, at arrival. A roster the broker cannot
read, or a broker that cannot be reached, is a refusal with its reason, never an
exception that could fail the incident.
"""

from __future__ import annotations

from temporalio import activity

from activities.deps import ActivityDeps
from firebreak.broker.client import BrokerError
from firebreak.contracts import Approval, ApprovalCheck


class ApprovalActivities:
    def __init__(self, deps: ActivityDeps) -> None:
        self.deps = deps

    @activity.defn(name="verify_approval")
    async def verify_approval(self, approval: Approval) -> ApprovalCheck:
        try:
            return await self.deps.broker.check_approval(approval)
        except BrokerError as exc:
            if exc.status is None or exc.status >= 500:
                raise  # unreachable or failing: worth the activity's retries
            return ApprovalCheck(valid=False, reason=f"the broker refused to check it: {exc}")
