"""Investigation: read-only queries against Prometheus and change records, in parallel.

A source that cannot be read becomes an explicit gap in the evidence, never
a silent omission and never a failed workflow.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.credentials import activity_credential
from activities.deps import ActivityDeps
from activities.targets import reason, resource_url
from firebreak.broker.client import BrokerError
from firebreak.contracts import ChangeRecord, Evidence, InvestigateRequest, Sample, Series
from firebreak.escaping import TemplateError, render_plain, render_promql
from firebreak.runbook import Investigation, parse_duration


class SourceError(Exception):
    """A source answered with something other than data."""


def parse_prometheus(body: dict[str, Any]) -> list[Series]:
    if body.get("status") != "success":
        raise SourceError(f"prometheus error: {body.get('errorType', '')} {body.get('error', '')}".strip())
    data = body["data"]
    series: list[Series] = []
    for item in data.get("result", []):
        pairs = item.get("values") or ([item["value"]] if "value" in item else [])
        samples = [
            Sample(t=datetime.fromtimestamp(float(t), tz=timezone.utc), v=float(v))
            for t, v in pairs
            if math.isfinite(float(v))  # NaN (0/0) and Inf carry no evidence and do not survive JSON
        ]
        series.append(Series(labels=item.get("metric", {}), samples=samples))
    return series


class InvestigateActivities:
    def __init__(self, deps: ActivityDeps) -> None:
        self.deps = deps

    @activity.defn(name="investigate")
    async def investigate(self, request: InvestigateRequest) -> Evidence:
        spec = request.spec
        now = datetime.now(timezone.utc)
        evidence = Evidence(
            id=spec.id, kind=spec.kind, title=spec.title, source=spec.target, query="", ok=False, gathered_at=now
        )
        try:
            resource = render_plain(spec.resource, request.params)
            base = self.deps.target_url(spec.target)
            async with activity_credential(
                self.deps, audience=spec.target, verb=spec.scope, resource=resource,
                runbook=request.runbook, params=request.params, step_id=spec.id,
            ) as credential:
                evidence.grant = credential.grant
                headers = {"Authorization": f"Bearer {credential.token}"}
                if spec.kind == "change_log":
                    await self._changes(evidence, spec, base, resource, headers, now)
                else:
                    await self._prometheus(evidence, spec, base, request.params, headers, now)
            evidence.ok = True
        except ApplicationError as exc:  # the broker refused the read credential
            evidence.gap = f"{spec.id}: {exc.message}"
        except (httpx.HTTPError, BrokerError, SourceError, TemplateError, LookupError, ValueError) as exc:
            evidence.gap = f"{spec.id}: {spec.target} could not be read: {type(exc).__name__}: {exc}"
        return evidence

    async def _prometheus(
        self, evidence: Evidence, spec: Investigation, base: str, params: dict[str, str],
        headers: dict[str, str], now: datetime,
    ) -> None:
        query = render_promql(spec.query, params)
        evidence.query = query
        lookback = parse_duration(spec.lookback)
        link_base = self.deps.settings.prometheus_url_for_links or base
        evidence.link = f"{link_base}/graph?g0.expr={quote(query)}&g0.tab=0&g0.range_input={spec.lookback}"
        if spec.kind == "prometheus_range":
            url, args = f"{base}/api/v1/query_range", {
                "query": query, "start": (now - lookback).timestamp(), "end": now.timestamp(),
                "step": parse_duration(spec.step).total_seconds(),
            }
        else:
            url, args = f"{base}/api/v1/query", {"query": query, "time": now.timestamp()}
        response = await self.deps.http.get(url, params=args, headers=headers)
        if response.status_code >= 500:
            response.raise_for_status()
        evidence.series = parse_prometheus(response.json())

    async def _changes(
        self, evidence: Evidence, spec: Investigation, base: str, resource: str,
        headers: dict[str, str], now: datetime,
    ) -> None:
        since = now - parse_duration(spec.lookback)
        url = resource_url(base, resource, "changes")
        evidence.query = f"GET {url}?since={since.isoformat()}"
        response = await self.deps.http.get(url, params={"since": since.isoformat()}, headers=headers)
        if response.status_code != 200:
            raise SourceError(f"HTTP {response.status_code}: {reason(response)}")
        body = response.json()
        records = body.get("changes", body) if isinstance(body, dict) else body
        evidence.changes = [ChangeRecord.model_validate(r, strict=False) for r in records]

