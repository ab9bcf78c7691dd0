"""What the approver and the on-call engineer see is true (issue 26), on the real stack.

* stuck and saturation read their target's dependents from the catalog: the card, the ticket and the
  approval screen name them with their owners; with the catalog down they say "dependents unknown (not
  read)", never "no dependents" or "(none)";
* a bad deploy rolled back while a second fault keeps the errors up ends Failed, escalated with the
  evidence, not green;
* the demo's stack brought up twice on one state dir holds no metrics of the first run.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHistory
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from conftest import CLOSED_PORT_URL, needs, poll_until
from demo.prom import free_port
from firebreak.blast_radius import NOT_READ
from firebreak.config import AGENT
from firebreak.contracts import NEEDS_A_HUMAN_FAILURE, IncidentStatus, Phase
from firebreak.plan_view import render_plan
from incidents import inject, make_alert, open_incident, report_of, submit, wait_for_phase, wait_until
from worker import build_worker
from workflows.incident import IncidentWorkflow
from workflows.summary import status_markdown

pytestmark = needs("prometheus")

FALSE_CLAIMS = ("no dependents", "dependents: (none)", "did not answer")


async def views(handle, waiting: IncidentStatus) -> dict[str, str]:
    """The card, the proposal's ticket and the approval screen, as each reader gets them."""
    filed = await wait_until(handle, lambda s: bool(s.tickets), timeout=30)
    ticket = Path(urlsplit(filed.tickets[0].url).path).read_text()
    assert waiting.plan is not None
    return {"card": status_markdown(waiting), "ticket": ticket, "approval screen": "\n".join(render_plan(waiting.plan))}


async def test_restart_and_scale_out_name_the_real_dependents_and_a_catalog_down_says_unknown(
    dev_env: WorkflowEnvironment, settings, fleet, scraped_prometheus,
) -> None:
    settings.targets["prometheus"] = scraped_prometheus.url
    down = settings.model_copy(update={
        "targets": {**settings.targets, "catalog": CLOSED_PORT_URL},
        "temporal": settings.temporal.model_copy(update={"task_queue": f"catalog-down-{uuid.uuid4().hex[:6]}"})})
    inject(fleet.url, "payments", "stuck")
    inject(fleet.url, "inventory", "saturation")
    stuck = 'sum(rate(http_requests_total{namespace="shop",service="payments"}[10s]))'
    hot = 'max(service_cpu_utilization{namespace="shop",service="inventory"})'
    await asyncio.to_thread(poll_until, lambda: scraped_prometheus.query_value(stuck) == 0
                            and (scraped_prometheus.query_value(hot) or 0) > 0.85, 60, "payments stuck, inventory hot")
    client = dev_env.client
    async with build_worker(client, settings), build_worker(client, down):
        handles = await asyncio.gather(
            open_incident(client, settings, make_alert("ServiceStuck", "payments")),
            open_incident(client, settings, make_alert("HighCPUSaturation", "inventory")),
            open_incident(client, down, make_alert("ServiceStuck", "payments")))
        waiting = await asyncio.gather(*[wait_for_phase(h, Phase.awaiting_approval, timeout=120) for h in handles])
        shown = [await views(h, w) for h, w in zip(handles, waiting)]

    expected = [{"checkout": "team-storefront", "orders": "team-fulfilment"}, {"checkout": "team-storefront"}]
    for status, seen, dependents in zip(waiting[:2], shown[:2], expected):
        radius = status.plan.impact["s1"]
        assert {d.name: d.owner for d in radius.dependents} == dependents, radius
        for name, text in seen.items():
            for dependent, owner in dependents.items():
                assert f"{dependent} ({owner}" in text, (status.service, name, text)
            assert not any(claim in text for claim in FALSE_CLAIMS), (status.service, name, text)
    # The walk held one catalog.read grant per entity read, for the restart's target first.
    walked = next(e for e in waiting[0].evidence if e.kind == "catalog")
    assert "catalog.read:component/payments" in {g.scope for g in walked.grants}

    # The catalog down: the same restart, its dependents unknown and said so, with why.
    radius = waiting[2].plan.impact["s1"]
    assert radius.dependents == [] and "the catalog read failed" in radius.unread, radius
    for name, text in shown[2].items():
        assert NOT_READ in text, (name, text)
        assert not any(claim in text for claim in FALSE_CLAIMS), (name, text)


