"""Execution: one approved step, with a write credential minted for exactly that step.

The idempotency key is the workflow id, run id and step id, so a retried
activity never acts twice at the target. The token binds that key and the
exact body (see ``firebreak.broker.rules``): the body is sent as the canonical
JSON bytes the broker hashed. Only the fields the undo needs are kept from the
target's response: nothing else it says reaches history.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.credentials import activity_credential
from activities.deps import ActivityDeps
from activities.targets import reason, resource_url
from firebreak.broker.client import StepAlreadyWritten
from firebreak.contracts import ExecuteRequest, PlanStep, StepResult, canonical_json


def _kept_fields(step: PlanStep) -> set[str]:
    if step.undo is None:
        return set()
    return {m for v in step.undo.params.values() if isinstance(v, str) for m in re.findall(r"\{result\.([a-z0-9_]+)\}", v)}


def _kept(step: PlanStep, response: httpx.Response) -> dict[str, Any]:
    """The scalars of the target's answer that the step's undo needs: nothing else it says is kept."""
    try:
        data = response.json() if response.content else {}
    except ValueError:
        return {}
    fields = _kept_fields(step)
    return {k: v for k, v in data.items() if k in fields and isinstance(v, (str, int, float, bool))} \
        if isinstance(data, dict) else {}


def _attempt_s(step: PlanStep) -> float:
    """This attempt's own timeout (the workflow gives each a share of the step's timeout)."""
    timeout = activity.info().start_to_close_timeout
    return timeout.total_seconds() if timeout else step.timeout_s


class ExecuteActivities:
    def __init__(self, deps: ActivityDeps) -> None:
        self.deps = deps

    @activity.defn(name="execute_step")
    async def execute_step(self, request: ExecuteRequest) -> StepResult:
        step = request.plan.step(request.step_id)
        if step is None:
            raise ApplicationError(f"step {request.step_id} is not in the plan", non_retryable=True)
        if request.undo and step.undo is None:
            raise ApplicationError(f"step {step.id} declares no undo", non_retryable=True)
        verb = step.undo.verb if request.undo and step.undo else step.verb
        body = request.undo_params if request.undo else step.params
        # The plan's run, not this run: an incident that continued as new keeps its key (and its token's).
        key = f"{request.plan.incident_id}/{request.plan.run_id}/{step.id}/{'undo' if request.undo else 'do'}"
        url = resource_url(self.deps.target_url(step.target), step.resource, verb.split(".", 1)[1])
        try:
            return await self._write(request, step, verb, body, key, url)
        except StepAlreadyWritten as exc:
            # An earlier attempt wrote and reported it, then lost its answer (e.g. the broker restarted as it
            # answered the revoke): the step ran, once. Carry on with what that attempt reported.
            kept = {k: v for k, v in exc.result.items() if k in _kept_fields(step)}
            return StepResult(step_id=step.id, action=step.action, status="succeeded", response=kept,
                              detail=f"{verb} on {step.resource}: the target took this write in an earlier "
                                     "attempt (the broker's record); not sent again")

    async def _write(self, request: ExecuteRequest, step: PlanStep, verb: str, body: dict[str, Any], key: str,
                     url: str) -> StepResult:
        async with activity_credential(
            self.deps, audience=step.target, verb=verb, resource=step.resource, runbook=request.plan.runbook,
            step_id=step.id, plan=request.plan, approvals=request.approvals, receipts=request.receipts,
            undo=request.undo,
        ) as credential:
            try:
                response = await self.deps.http.post(
                    url, content=canonical_json(body),
                    headers={"Authorization": f"Bearer {credential.token}", "Idempotency-Key": key,
                             "Content-Type": "application/json"},
                    timeout=max(1.0, _attempt_s(step) - 2),
                )
            except httpx.HTTPError as exc:
                raise ApplicationError(f"{verb} on {step.resource}: {type(exc).__name__}") from None
            kept = _kept(step, response) if response.is_success else {}
            if response.is_success:
                # Said when the grant is revoked (on the way out): the broker then never mints this step again,
                # and keeps what the undo needs for an attempt that loses this answer.
                self.deps.broker.mark_wrote(credential, kept)
            grant = credential.grant
        if response.status_code >= 500:
            raise ApplicationError(f"{verb} on {step.resource}: target answered HTTP {response.status_code}")
        if response.status_code >= 400:
            raise ApplicationError(
                f"{verb} on {step.resource} refused by the target: HTTP {response.status_code} {reason(response)}",
                type="TargetRefused", non_retryable=True,
            )
        return StepResult(
            step_id=step.id, action=step.action, status="succeeded", grant=grant, response=kept,
            detail=f"{verb} on {step.resource}: HTTP {response.status_code}",
        )

