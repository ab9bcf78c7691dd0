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
from temporalio.service import RPCError
from temporalio.exceptions import ApplicationError

from activities.catalog import CatalogError, read_catalog
from activities.credentials import activity_credential
from activities.past_incidents import read_past
from firebreak.diagnosis import PER_DEPENDENCY
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


def evidence_id(spec: Investigation, params: dict[str, str]) -> str:
    """``dep_changes:payments`` for a per-dependency investigation, the spec's id otherwise."""
    if spec.for_each:
        return f"{spec.id}{PER_DEPENDENCY}{params.get(spec.for_each, '')}"
    return spec.id


def _retry_left(info: activity.Info, source_retry_s: float) -> bool:
    """Whether another attempt fits: within the worker's own limit and, with room for the attempt itself,
    within the workflow's budget. Server times on both sides, so a time-skipping server agrees."""
    waited = (info.current_attempt_scheduled_time - info.scheduled_time).total_seconds()
    budget = info.schedule_to_close_timeout
    attempt = info.start_to_close_timeout
    if budget is not None and attempt is not None and waited + attempt.total_seconds() >= budget.total_seconds():
        return False
    return waited < source_retry_s


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
            id=evidence_id(spec, request.params), kind=spec.kind, title=spec.title, source=spec.target, query="",
            ok=False, gathered_at=now,
        )
        try:
            if spec.kind == "catalog":
                # Many reads, each with its own grant: minted inside read_catalog, one per entity.
                await read_catalog(self.deps, request, evidence)
                evidence.ok = True
                return within_budget(evidence, spec.max_bytes)
            if spec.kind == "past_incidents":
                # Temporal visibility, through the worker's own client; the grant records the declared read.
                async with activity_credential(
                    self.deps, audience=spec.target, verb=spec.scope,
                    resource=render_plain(spec.resource, request.params), runbook=request.runbook,
                    params=request.params, step_id=spec.id,
                ) as credential:
                    evidence.grant = credential.grant
                await read_past(request, evidence, started)
                evidence.ok = True
                return within_budget(evidence, spec.max_bytes)
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
            evidence.gap = f"{evidence.id}: {exc.message}"
        except (httpx.TransportError, httpx.HTTPStatusError, BrokerError) as exc:
            # Down or restarting (the source, or the broker): worth asking again while the worker's
            # `source_retry_s` and the workflow's budget leave room for another attempt. Past that the
            # outage is a gap in the evidence, which keeps the query and the link a human can follow.
            problem = f"{evidence.id}: {spec.target} could not be read: {type(exc).__name__}: {exc}"
            if _retry_left(activity.info(), self.deps.settings.source_retry_s):
                raise ApplicationError(problem, type="SourceUnavailable") from None
            evidence.gap = problem
        except (httpx.HTTPError, SourceError, CatalogError, TemplateError, LookupError, ValueError, RPCError) as exc:
            evidence.gap = f"{evidence.id}: {spec.target} could not be read: {type(exc).__name__}: {exc}"
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

