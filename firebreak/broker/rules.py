"""What the broker may issue: the mint rules, kept apart from HTTP and files.

* A **read** (verb ``*.read``) is issued when the runbook named in the request
  declares that read: an ``investigate`` entry with the same target (audience),
  scope (verb) and resource template rendered with the request's params, each
  re-checked against the runbook's pattern. Verification reads are the same
  declared prometheus read (see ``firebreak.plan.build_plan``), so they need no
  separate rule.
* A **write** (any other verb) is issued only for a step of a plan that this
  runbook allows (``check_plan``), whose hash the broker recomputes, with the
  step's exact target/verb/resource (or its undo verb), and only when signed
  approvals, checked here against the roster, meet the policy for that step.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from firebreak import signing
from firebreak.broker.models import MintRequest
from firebreak.contracts import Approval, ApprovalCheck, PlanStep, canonical_json
from firebreak.escaping import TemplateError, render_plain
from firebreak.plan import check_plan
from firebreak.policy import evaluate
from firebreak.roster import Roster
from firebreak.runbook import Runbook


class Denied(Exception):
    """A refused mint; ``reason`` is safe to show and to log."""

    def __init__(self, reason: str, *, approvers: list[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.approvers = approvers or []


@dataclass
class Decision:
    ttl_s: float
    plan_hash: str = ""
    approvers: list[str] = field(default_factory=list)
    # (nonce, approval digest, approval expiry) to remember once the mint is issued
    nonces: list[tuple[str, str, float]] = field(default_factory=list)


def approval_digest(approval: Approval) -> str:
    return hashlib.sha256(canonical_json(approval.model_dump(mode="json"))).hexdigest()


def check_params(request: MintRequest, runbook: Runbook) -> dict[str, str]:
    """Params are alert label values: re-validate every one against the runbook."""
    for name, value in request.params.items():
        spec = runbook.params.get(name)
        if spec is None:
            raise Denied(f"param {name!r} is not declared by runbook {runbook.name!r}")
        if not re.fullmatch(spec.pattern.removeprefix("^").removesuffix("$"), value):
            raise Denied(f"param {name!r} does not match {spec.pattern}")
    return dict(request.params)


def authorize_read(request: MintRequest, runbook: Runbook) -> Decision:
    params = check_params(request, runbook)
    for spec in runbook.investigate:
        if spec.target != request.audience or spec.scope != request.verb:
            continue
        try:
            resource = render_plain(spec.resource, params)
        except TemplateError:
            continue  # a param this entry needs was not sent: it cannot be the one asked for
        if resource == request.resource:
            return Decision(ttl_s=request.ttl_s)
    raise Denied(
        f"runbook {runbook.name!r} declares no read {request.verb!r} of {request.resource!r} on {request.audience!r}"
    )


def _step_allows(step: PlanStep, request: MintRequest) -> bool:
    if (request.audience, request.resource) != (step.target, step.resource):
        return False
    return request.verb == step.verb or (step.undo is not None and request.verb == step.undo.verb)


def authorize_write(
    request: MintRequest,
    runbook: Runbook,
    roster: Roster | None,
    *,
    nonce_conflict: Callable[[str, str], bool],
    now: datetime,
) -> Decision:
    plan = request.plan
    if plan is None:
        raise Denied(f"write {request.verb!r} needs a plan and signed approvals; none was sent")
    if plan.runbook != request.runbook:
        raise Denied(f"plan is for runbook {plan.runbook!r}, the request names {request.runbook!r}")
    # The plan binds to one run of one incident: a plan from another run cannot unlock this one.
    if (plan.incident_id, plan.run_id) != (request.workflow_id, request.run_id):
        raise Denied(f"plan is for {plan.incident_id} run {plan.run_id}, not the requesting workflow's run")
    try:
        check_plan(plan, runbook)
    except ValueError as exc:
        raise Denied(f"plan does not fit runbook {runbook.name!r}: {exc}") from None
    plan_hash = plan.hash  # recomputed here from the plan sent, never taken on trust
    step = plan.step(request.step_id)
    if step is None:
        raise Denied(f"step {request.step_id!r} is not in the plan")
    if not _step_allows(step, request):
        raise Denied(
            f"step {step.id} allows {step.verb!r}"
            + (f" (undo {step.undo.verb!r})" if step.undo else "")
            + f" on {step.target}/{step.resource}, not {request.verb!r} on {request.audience}/{request.resource}"
        )
    if not request.approvals:
        raise Denied(f"write {request.verb!r} for step {step.id} carries no approvals")
    if roster is None:
        raise Denied("the broker has no roster: no approval can be verified")

    checked: list[tuple[Approval, ApprovalCheck]] = []
    nonces: list[tuple[str, str, float]] = []
    for approval in request.approvals:
        check = signing.verify_approval(approval, roster)
        if check.valid:
            digest = approval_digest(approval)
            if nonce_conflict(approval.nonce, digest):
                raise Denied(f"approval by {approval.approver} reuses a nonce seen on a different approval")
            nonces.append((approval.nonce, digest, approval.expires.timestamp()))
        checked.append((approval, check))

    result = evaluate(
        plan, runbook, checked, workflow_id=request.workflow_id, requested_by=request.requested_by, now=now
    )
    if result.rejected:
        raise Denied(f"plan {plan_hash[:12]} was rejected by {result.rejected_by}")
    if step.id not in result.approved_steps:
        need = next((n for n in result.needs if n.step == step.id), None)
        why = "; ".join(
            f"{a.approver}: {j.reason}" for (a, _), j in zip(checked, result.judgements, strict=True) if not j.counted
        )
        wanted = (
            f"needs {need.approvers} approver(s) from {need.groups}, has {need.approved_by or 'none'}" if need else ""
        )
        why = f" ({why})" if why else ""
        raise Denied(f"step {step.id} of plan {plan_hash[:12]} is not approved: {wanted}{why}")

    approvers = [
        a.approver
        for (a, _), j in zip(checked, result.judgements, strict=True)
        if j.counted and a.decision == "approve" and (not a.steps or step.id in a.steps)
    ]
    # A write credential lives no longer than the step may run.
    ttl = min(request.ttl_s, max(step.timeout_s, 1.0))
    return Decision(ttl_s=ttl, plan_hash=plan_hash, approvers=approvers, nonces=nonces)
