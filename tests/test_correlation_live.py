"""Correlation across services, end to end on the real dev server with real Prometheus scraping the fleet.

payments fails (a deploy its callers cannot absorb) and checkout's error rate alert opens the incident:
the catalog walk finds checkout's dependencies, the mesh metrics attribute checkout's errors to its calls
to payments, "failing dependency: payments" ranks first, and the plan rolls back payments, not checkout,
with a blast radius that lists checkout and orders with their owners. Every catalog read holds its own
grant, visible in history; the escalation goes to payments' owning team.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, Worker

from conftest import needs, poll_until
from firebreak.contracts import Hypothesis, IncidentStatus, Phase
from firebreak.history import history_rows
from firebreak.incidents import MEMO_KEY
from firebreak.past_incidents import MAX_PRIOR
from firebreak.plan import build_plan
from firebreak.runbook import load_runbook
from firebreak.temporal import PHASE, RUNBOOK, SERVICE
from incidents import inject, make_alert, open_incident, report_of, submit, wait_for_phase
from worker import build_worker
from workflows.incident import IncidentWorkflow
from workflows.summary import status_markdown

CHECKOUT_ERRORS = ('sum(rate(http_requests_total{namespace="shop",service="checkout",code=~"5.."}[30s])) / '
                   'sum(rate(http_requests_total{namespace="shop",service="checkout"}[30s]))')

pytestmark = needs("prometheus")


async def test_a_failing_dependency_is_blamed_and_rolled_back_not_the_caller(
    dev_env: WorkflowEnvironment, settings, fleet, scraped_prometheus, approvers
):
    settings.targets["prometheus"] = scraped_prometheus.url
    checkout_version = fleet.fleet.service_state("checkout")["version"]
    healthy = fleet.fleet.service_state("payments")["version"]
    bad = inject(fleet.url, "payments", "dependency")["version"]
    await asyncio.to_thread(poll_until, lambda: (scraped_prometheus.query_value(CHECKOUT_ERRORS) or 0) > 0.05, 60,
                            "checkout 5xx > 5%")
    client = dev_env.client
    async with build_worker(client, settings):
        handle = await open_incident(client, settings, make_alert("HighErrorRate", "checkout"), requested_by="bob")
        waiting = await wait_for_phase(handle, Phase.awaiting_approval, timeout=90)

        top = waiting.hypotheses[0]
        scores = [(h.title, h.score) for h in waiting.hypotheses]
        assert top.id == "dependency_failure" and top.title == "failing dependency: payments", scores
        bad_deploy = next(h for h in waiting.hypotheses if h.id == "bad_deploy")
        assert bad_deploy.score < top.score
        share = next(f for f in top.findings if f.evidence == "dep_error_share")
        assert share.held and "dep_error_share:payments is" in share.detail, share.detail
        change = next(f for f in top.findings if f.test == "recent_change")
        assert change.held and bad in change.detail, change.detail
        # The plan rolls back payments, not checkout; the broker derived it from the bound params.
        assert [(s.action, s.verb, s.resource) for s in waiting.plan.steps] == [
            ("rollback_dependency", "fleet.rollback", "service/payments")]
        assert waiting.plan.params["dependency"] == "payments" and waiting.plan.params["service"] == "checkout"
        # Blast radius from the graph: checkout and orders depend on payments, with owners and lifecycle.
        radius = waiting.plan.impact["s1"]
        owners = {d.name: (d.owner, d.lifecycle) for d in radius.dependents}
        assert owners["checkout"] == ("team-storefront", "production"), owners
        assert owners["orders"] == ("team-fulfilment", "experimental"), owners
        assert radius.owner == "team-payments"
        assert any(d.traffic_share for d in radius.dependents), radius
        card = status_markdown(waiting)
        assert "failing dependency: payments (owner team-payments" in card and "orders (team-fulfilment" in card
        # Each catalog read held its own grant.
        walk = next(e for e in waiting.evidence if e.kind == "catalog")
        assert walk.grants and len({g.grant_id for g in walk.grants}) == len(walk.grants)
        assert {"catalog.read:component/checkout", "catalog.read:component/payments"} <= {g.scope for g in walk.grants}

        outcome = await submit(handle, approvers.approval("alice", handle.id, waiting.plan_hash))
        assert outcome.counted, outcome.reason
        report = await asyncio.wait_for(report_of(handle), timeout=240)
        assert report.phase == Phase.resolved, report.outcome
        assert fleet.fleet.service_state("payments")["version"] == healthy
        assert fleet.fleet.service_state("checkout")["version"] == checkout_version  # untouched
        history = await handle.fetch_history()

    rows = await history_rows(history, client.data_converter)
    details = "\n".join(r[3] for r in rows)
    assert "investigate catalog" in details and "investigate dep_error_share:payments" in details
    assert "execute s1: fleet.rollback on service/payments" in details
    # Each catalog read's own grant, in history.
    assert "catalog.read:component/checkout" in details and "catalog.read:component/payments" in details
    replayer = Replayer(workflows=[IncidentWorkflow], data_converter=client.data_converter)
    await replayer.replay_workflow(WorkflowHistory.from_json(handle.id, history.to_json()))


@workflow.defn(name="IncidentWorkflow")
class _EarlierIncident:
    """What an earlier, resolved incident leaves in visibility: its search attributes and its memo."""

    @workflow.run
    async def run(self, memo: dict) -> None:
        workflow.upsert_search_attributes([PHASE.value_set("resolved"), SERVICE.value_set("checkout"),
                                           RUNBOOK.value_set("bad-deploy")])
        workflow.upsert_memo({MEMO_KEY: memo})


async def test_earlier_resolved_incidents_are_evidence_with_a_bounded_weight(
    dev_env: WorkflowEnvironment, settings, fleet
):
    client = dev_env.client
    book = load_runbook(Path(settings.runbooks_dir) / "bad-deploy.yaml")
    hypothesis = Hypothesis(id="bad_deploy", title="t", score=1, findings=[], actions=["rollback"])
    seeded = []
    async with Worker(client, task_queue=f"earlier-{uuid.uuid4().hex[:6]}", workflows=[_EarlierIncident],
                      workflow_runner=UnsandboxedWorkflowRunner()) as seeder:
        for _ in range(2):
            incident_id = f"shop.checkout.error-rate-{uuid.uuid4().hex[:6]}"
            plan = build_plan(book, {"namespace": "shop", "service": "checkout"}, hypothesis,
                              incident_id=incident_id, run_id="r", requesters=[])
            memo = IncidentStatus(incident_id=incident_id, phase=Phase.resolved, runbook="bad-deploy",
                                  runbook_version=book.version, service="checkout",
                                  opened_at=datetime.now(timezone.utc), alerts_received=1, plan=plan,
                                  outcome="remediation applied and verified").model_dump(mode="json")
            await client.execute_workflow("IncidentWorkflow", memo, id=incident_id, task_queue=seeder.task_queue)
            seeded.append(incident_id)

    async def visible() -> int:
        query = "FirebreakService = 'checkout' AND FirebreakRunbook = 'bad-deploy' AND ExecutionStatus != 'Running'"
        return len([w async for w in client.list_workflows(query) if w.id in seeded])

    for _ in range(50):
        if await visible() == 2:
            break
        await asyncio.sleep(0.2)
    inject(fleet.url, "checkout", "bad_deploy")  # a recent deploy: this incident's own evidence supports bad_deploy
    async with build_worker(client, settings):
        handle = await open_incident(client, settings, make_alert("HighErrorRate", "checkout"))
        report = await asyncio.wait_for(report_of(handle), timeout=120)  # Prometheus is down here: escalated
    past = next(e for e in report.status.evidence if e.kind == "past_incidents")
    assert past.ok and past.grant is not None and past.past is not None, past.gap
    listed = {i.incident_id: i for i in past.past.incidents}
    assert all(listed[i].phase == "resolved" and listed[i].hypothesis == "bad_deploy" for i in seeded), listed
    assert "bad deploy resolved" in past.past.summary()
    bad = next(h for h in report.status.hypotheses if h.id == "bad_deploy")
    note = next(f for f in bad.findings if f.test == "confirmed_before")
    assert bad.prior == MAX_PRIOR and "at most 0.10" in note.detail, note.detail
    assert "past incidents:" in status_markdown(report.status)
