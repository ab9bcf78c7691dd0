"""Investigation: read-only queries against Prometheus and change records, in parallel.

A source that cannot be read becomes an explicit gap in the evidence, never
a silent omission and never a failed workflow.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.credentials import activity_credential
from activities.deps import ActivityDeps
from activities.targets import reason, resource_url
from firebreak.broker.client import BrokerError
from firebreak.evidence import within_budget
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


# Prometheus refuses a range query of more than 11,000 points per series.
MAX_POINTS = 11_000


def range_start(started: datetime, now: datetime, lookback: timedelta, step: timedelta) -> tuple[datetime, timedelta]:
    """Where a range query starts, and its step, so that it covers ``lookback`` before the alert's start
    and ends exactly at ``now``.

    Anchored at the alert's start, not at now: an investigation that runs late (a re-investigation, a
    worker that was down) still sees the time before the fault, the baseline a before/after test needs.
    Prometheus evaluates at start, start + step, ...: counting the steps back from ``now`` makes ``now``
    itself a point, so the latest value is the value at the investigation, not up to a step older.
    """
    span = (now - (min(started, now) - lookback)).total_seconds()
    step_s = max(step.total_seconds(), math.ceil(span / MAX_POINTS))
    points = max(1, math.ceil(span / step_s))
    return now - timedelta(seconds=points * step_s), timedelta(seconds=step_s)


class InvestigateActivities:
    def __init__(self, deps: ActivityDeps) -> None:
        self.deps = deps

    @activity.defn(name="investigate")
    async def investigate(self, request: InvestigateRequest) -> Evidence:
        spec = request.spec
        now = datetime.now(timezone.utc)
        started = request.alert_started_at
        if started.tzinfo is None:  # an incident system that sent a naive time means UTC
            started = started.replace(tzinfo=timezone.utc)
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
                    await self._changes(evidence, spec, base, resource, headers, now, started)
                else:
                    await self._prometheus(evidence, spec, base, request.params, headers, now, started)
            evidence.ok = True
        except ApplicationError as exc:  # the broker refused the read credential
            evidence.gap = f"{spec.id}: {exc.message}"
        except (httpx.TransportError, httpx.HTTPStatusError, BrokerError) as exc:
            # Down or restarting (the source, or the broker): worth asking again, within the workflow's budget
            # and the worker's own `source_retry_s`. Past them the outage is a gap in the evidence.
            info = activity.info()
            waited = (info.current_attempt_scheduled_time - info.scheduled_time).total_seconds()
            raise ApplicationError(
                f"{spec.id}: {spec.target} could not be read: {type(exc).__name__}: {exc}", type="SourceUnavailable",
                non_retryable=waited >= self.deps.settings.source_retry_s,
            ) from None
        except (httpx.HTTPError, SourceError, TemplateError, LookupError, ValueError) as exc:
            evidence.gap = f"{spec.id}: {spec.target} could not be read: {type(exc).__name__}: {exc}"
        return within_budget(evidence, spec.max_bytes)

    async def _prometheus(
        self, evidence: Evidence, spec: Investigation, base: str, params: dict[str, str],
        headers: dict[str, str], now: datetime, started: datetime,
    ) -> None:
        query = render_promql(spec.query, params)
        evidence.query = query
        link_base = self.deps.settings.prometheus_url_for_links or base
        if spec.kind == "prometheus_range":
            start, step = range_start(started, now, parse_duration(spec.lookback), parse_duration(spec.step))
            url, args = f"{base}/api/v1/query_range", {
                "query": query, "start": start.timestamp(), "end": now.timestamp(), "step": step.total_seconds(),
            }
            shown = f"{math.ceil((now - start).total_seconds())}s"
        else:
            url, args = f"{base}/api/v1/query", {"query": query, "time": now.timestamp()}
            shown = spec.lookback
        evidence.link = f"{link_base}/graph?g0.expr={quote(query)}&g0.tab=0&g0.range_input={shown}"
        response = await self.deps.http.get(url, params=args, headers=headers)
        if response.status_code >= 500:
            response.raise_for_status()
        evidence.series = parse_prometheus(response.json())

    async def _changes(
        self, evidence: Evidence, spec: Investigation, base: str, resource: str,
        headers: dict[str, str], now: datetime, started: datetime,
    ) -> None:
        # From the alert's start, not from now: an investigation that runs late still sees the change
        # that preceded the alert.
        since = min(started, now) - parse_duration(spec.lookback)
        url = resource_url(base, resource, "changes")
        evidence.query = f"GET {url}?since={since.isoformat()}"
        response = await self.deps.http.get(url, params={"since": since.isoformat()}, headers=headers)
        if response.status_code >= 500:
            response.raise_for_status()
        if response.status_code != 200:
            raise SourceError(f"HTTP {response.status_code}: {reason(response)}")
        body = response.json()
        records = body.get("changes", body) if isinstance(body, dict) else body
        evidence.changes = [ChangeRecord.model_validate(r, strict=False) for r in records]

