"""Approval policy: who may approve, how many, separation of duties. Pure.

The workflow and the broker both call :func:`evaluate` over the full list of
approvals received, in order, so each reaches the same verdict on its own.
Signatures are checked before this (``ApprovalCheck``); this module never
touches crypto or I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from firebreak.config import AGENT
from firebreak.contracts import Approval, ApprovalCheck, Plan, PolicyNeed
from firebreak.runbook import Runbook, parse_duration


@dataclass(frozen=True)
class Judgement:
    counted: bool
    reason: str


@dataclass
class PolicyResult:
    needs: list[PolicyNeed]
    judgements: list[Judgement]
    approved_steps: set[str] = field(default_factory=set)
    rejected_by: str | None = None

    @property
    def rejected(self) -> bool:
        return self.rejected_by is not None

    @property
    def complete(self) -> bool:
        """Every step has its quorum."""
        return all(need.met for need in self.needs)


def needs_for(plan: Plan, runbook: Runbook) -> list[PolicyNeed]:
    needs = []
    for step in plan.steps:
        policy = runbook.remediate.policy_for(runbook.remediate.actions[step.action])
        needs.append(
            PolicyNeed(step=step.id, risk=step.risk, approvers=policy.approvers, groups=list(policy.groups), approved_by=[])
        )
    return needs


def _judge(
    approval: Approval,
    check: ApprovalCheck,
    *,
    plan: Plan,
    plan_hash: str,
    needs: dict[str, PolicyNeed],
    workflow_id: str,
    requesters: Collection[str],
    at: datetime,
    max_validity: timedelta,
    nonces: set[str],
    deadline: datetime | None,
) -> Judgement:
    if not check.valid:
        return Judgement(False, check.reason or "signature not valid")
    arrived = check.arrived_at or at
    if deadline is not None and arrived > deadline:
        return Judgement(False, f"arrived at {arrived.isoformat()}, after the approval deadline {deadline.isoformat()}")
    if approval.workflow_id != workflow_id:
        return Judgement(False, f"signed for workflow {approval.workflow_id!r}, not {workflow_id!r}")
    if approval.plan_hash != plan_hash:
        return Judgement(False, f"signed for plan {approval.plan_hash[:12]}, but the plan is now {plan_hash[:12]}")
    if approval.expires <= at:
        return Judgement(False, f"expired at {approval.expires_at}")
    if approval.expires - at > max_validity:
        return Judgement(False, f"valid until {approval.expires_at}, longer than the policy's maximum of {max_validity}")
    if approval.nonce in nonces:
        return Judgement(False, "nonce already used: a replayed approval")
    if approval.approver == AGENT:
        return Judgement(False, "the agent never approves its own plan")
    if approval.approver in requesters:
        return Judgement(False, f"{approval.approver} requested this incident and cannot approve it")
    unknown = [s for s in approval.steps if plan.step(s) is None]
    if unknown:
        return Judgement(False, f"names steps not in the plan: {unknown}")
    covered = approval.steps or [s.id for s in plan.steps]
    for step_id in covered:
        need = needs[step_id]
        if not set(check.groups) & set(need.groups):
            return Judgement(False, f"{approval.approver} is not in {need.groups}, required for step {step_id}")
    if approval.decision == "reject":
        return Judgement(True, "rejection recorded")
    if all(approval.approver in needs[s].approved_by for s in covered):
        return Judgement(False, f"{approval.approver} already approved; one person counts once")
    return Judgement(True, "counted")


def evaluate(
    plan: Plan,
    runbook: Runbook,
    approvals: Sequence[tuple[Approval, ApprovalCheck]],
    *,
    workflow_id: str,
    requested_by: str | None | Collection[str],
    now: datetime,
    deadline: datetime | None = None,
) -> PolicyResult:
    """Judge every approval in order and say which steps have their quorum.

    An approval's time checks use the instant it was first received (``check.received_at``),
    not ``now``: judged once on arrival, the verdict stands, so a quorum whose approvals
    arrive hours apart still completes, and the broker reaches the same verdict later.
    ``deadline`` (the incident's approval deadline): an approval that arrived after it
    (``check.arrived_at``, told by a component the worker cannot forge) never counts; one that
    arrived before it counts whenever it is judged.
    """
    plan_hash = plan.hash
    requesters = {requested_by} if isinstance(requested_by, str) else set(requested_by or ())
    max_validity = parse_duration(runbook.remediate.windows.expire_after)
    needs = {need.step: need for need in needs_for(plan, runbook)}
    nonces: set[str] = set()
    result = PolicyResult(needs=list(needs.values()), judgements=[])
    for approval, check in approvals:
        judgement = _judge(
            approval, check, plan=plan, plan_hash=plan_hash, needs=needs, workflow_id=workflow_id,
            requesters=requesters, at=check.received_at or now, max_validity=max_validity, nonces=nonces,
            deadline=deadline,
        )
        if check.valid:
            # A validly signed nonce is spent even if the approval did not count.
            nonces.add(approval.nonce)
        result.judgements.append(judgement)
        if not judgement.counted:
            continue
        if approval.decision == "reject":
            result.rejected_by = result.rejected_by or approval.approver
            continue
        for step_id in approval.steps or [s.id for s in plan.steps]:
            if approval.approver not in needs[step_id].approved_by:
                needs[step_id].approved_by.append(approval.approver)
    result.approved_steps = {need.step for need in result.needs if need.met}
    return result
