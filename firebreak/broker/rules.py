"""What the broker may issue: the mint rules, kept apart from HTTP and files.

* A **read** (verb ``*.read``) is issued when the runbook named in the request
  declares that read: an ``investigate`` entry with the same target (audience),
  scope (verb) and resource template rendered with the request's params, each
  re-checked against the runbook's pattern. Verification reads are the same
  declared prometheus read (see ``firebreak.plan.build_plan``), so they need no
  separate rule.
* A **write** (any other verb) is issued only for a step of a plan that this
  runbook derives field for field (``check_plan``), whose hash the broker
  recomputes, with the step's exact target/verb/resource, only when signed
  approvals (each judged once, at its first arrival) meet the policy for that
  step, and only when signed receipts say who raised the incident (they may not
  approve). Every write and every undo passes all of these checks, first or not.
  The first write records a plan authorization that lives for its steps' budgets
  (timeouts, verification windows, undos); each step then mints once per run (a
  later attempt of the same activity may mint again until a grant of the step
  reports its write), an undo only after its step's write was issued and within
  that step's window, and nothing for a run the workflow reported closed.
  Tokens bind the exact request (``req``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from firebreak import signing
from firebreak.broker.models import MintRequest
from firebreak.broker.state import ApprovalSeen, DurableState, PlanAuthorization, plan_key
from firebreak.contracts import Approval, ApprovalCheck, Plan, PlanStep, canonical_json
from firebreak.escaping import TemplateError, render_plain
from firebreak.plan import check_plan, param_problem
from firebreak.policy import evaluate
from firebreak.roster import Roster
from firebreak.runbook import Runbook, parse_duration
from firebreak.signing import Ed25519PublicKey


class Denied(Exception):
    """A refused mint; ``reason`` is safe to show and to log."""

    def __init__(self, reason: str, *, approvers: list[str] | None = None, frozen: bool = False,
                 unavailable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.approvers = approvers or []
        self.frozen = frozen
        self.unavailable = unavailable  # a source the decision needs did not answer: 503, retryable


class StepAlreadyWrote(Denied):
    """The slot's write was reported taken by the target: it is never minted again. ``result`` is what
    the holder reported the target answered (the fields an undo needs), so a later attempt of the same
    activity, whose answer was lost, can carry on without a second write."""

    def __init__(self, reason: str, result: dict[str, Any]) -> None:
        super().__init__(reason)
        self.result = result


# How long the broker keeps an approval's verdict: past this it could authorize nothing anyway.
APPROVAL_RECORD_S = 2 * 86400


@dataclass
class Decision:
    ttl_s: float
    plan_hash: str = ""
    approvers: list[str] = field(default_factory=list)
    # (nonce, approval digest, approval expiry) to remember once the mint is issued
    nonces: list[tuple[str, str, float]] = field(default_factory=list)
    # the plan authorization to save, and the step slot ("s1/do") this mint spends, once issued
    authorization: PlanAuthorization | None = None
    slot: str = ""
    claims: dict[str, Any] = field(default_factory=dict)


def approval_digest(approval: Approval) -> str:
    """An approval's identity: its fields with the signature as the bytes it decodes to, so that
    re-encoding the same 64 bytes (another base64 spelling) is the same approval, judged once.
    For the usual (canonical) spelling this is the digest earlier versions recorded."""
    return hashlib.sha256(canonical_json(signing.canonical_approval(approval).model_dump(mode="json"))).hexdigest()


def check_params(request: MintRequest, runbook: Runbook) -> dict[str, str]:
    """Params are alert label values: re-validate every one against the runbook."""
    for name, value in request.params.items():
        problem = param_problem(runbook, name, value)
        if problem is not None:
            raise Denied(f"param {name!r} {problem.replace('not declared', 'is not declared')}")
    return dict(request.params)


def _declared_reads(runbook: Runbook) -> list[tuple[str, str, str]]:
    """(target, verb, resource template) of every read the runbook declares: its investigations,
    and the target-state read of each catalog action with a precondition."""
    reads = [(spec.target, spec.scope, spec.resource) for spec in runbook.investigate]
    # A catalog walk reads one named entity per grant: the service's, then each one it follows.
    reads += [(spec.target, spec.scope, spec.follow) for spec in runbook.investigate if spec.follow]
    reads += [(a.target, f"{a.target}.read", a.resource) for a in runbook.remediate.actions.values() if a.precondition]
    return reads


def authorize_read(request: MintRequest, runbook: Runbook) -> Decision:
    params = check_params(request, runbook)
    for target, verb, template in _declared_reads(runbook):
        if target != request.audience or verb != request.verb:
            continue
        try:
            resource = render_plain(template, params)
        except TemplateError:
            continue  # a param this entry needs was not sent: it cannot be the one asked for
        if resource == request.resource:
            return Decision(ttl_s=request.ttl_s)
    raise Denied(
        f"runbook {runbook.name!r} declares no read {request.verb!r} of {request.resource!r} on {request.audience!r}"
    )


def judge_approval(approval: Approval, roster: Roster | None, state: DurableState, now: float) -> ApprovalCheck:
    """The broker's verdict on an approval's signature, made once: at its first arrival.

    Later presentations get the same verdict and the same ``received_at``, so the workflow
    (which asks when the approval arrives) and a later mint judge it identically.
    """
    digest = approval_digest(approval)
    seen = state.approval_seen(digest)
    if seen is None:
        if roster is None:
            check = ApprovalCheck(valid=False, reason="the broker has no readable roster: no approval can be verified")
        else:
            check = signing.verify_approval(approval, roster)
        seen = state.remember_approval(digest, ApprovalSeen(
            received_at=now, workflow_id=approval.workflow_id, valid=check.valid, reason=check.reason,
            groups=list(check.groups), keep_until=now + APPROVAL_RECORD_S,
        ))
    return ApprovalCheck(valid=seen.valid, reason=seen.reason, groups=seen.groups,
                         received_at=datetime.fromtimestamp(seen.received_at, UTC))


def derive_requesters(request: MintRequest, roster: Roster | None, intake_keys: list[Ed25519PublicKey],
                      *, max_age: timedelta, now: datetime) -> list[str]:
    """Who raised the incident, from signed receipts only; at least one is required."""
    problems: list[str] = []
    requesters: set[str] = set()
    genuine = 0
    for receipt in request.receipts:
        if receipt.incident_id != request.workflow_id:
            problems.append(f"receipt is for {receipt.incident_id!r}")
            continue
        if not now - max_age <= receipt.issued <= now + timedelta(minutes=5):
            problems.append(f"receipt issued at {receipt.issued_at} is outside the incident's window")
            continue
        why = signing.verify_receipt(receipt, roster, intake_keys)
        if why is not None:
            problems.append(why)
            continue
        genuine += 1
        if receipt.requested_by:
            requesters.add(receipt.requested_by)
    if not genuine:
        detail = f" ({'; '.join(problems)})" if problems else ""
        raise Denied(f"write {request.verb!r} carries no genuine receipt of who raised the incident{detail}")
    return sorted(requesters)


def _step_binding(request: MintRequest, step: PlanStep) -> dict[str, Any]:
    """The ``req`` claim: what the target must see in the request this token is for.

    A step's write binds the SHA-256 of its exact body, derived here from the catalog. An
    undo binds the write it undoes: the target fills ``undo_body`` from the result *it*
    recorded for ``undo_of`` and refuses any other body, so no undo param comes from the worker.
    """
    assert request.plan is not None
    base = f"{request.plan.incident_id}/{request.plan.run_id}/{step.id}"
    if not request.undo:
        return {"idempotency_key": f"{base}/do", "body_sha256": hashlib.sha256(canonical_json(step.params)).hexdigest()}
    assert step.undo is not None
    return {"idempotency_key": f"{base}/undo", "undo_of": f"{base}/do", "undo_body": dict(step.undo.params)}


# Past a step's own budget: room for a worker to pick the activity up again, and for clock skew.
STEP_MARGIN_S = 120.0
# How long the broker remembers that a run closed: longer than any approval of it can authorize.
CLOSED_RUN_RECORD_S = APPROVAL_RECORD_S


def _verify_window_s(step: PlanStep) -> float:
    """How long the workflow may take to verify a step (its verify activity's schedule-to-close)."""
    return step.verify.within_s + 180.0 if step.verify is not None else 0.0


def step_budget_s(plan: Plan, step: PlanStep) -> float:
    """How long a step's authorization lives from its first write: its own timeout and those of the steps after
    it, every verification window, and every undo a rollback may run, plus a margin. Not the runbook's hour."""
    later = plan.steps[[s.id for s in plan.steps].index(step.id):]
    return (sum(s.timeout_s for s in later) + sum(_verify_window_s(s) for s in plan.steps)
            + sum(s.timeout_s for s in plan.steps if s.undo is not None) + STEP_MARGIN_S)


def authorize_write(
    request: MintRequest,
    runbook: Runbook,
    roster: Roster | None,
    *,
    state: DurableState,
    intake_keys: list[Ed25519PublicKey],
    nonce_conflict: Callable[[str, str], bool],
    now: datetime,
) -> Decision:
    """Every write and every undo passes the same checks: plan, scope, receipts, approvals; then its slot."""
    plan = request.plan
    if plan is None:
        raise Denied(f"write {request.verb!r} needs a plan and signed approvals; none was sent")
    if plan.runbook != request.runbook:
        raise Denied(f"plan is for runbook {plan.runbook!r}, the request names {request.runbook!r}")
    # The plan binds to one incident, and (through its hash) to the run that proposed it; an incident
    # that continued as new keeps that plan, so the slots below are keyed by the plan's run, not the caller's.
    if plan.incident_id != request.workflow_id:
        raise Denied(f"plan is for {plan.incident_id}, not the requesting workflow's run of {request.workflow_id}")
    try:
        check_plan(plan, runbook)  # every step re-derived from the broker's own runbook copy
    except ValueError as exc:
        raise Denied(f"plan does not fit runbook {runbook.name!r}: {exc}") from None
    plan_hash = plan.hash  # recomputed here from the plan sent, never taken on trust
    step = plan.step(request.step_id)
    if step is None:
        raise Denied(f"step {request.step_id!r} is not in the plan")
    verb = (step.undo.verb if step.undo else None) if request.undo else step.verb
    if (request.audience, request.resource, request.verb) != (step.target, step.resource, verb):
        kind = "undo" if request.undo else "write"
        raise Denied(f"step {step.id} {kind} allows {verb!r} on {step.target}/{step.resource}, "
                     f"not {request.verb!r} on {request.audience}/{request.resource}")
    key = plan_key(plan.incident_id, plan.run_id, plan_hash)
    authorization = state.plan(key)
    slot = f"{step.id}/{'undo' if request.undo else 'do'}"
    if request.undo and (authorization is None or f"{step.id}/do" not in authorization.minted):
        raise Denied(f"undo of step {step.id} before its step's write was issued")
    if authorization is not None:
        _check_slot(request, authorization, slot, plan_hash, state, now.timestamp())
    for workflow_id, run_id in {(plan.incident_id, plan.run_id), (request.workflow_id, request.run_id)}:
        closed = state.run_closed_at(workflow_id, run_id)
        if closed is not None:
            raise Denied(f"run {run_id} of {workflow_id} closed at {datetime.fromtimestamp(closed, UTC).isoformat()}: "
                         "nothing more is minted for it")
    # The same checks for every write and every undo, first or not: no credential without live approvals.
    # Approvals are judged at their first use, which is when the plan authorization was recorded.
    first_use = now if authorization is None else datetime.fromtimestamp(authorization.created_at, UTC)
    approval_window = parse_duration(runbook.remediate.windows.expire_after)
    requesters = derive_requesters(request, roster, intake_keys,
                                   max_age=approval_window + timedelta(minutes=30), now=first_use)
    if requesters:
        state.remember_requesters(plan.incident_id, requesters, now.timestamp() + APPROVAL_RECORD_S)
    if plan.requesters != requesters:
        raise Denied(f"requesters: the plan names {plan.requesters}, the signed receipts say {requesters}")
    # Whoever any receipt ever shown for this incident named raised it too, whatever the receipts sent now.
    excluded = sorted(set(requesters) | set(state.known_requesters(plan.incident_id)))
    authorization, nonces = _authorize(request, plan, step, runbook, roster, state, authorization,
                                       requesters=requesters, excluded=excluded, first_use=first_use,
                                       nonce_conflict=nonce_conflict, now=now)
    if now.timestamp() > authorization.expires_at:
        raise Denied(f"plan {plan_hash[:12]}'s authorization ended at "
                     f"{datetime.fromtimestamp(authorization.expires_at, UTC).isoformat()} (its steps' timeouts, "
                     "verification windows and undos)")
    started = authorization.minted_at.get(f"{step.id}/do")
    if started is not None and now.timestamp() > started + step_budget_s(plan, step):
        raise Denied(f"step {slot} of plan {plan_hash[:12]}: its window (timeout, verification, rollback) closed at "
                     f"{datetime.fromtimestamp(started + step_budget_s(plan, step), UTC).isoformat()}")
    # A write credential lives no longer than the step may run.
    ttl = min(request.ttl_s, max(step.timeout_s, 1.0))
    return Decision(ttl_s=ttl, plan_hash=plan_hash, approvers=authorization.approvers.get(step.id, []),
                    nonces=nonces, authorization=authorization, slot=slot,
                    claims={"req": _step_binding(request, step)})


def _check_slot(request: MintRequest, authorization: PlanAuthorization, slot: str, plan_hash: str,
                state: DurableState, now: float) -> None:
    """Each step writes once per run, and its undo once: only a later attempt of the activity that minted the
    slot may mint it again, and only until a grant of the slot has written."""
    earlier = authorization.minted.get(slot)
    if earlier is None:
        if slot.endswith("/do") and f"{slot[:-3]}/undo" in authorization.minted:
            raise Denied(f"step {slot} of plan {plan_hash[:12]} was already undone for this run; "
                         "approvals are not reusable")
        return
    if earlier != request.activity_id:
        raise Denied(f"step {slot} of plan {plan_hash[:12]} was already minted for this run (activity {earlier}); "
                     "approvals are not reusable")
    if slot in authorization.wrote:
        raise StepAlreadyWrote(f"step {slot} of plan {plan_hash[:12]} already wrote at the target (activity "
                               f"{earlier}): it is not minted again; approvals are not reusable",
                               authorization.results.get(slot, {}))
    attempt = authorization.attempts.get(slot, 1)
    if request.attempt < attempt:
        raise Denied(f"step {slot} of plan {plan_hash[:12]}: attempt {request.attempt} of activity {earlier} is "
                     f"older than its attempt {attempt}, which holds the grant")
    if request.attempt == attempt:
        grant = state.grants.get(authorization.grants.get(slot, ""))
        if grant is None or grant.revoked or grant.exp <= now:
            raise Denied(f"step {slot} of plan {plan_hash[:12]}: attempt {attempt} of activity {earlier} already "
                         "used its grant; only a new attempt may mint again")


def _authorize(
    request: MintRequest,
    plan: Plan,
    step: PlanStep,
    runbook: Runbook,
    roster: Roster | None,
    state: DurableState,
    existing: PlanAuthorization | None,
    *,
    requesters: list[str],
    excluded: list[str],
    first_use: datetime,
    nonce_conflict: Callable[[str, str], bool],
    now: datetime,
) -> tuple[PlanAuthorization, list[tuple[str, str, float]]]:
    """Judge the approvals (each at its recorded arrival) and record the plan authorization.

    ``first_use``: when the plan authorization was first recorded (now, for the first write): an approval
    authorizes within the approval window of its arrival, counted to its first use.
    ``excluded``: everyone who raised the incident, whom separation of duties keeps from approving."""
    if not request.approvals:
        raise Denied(f"write {request.verb!r} for step {step.id} carries no approvals")
    windows = runbook.remediate.windows
    approval_window = parse_duration(windows.expire_after)
    checked: list[tuple[Approval, ApprovalCheck]] = []
    nonces: list[tuple[str, str, float]] = []
    for approval in request.approvals:
        check = judge_approval(approval, roster, state, now.timestamp())
        if check.valid:
            digest = approval_digest(approval)
            if nonce_conflict(approval.nonce, digest):
                raise Denied(f"approval by {approval.approver} reuses a nonce seen on a different approval")
            nonces.append((approval.nonce, digest, approval.expires.timestamp()))
            assert check.received_at is not None
            if first_use - check.received_at > approval_window:
                # Judged once, but not forever: it authorizes within the approval window of its arrival.
                check = check.model_copy(update={
                    "valid": False, "reason": f"received at {check.received_at.isoformat()}, "
                                              f"more than {approval_window} before its first use"})
        checked.append((approval, check))

    result = evaluate(plan, runbook, checked, workflow_id=request.workflow_id, requested_by=excluded, now=now)
    plan_hash = plan.hash
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
        raise Denied(f"step {step.id} of plan {plan_hash[:12]} is not approved: {wanted}{why}",
                     approvers=[a.approver for a, _ in checked])
    stamp = now.timestamp()
    # The plan's execution budget from its first write (every step, verification and undo), within the
    # runbook's execution window; each step's own window is checked from its first write (step_budget_s).
    lifetime = min(parse_duration(windows.execute_within).total_seconds(), step_budget_s(plan, plan.steps[0]))
    keep = stamp + parse_duration(windows.execute_within).total_seconds() + approval_window.total_seconds() + 3600
    approved = {n.step: list(n.approved_by) for n in result.needs if n.met}
    if existing is None:
        authorization = PlanAuthorization(
            workflow_id=plan.incident_id, run_id=plan.run_id, plan_hash=plan_hash, created_at=stamp,
            expires_at=stamp + lifetime, keep_until=keep, approved_steps=sorted(approved), approvers=approved,
            digests=sorted({approval_digest(a) for a, _ in checked}), requesters=requesters, minted={},
        )
    else:  # the same checks again; more approvals may have arrived for steps the first ones did not cover
        authorization = existing
        authorization.approved_steps = sorted(set(existing.approved_steps) | set(approved))
        authorization.approvers = {**approved, **existing.approvers}
        authorization.digests = sorted(set(existing.digests) | {approval_digest(a) for a, _ in checked})
        authorization.keep_until = max(existing.keep_until, keep)
    return authorization, nonces
