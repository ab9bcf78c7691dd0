"""Evidence within its byte budget: a large range query from a real Prometheus is cut, and says so."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
from temporalio.testing import ActivityEnvironment

from activities.deps import ActivityDeps
from activities.investigate import InvestigateActivities
from conftest import needs
from demo.prom import PrometheusProcess, free_port
from firebreak.contracts import Evidence, InvestigateRequest, Sample, Series
from firebreak.evidence import downsample, size_of, within_budget
from firebreak.runbook import Investigation
from firebreak.temporal import DATA_CONVERTER

BUDGET = 4096


def test_downsampling_keeps_the_ends_and_the_extremes():
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    samples = [Sample(t=t0 + timedelta(seconds=i), v=float(i % 97)) for i in range(5000)]
    samples[1234] = Sample(t=samples[1234].t, v=1000.0)
    kept = downsample(samples, 50)
    assert len(kept) == 50 and kept[0] == samples[0] and kept[-1] == samples[-1]
    assert samples[1234] in kept and min(s.v for s in kept) == 0.0
    assert [s.t for s in kept] == sorted(s.t for s in kept)


def test_evidence_over_budget_is_cut_and_says_what_was_cut():
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    series = [Series(labels={"pod": f"p{n}"}, samples=[Sample(t=t0 + timedelta(seconds=i), v=n + i / 1e4)
                                                       for i in range(2000)]) for n in range(40)]
    big = Evidence(id="latency", kind="prometheus_range", source="prometheus", query="q", ok=True,
                   series=series, gathered_at=t0)
    assert size_of(big) > 1_000_000
    cut = within_budget(big, 64 * 1024)
    assert size_of(cut) <= 64 * 1024
    assert cut.series[0].labels == {"pod": "p39"}  # the highest latest value is kept first
    assert "downsampled 80000 points" in (cut.gap or "") and cut.ok
    assert within_budget(cut, 64 * 1024) is cut  # under budget: untouched


@needs("prometheus")
async def test_a_large_range_query_stays_under_the_stated_budget(tmp_path: Path, fleet, broker, settings):
    prometheus = PrometheusProcess(tmp_path / "prometheus", free_port(), fleet.target)
    prometheus.start()
    try:
        prometheus.wait_ready(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # a few scrapes, one a second
            data = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": "count_over_time(up[1m])"}).json()
            if data["data"]["result"] and float(data["data"]["result"][0]["value"][1]) >= 8:
                break
            time.sleep(1)
        spec = Investigation(
            id="buckets", kind="prometheus_range", title="every latency bucket of every service",
            query='http_request_duration_seconds_bucket{namespace="{namespace}"}', lookback="15m", step="1s",
            target="prometheus", scope="metrics.read", resource="namespace/{namespace}", max_bytes=BUDGET,
        )
        deps = ActivityDeps.from_settings(settings.model_copy(update={
            "targets": {**settings.targets, "prometheus": prometheus.url}}))
        request = InvestigateRequest(incident_id="checkout.drill-rollback", runbook="drill-rollback", spec=spec,
                                     params={"namespace": "shop", "service": "checkout"},
                                     alert_started_at=datetime.now(timezone.utc))
        evidence = await ActivityEnvironment().run(InvestigateActivities(deps).investigate, request)
        await deps.http.aclose()
    finally:
        prometheus.stop()
    assert evidence.ok, evidence.gap
    # 45 series (15 buckets x 3 services) of one point a second: more than the budget, cut to it.
    assert f"over its {BUDGET}-byte budget" in (evidence.gap or "")
    [payload] = DATA_CONVERTER.payload_converter.to_payloads([evidence])
    assert size_of(evidence) <= BUDGET and len(payload.data) <= BUDGET
