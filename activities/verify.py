"""Verification: poll a query until it holds or its window ends."""

from __future__ import annotations

import asyncio
import time

import httpx

from temporalio import activity

from activities.credentials import activity_credential
from activities.deps import ActivityDeps
from activities.investigate import SourceError, parse_prometheus
from firebreak.contracts import VerifyRequest, VerifyResult


class VerifyActivities:
    def __init__(self, deps: ActivityDeps) -> None:
        self.deps = deps

    @activity.defn(name="verify_step")
    async def verify_step(self, request: VerifyRequest) -> VerifyResult:
        check = request.check
        base = self.deps.target_url(check.target)
        deadline = time.monotonic() + check.within_s
        last: float | None = None
        problem = ""
        async with activity_credential(
            self.deps, audience=check.target, verb="metrics.read", resource=check.resource,
            runbook=request.runbook, params=request.params, step_id=request.step_id,
        ) as credential:
            while True:
                try:
                    response = await self.deps.http.get(
                        f"{base}/api/v1/query", params={"query": check.query},
                        headers={"Authorization": f"Bearer {credential.token}"},
                    )
                    values = [s.samples[-1].v for s in parse_prometheus(response.json()) if s.samples]
                    last = max(values) if values else None
                    problem = "" if values else "no data"
                except (httpx.HTTPError, SourceError, ValueError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                activity.heartbeat(last)
                if last is not None and (last < check.threshold if check.test == "below" else last > check.threshold):
                    return VerifyResult(held=True, last_value=last, grant=credential.grant,
                                        detail=f"value {last:.4g} {check.test} {check.threshold:.4g}")
                if time.monotonic() + check.interval_s > deadline:
                    break
                await asyncio.sleep(check.interval_s)
            detail = f"still {last:.4g}, not {check.test} {check.threshold:.4g}" if last is not None else problem
            return VerifyResult(held=False, last_value=last, grant=credential.grant,
                                detail=f"{detail} after {check.within_s:.0f}s")
