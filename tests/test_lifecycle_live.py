"""Lifecycle endings in real time on the dev server: the kill switch holds, stale plans are proposed anew,
an alert that clears before execution ends the incident with nothing run."""

from __future__ import annotations

import httpx
from temporalio.testing import WorkflowEnvironment

from firebreak.broker.server import BrokerServer
from firebreak.config import AGENT
from firebreak.contracts import AlertSignal, Phase
from incidents import inject, make_alert, open_incident, report_of, submit, wait_for_phase, wait_until
from worker import build_worker


def agent_writes(fleet, service: str = "checkout") -> list[str]:
    return [c["kind"] for c in fleet.fleet.changes(service) if c["author"] == AGENT]


async def test_freeze_holds_an_approved_incident_and_thaw_resumes_it(
    dev_env: WorkflowEnvironment, settings, fleet, approvers, broker: BrokerServer
):
    inject(fleet.url, "checkout", "bad_deploy")
    admin = {"Authorization": f"Bearer {broker.admin_token}"}
    async with build_worker(dev_env.client, settings):
        handle = await open_incident(dev_env.client, settings, make_alert("DrillPair"))
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        before = agent_writes(fleet)
        frozen = httpx.post(f"{broker.url}/v1/freeze", json={"reason": "suspicious mints", "by": "carol"},
                            headers=admin, timeout=10)
        assert frozen.status_code == 200
        try:
            outcome = await submit(handle, approvers.approval("alice", handle.id, waiting.plan_hash))
            # Approving a held incident says so.
            assert outcome.counted and outcome.decided
            assert outcome.held is not None and "credentials frozen by carol" in outcome.held
            held = await wait_until(handle, lambda s: s.held is not None)
            assert held.phase == Phase.executing and "credentials frozen by carol at " in held.held
            assert held.held.endswith(": suspicious mints") and agent_writes(fleet) == before
        finally:
            httpx.post(f"{broker.url}/v1/thaw", json={"reason": "all clear", "by": "carol"}, headers=admin, timeout=10)
        report = await report_of(handle)
    assert report.phase == Phase.resolved, report.outcome
    assert report.status.held is None
    assert agent_writes(fleet)[len(before):] == ["restart", "scale"]


async def test_a_plan_whose_precondition_no_longer_holds_is_proposed_anew_with_nothing_executed(
    dev_env: WorkflowEnvironment, settings, fleet, approvers
):
    inject(fleet.url, "checkout", "bad_deploy")
    async with build_worker(dev_env.client, settings):
        handle = await open_incident(dev_env.client, settings, make_alert("DrillRollback"))
        first = await wait_for_phase(handle, Phase.awaiting_approval)
        assert first.plan is not None and first.plan.observed is not None
        observed = first.plan.observed["s1"]
        assert observed["version"] == fleet.fleet.service_state("checkout")["version"]
        # Someone deploys by hand after the proposal: the plan no longer rolls back what it said it would.
        fleet.fleet.deploy("checkout", "v77", author="dana")
        before = agent_writes(fleet)
        outcome = await submit(handle, approvers.approval("alice", handle.id, first.plan_hash))
        assert outcome.counted and outcome.decided
        second = await wait_until(handle, lambda s: s.reproposals and s.phase == Phase.awaiting_approval)
        assert "s1's precondition no longer holds" in second.reproposals[0] and "'v77'" in second.reproposals[0]
        assert second.plan_hash != first.plan_hash and second.plan is not None
        assert second.plan.observed["s1"]["version"] == "v77"
        assert agent_writes(fleet) == before  # nothing executed
        # The old approval does not carry over: it was for the withdrawn plan.
        stale = await submit(handle, approvers.approval("alice", handle.id, first.plan_hash))
        assert not stale.counted and "signed for plan" in stale.reason
        await handle.terminate("test over")


async def test_an_alert_cleared_before_execution_ends_auto_resolved(
    dev_env: WorkflowEnvironment, settings, fleet, approvers
):
    inject(fleet.url, "checkout", "bad_deploy")
    alert = make_alert("DrillPair")
    async with build_worker(dev_env.client, settings):
        handle = await open_incident(dev_env.client, settings, alert)
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
    before = agent_writes(fleet)
    # With no worker running, the approval and the resolution arrive together: the approval is
    # judged first, then the alert has cleared by the time the plan would run.
    await handle.signal("approval", approvers.approval("alice", handle.id, waiting.plan_hash).model_dump(mode="json"))
    resolved = alert.model_copy(update={"status": "resolved"})
    await handle.signal("alert", AlertSignal(alerts=[resolved], received_at=alert.starts_at))
    async with build_worker(dev_env.client, settings):
        report = await report_of(handle)
    assert report.phase == Phase.auto_resolved, report.outcome
    assert "cleared before execution" in report.outcome
    assert report.status.steps == [] and agent_writes(fleet) == before