async def test_a_rollback_the_second_fault_defeats_ends_failed_escalated_with_the_evidence(
    dev_env: WorkflowEnvironment, settings, fleet, scraped_prometheus, approvers,
) -> None:
    settings.targets["prometheus"] = scraped_prometheus.url
    bad = inject(fleet.url, "checkout", "bad_deploy")["version"]
    inject(fleet.url, "payments", "dependency")  # the second fault: checkout's calls to payments fail
    # Both faults in the metrics before the incident opens: the verification must read them, not a window
    # still made of the healthy time before them.
    await asyncio.to_thread(poll_until, lambda: (scraped_prometheus.query_value(CHECKOUT_ERRORS) or 0) > 0.2, 60,
                            "checkout 5xx above 20%")
    client = dev_env.client
    async with build_worker(client, settings):
        handle = await open_incident(client, settings, make_alert("DrillUnfixed", "checkout"), requested_by="bob")
        waiting = await wait_for_phase(handle, Phase.awaiting_approval, timeout=60)
        assert (await submit(handle, approvers.approval("alice", handle.id, waiting.plan_hash))).counted
        with pytest.raises(WorkflowFailureError) as failure:
            await asyncio.wait_for(handle.result(), timeout=120)
        report = await report_of(handle)
        history = await handle.fetch_history()

    # Failed in Temporal (red in the UI), with the readable reason.
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == NEEDS_A_HUMAN_FAILURE, cause
    assert (await handle.describe()).status == WorkflowExecutionStatus.FAILED
    # The rollback ran, did not help, and was undone; the alert still fires: a human takes it.
    assert report.phase == Phase.rolled_back and report.status.needs_a_human, report.outcome
    assert "did not help" in report.outcome and "the alert still fires" in report.outcome
    [step] = report.status.steps
    assert step.status == "rolled_back" and step.verified is False and step.rollback.status == "succeeded"
    assert [c["kind"] for c in fleet.fleet.changes("checkout") if c["author"] == AGENT][-2:] == ["rollback", "deploy"]
    assert fleet.fleet.service_state("checkout")["version"] == bad
    # Escalated once, with the evidence: the hypothesis, the step, its verification and its undo.
    path = settings.state_dir / "notifications.jsonl"
    sent = [json.loads(line) for line in path.read_text().splitlines()]
    [escalation] = [n for n in sent if n["incident_id"] == handle.id and n["kind"] == "escalation"]
    assert "the alert still fires" in escalation["summary"] and escalation["to"] == "sre-leads"
    evidence = "\n".join(escalation["evidence"])
    assert "top hypothesis: A recent deploy raised the error rate" in evidence
    assert "step s1 rolled_back" in evidence and "rollback succeeded" in evidence
    card = status_markdown(report.status)
    assert card.startswith("### ROLLED_BACK: needs a human") and "did not hold" in card
    await Replayer(workflows=[IncidentWorkflow], data_converter=client.data_converter).replay_workflow(
        WorkflowHistory.from_json(handle.id, history.to_json()))


CHECKOUT_ERRORS = ('sum(rate(http_requests_total{namespace="shop",service="checkout",code=~"5.."}[30s])) / '
                   'sum(rate(http_requests_total{namespace="shop",service="checkout"}[30s]))')
PAYMENTS_ERRORS = ('sum(rate(http_requests_total{namespace="shop",service="payments",code=~"5.."}[30s])) / '
                   'sum(rate(http_requests_total{namespace="shop",service="payments"}[30s]))')


def _query(prometheus: str, promql: str) -> list[dict]:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def _range(prometheus: str, promql: str, lookback_s: float = 15 * 60) -> list[tuple[float, float]]:
    """Every (time, value) of a range query over the last ``lookback_s``, 1 s apart."""
    now = time.time()
    body = httpx.get(f"{prometheus}/api/v1/query_range", timeout=10, params={
        "query": promql, "start": now - lookback_s, "end": now, "step": 1}).json()
    assert body["status"] == "success", body
    return [(float(t), float(v)) for series in body["data"]["result"] for t, v in series["values"]
            if v not in ("NaN", "+Inf", "-Inf")]


def _value(prometheus: str, promql: str) -> float | None:
    result = _query(prometheus, promql)
    return float(result[0]["value"][1]) if result else None


def test_the_stacks_prometheus_started_twice_on_one_state_dir_has_no_metrics_of_the_first_run(
    tmp_path: Path, fleet, broker,
) -> None:
    """``firebreak up`` starts Prometheus through ``stack._start_prometheus`` on the state dir; the fleet it
    scrapes starts anew each time (here: reset). A second start must hold only the second run's metrics."""
    from firebreak.stack import Ports, Stack, _start_prometheus

    state = tmp_path / "state"
    ports = Ports(**{name: free_port() for name in vars(Ports())})
    intake = {"url": CLOSED_PORT_URL, "intake_token": "unused"}  # no alert reaches an intake here
    security = (f"{CLOSED_PORT_URL}/security", "unused")

    def start() -> tuple[Stack, str]:
        stack = Stack(state_dir=state, ports=ports)
        # Nothing listens at the security receiver's target here: Prometheus records it down, harmlessly.
        prometheus, _ = _start_prometheus(stack, fleet.url, intake, broker.url, security, "127.0.0.1:9")
        assert prometheus is not None
        return stack, prometheus

    # The first run: payments fails, and Prometheus records it.
    stack, prometheus = start()
    try:
        inject(fleet.url, "payments", "dependency")
        poll_until(lambda: (_value(prometheus, PAYMENTS_ERRORS) or 0) > 0.2, 60, "payments 5xx in Prometheus")
    finally:
        stack.stop()
    inject(fleet.url, "payments", "reset")  # what the next `firebreak up` gives: a fleet without the fault
    first_over = time.time()
    # The second run, on the same state dir: no evidence of the first run's fault.
    stack, prometheus = start()
    try:
        poll_until(lambda: (_value(prometheus, PAYMENTS_ERRORS) is not None), 30, "the second run's scrapes")
        # Over the longest lookback a runbook reads (15m), as its range queries read it: nothing from before.
        ratios = _range(prometheus, PAYMENTS_ERRORS)
        assert ratios and max(v for _, v in ratios) < 0.05, f"payments 5xx ratios in the second run's window: {ratios}"
        scrapes = _range(prometheus, 'up{job="fleet"}')
        assert scrapes and min(t for t, _ in scrapes) >= first_over - 1, (scrapes[:3], first_over)
    finally:
        stack.stop()
