"""Ordinary outages delay a step, they do not fail it: retries are sized to the step's own timeout.

Real time on the dev server: the target down for 30 s during a write, the broker down for 20 s after one.
Writes are counted by the fleet's own change log.
"""

from __future__ import annotations

import asyncio

from temporalio.testing import WorkflowEnvironment

from demo.fleet import FleetServer
from firebreak import signing
from firebreak.broker.server import BrokerServer
from firebreak.config import AGENT
from firebreak.contracts import ApprovalOutcome, Phase
from incidents import inject, make_alert, open_incident, report_of, submit, wait_for_phase
from worker import build_worker


def agent_writes(fleet, service: str = "checkout") -> list[str]:
    return [c["kind"] for c in fleet.changes(service) if c["author"] == AGENT]


async def test_the_target_down_for_30s_during_a_write_delays_it_and_it_lands_once(
    dev_env: WorkflowEnvironment, settings, fleet: FleetServer, approvers, broker: BrokerServer
):
    inject(fleet.url, "checkout", "bad_deploy")
    sim, port = fleet.fleet, fleet.port
    async with build_worker(dev_env.client, settings):
        handle = await open_incident(dev_env.client, settings, make_alert("DrillOutage"))
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        before = agent_writes(sim)
        fleet.stop()  # the target goes down just as the approval lands
        outcome = await submit(handle, approvers.approval("alice", handle.id, waiting.plan_hash))
        assert outcome.decided
        await asyncio.sleep(30)
        assert agent_writes(sim) == before
        verifier = signing.TargetVerifier.from_broker(broker.url, "fleet")
        with FleetServer(verifier=verifier, fleet=sim, port=port, chaos_token="test-chaos", close_verifier=True):
            report = await asyncio.wait_for(report_of(handle), timeout=90)
    assert report.phase == Phase.resolved, report.outcome
    assert agent_writes(sim)[len(before):] == ["restart"]  # exactly one write


async def test_the_broker_down_for_20s_after_a_write_never_fails_the_incident(
    dev_env: WorkflowEnvironment, settings, fleet: FleetServer, approvers, broker: BrokerServer
):
    bad = inject(fleet.url, "checkout", "bad_deploy")["version"]
    async with build_worker(dev_env.client, settings):
        handle = await open_incident(dev_env.client, settings, make_alert("DrillRollback"))
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        outcome = await submit(handle, approvers.approval("alice", handle.id, waiting.plan_hash))
        assert outcome.decided
        await wait_for_phase(handle, Phase.verifying, timeout=60)
        broker.stop()
        try:
            await asyncio.sleep(20)
        finally:
            broker.start()
        report = await asyncio.wait_for(report_of(handle), timeout=120)
    # The drill's check cannot hold here (no Prometheus): verified as failing, then undone.
    assert report.phase == Phase.rolled_back, report.outcome
    [step] = report.status.steps
    assert step.rollback is not None and step.rollback.status == "succeeded"
    assert fleet.fleet.service_state("checkout")["version"] == bad
