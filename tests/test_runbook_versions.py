"""Runbooks by version: an incident finishes on the runbook version it started on.

The broker re-derives every write from its own copy of the runbook the plan pins, by name and version.
It archives each version it loads (content-addressed, under its state directory), so deploying v2 and
restarting the broker does not strand the incidents still executing or rolling back on v1, and a plan
that claims a version the broker never had is refused, naming it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from conftest import TESTS, worker_settings_for
from demo.fleet import FleetServer
from firebreak import signing
from firebreak.broker.client import BrokerClient, MintRefused
from firebreak.broker.server import BrokerServer
from firebreak.config import AGENT
from firebreak.contracts import Hypothesis, Phase
from firebreak.plan import build_plan
from firebreak.runbook import load_runbook
from incidents import inject, make_alert, open_incident, receipt_signer, report_of, submit, wait_for_phase
from worker import build_worker

DRILL = TESTS / "data" / "runbooks" / "drills.yaml"  # drill-rollback v1: roll back, verification fails, undo


def _bump(runbooks: Path) -> None:
    """Deploy drill-rollback v2: another version, and a catalog that no longer derives v1's plans."""
    text = DRILL.read_text()
    assert "version: 1\n" in text and 'blast_radius: "{service}"' in text
    (runbooks / DRILL.name).write_text(
        text.replace("version: 1\n", "version: 2\n", 1)
        .replace('blast_radius: "{service}"', 'blast_radius: "{service}: every replica"', 1))


def _agent_changes(fleet: FleetServer) -> list[str]:
    """What the fleet itself recorded the agent doing to checkout, never asked of Firebreak."""
    return [c["kind"] for c in fleet.fleet.changes("checkout") if c["author"] == AGENT]


@pytest.fixture
def runbooks(tmp_path: Path) -> Path:
    directory = tmp_path / "runbooks"
    directory.mkdir()
    shutil.copy(DRILL, directory / DRILL.name)
    return directory


@pytest.fixture
def versioned_broker(tmp_path: Path, state_dir: Path, runbooks: Path) -> Iterator[BrokerServer]:
    server = BrokerServer(tmp_path / "broker-state", roster_path=state_dir / "roster.yaml", runbooks_dir=runbooks)
    with server:
        yield server


def _archived(broker: BrokerServer) -> list[str]:
    return sorted(p.name.split("-")[0] for p in (broker.state_dir / "broker" / "runbooks" / "drill-rollback").iterdir())


async def test_incident_on_v1_executes_and_rolls_back_after_v2_and_a_broker_restart(
    dev_env: WorkflowEnvironment, state_dir: Path, runbooks: Path, versioned_broker: BrokerServer, approvers
) -> None:
    broker = versioned_broker
    verifier = signing.TargetVerifier.from_broker(broker.url, "fleet")
    with FleetServer(verifier=verifier, chaos_token="test-chaos", close_verifier=True) as fleet:
        settings = worker_settings_for(state_dir, runbooks, broker, fleet, queue_prefix="versions")
        bad = inject(fleet.url, "checkout", "bad_deploy")["version"]
        async with build_worker(dev_env.client, settings):
            # bob raises it (his receipt, checked against the roster); alice approves.
            handle = await open_incident(dev_env.client, settings, make_alert("DrillRollback"), requested_by="bob")
            waiting = await wait_for_phase(handle, Phase.awaiting_approval, timeout=60)
            assert waiting.plan is not None and waiting.plan.runbook_version == 1

            # v2 is deployed and the broker restarts (same port, same state) while the incident waits.
            broker.stop()
            _bump(runbooks)
            broker.start()
            assert httpx.get(f"{broker.url}/healthz").json()["runbooks"] == ["drill-rollback"]
            assert _archived(broker) == ["v1", "v2"]

            assert (await submit(handle, approvers.approval("alice", handle.id, waiting.plan_hash))).counted
            report = await report_of(handle)

            # The write and its undo were both minted from v1, the version the plan pinned.
            assert report.phase == Phase.rolled_back, report.outcome
            [step] = report.status.steps
            assert step.status == "rolled_back" and step.rollback is not None
            assert step.rollback.status == "succeeded", step.rollback.detail
            assert _agent_changes(fleet)[-2:] == ["rollback", "deploy"]
            assert fleet.fleet.service_state("checkout")["version"] == bad

            # A new incident starts on v2.
            handle = await open_incident(dev_env.client, settings, make_alert("DrillRollback"), requested_by="bob")
            fresh = await wait_for_phase(handle, Phase.awaiting_approval, timeout=60)
            assert fresh.plan is not None and fresh.plan.runbook_version == 2
            await submit(handle, approvers.approval("alice", handle.id, fresh.plan_hash, decision="reject"))
            assert (await report_of(handle)).phase == Phase.rejected


async def test_a_version_the_broker_never_had_is_refused_naming_it(
    state_dir: Path, runbooks: Path, versioned_broker: BrokerServer, approvers
) -> None:
    broker = versioned_broker
    book = load_runbook(runbooks / DRILL.name)
    plan = build_plan(book, {"namespace": "shop", "service": "checkout"},
                      Hypothesis(id="bad_deploy", title="t", score=1, findings=[], actions=["rollback"]),
                      incident_id="checkout.drill-rollback", run_id="r-1", requesters=["bob"])
    assert plan is not None

    async def mint(claimed: int, match: str) -> None:
        claim = plan.model_copy(update={"runbook_version": claimed})
        async with BrokerClient(broker.url, broker.agent_token) as client:
            with pytest.raises(MintRefused, match=match):
                await client.mint(
                    audience="fleet", verb="fleet.rollback", resource="service/checkout", ttl_s=30,
                    workflow_id=claim.incident_id, run_id=claim.run_id, activity_id="1", step_id="s1",
                    runbook=claim.runbook, params=claim.params or {}, plan=claim,
                    approvals=[approvers.approval("alice", claim.incident_id, claim.hash)],
                    receipts=[receipt_signer(state_dir, "bob")(claim.incident_id)])

    await mint(7, r"runbook 'drill-rollback' v7 is unknown to the broker \(it has v1\)")

    # An archived copy whose bytes no longer match its content address is not trusted: v1 is gone.
    broker.stop()
    _bump(runbooks)
    [archived] = (broker.state_dir / "broker" / "runbooks" / "drill-rollback").glob("v1-*.yaml")
    assert archived.stat().st_mode & 0o777 == 0o600
    archived.write_text(archived.read_text().replace("risk: medium", "risk: low"))
    broker.start()
    await mint(1, r"runbook 'drill-rollback' v1 is unknown to the broker \(it has v2\)")
