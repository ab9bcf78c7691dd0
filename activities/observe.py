"""Observation of a step's target state: what its precondition says must still hold before the write.

Read with the target's read verb on the step's own resource (declared by the catalog action's
``precondition``), keeping only the fields named there: nothing else the target says reaches history.
"""

from __future__ import annotations

from typing import Any

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.credentials import activity_credential
from activities.deps import ActivityDeps
from activities.targets import reason, resource_url
from firebreak.contracts import ObserveRequest


class ObserveActivities:
    def __init__(self, deps: ActivityDeps) -> None:
        self.deps = deps

    @activity.defn(name="observe_target")
    async def observe_target(self, request: ObserveRequest) -> dict[str, Any]:
        step = request.step
        verb = f"{step.target}.read"
        url = resource_url(self.deps.target_url(step.target), step.resource)
        async with activity_credential(
            self.deps, audience=step.target, verb=verb, resource=step.resource, runbook=request.runbook,
            params=request.params, step_id=step.id,
        ) as credential:
            try:
                response = await self.deps.http.get(url, headers={"Authorization": credential.authorization})
            except httpx.HTTPError as exc:
                raise ApplicationError(f"{verb} on {step.resource}: {type(exc).__name__}") from None
        if response.status_code >= 400:
            raise ApplicationError(f"{verb} on {step.resource}: HTTP {response.status_code} {reason(response)}",
                                   non_retryable=400 <= response.status_code < 500)
        state = response.json()
        return {f: state.get(f) if isinstance(state.get(f), (str, int, float, bool)) else None
                for f in request.fields}
