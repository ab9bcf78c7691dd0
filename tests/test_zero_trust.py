"""Zero trust between the worker and the broker: each finding of the attack, replayed on the real stack.

The attacker holds what a compromised worker holds: the payload key (so Temporal accepts what it
sends) and the broker's bootstrap credential. Humans approve only what they were shown. Every
attack must be refused with its reason, leave an audit record, and make no write at the fleet;
the legitimate flows next to them still finish.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from firebreak import signing
from firebreak.broker.client import BrokerClient, MintRefused
from firebreak.broker.server import BrokerServer
from firebreak.cli import main
from firebreak.config import AGENT
from firebreak.contracts import (
    AlertSignal,
    ApprovalOutcome,
    Hypothesis,
    IncidentInput,
    IncidentReport,
    IncidentStatus,
    Phase,
    Plan,
    TicketRequest,
)
from firebreak.plan import build_plan
from firebreak.runbook import load_runbooks
from incidents import inject, make_alert, open_incident, receipt_signer, report_of, submit, wait_for_phase
from worker import build_worker


def agent_writes(fleet) -> int:
    """Writes the fleet itself recorded as made by the agent: never asked of Firebreak."""
    return sum(1 for name in ("checkout", "payments", "inventory")
               for change in fleet.fleet.changes(name) if change["author"] == AGENT)


def denials(broker: BrokerServer) -> list[str]:
    return [json.loads(line)["reason"] for line in broker.audit_path.read_text().splitlines()
            if json.loads(line)["event"] == "deny"]


async def attack(broker: BrokerServer, expect: str, **fields: Any) -> str:
    """Mint as the holder of the bootstrap credential; it must be refused, and audited, with ``expect``."""
    async with BrokerClient(broker.url, broker.agent_token) as client:
        with pytest.raises(MintRefused) as refused:
            await client.mint(**fields)
    assert expect in refused.value.reason, refused.value.reason
    assert denials(broker)[-1] == refused.value.reason
    return refused.value.reason


def mint_fields(plan: Plan, step_id: str, approvals: list, receipts: list, *, undo: bool = False,
                activity_id: str = "attacker-1", **kw: Any) -> dict[str, Any]:
    step = plan.step(step_id)
    assert step is not None
    verb = step.undo.verb if undo and step.undo else step.verb
    return dict(audience=step.target, verb=verb, resource=step.resource, ttl_s=60, workflow_id=plan.incident_id,
                run_id=plan.run_id, activity_id=activity_id, step_id=step_id, runbook=plan.runbook,
                params=plan.params or {}, plan=plan, approvals=approvals, receipts=receipts, undo=undo) | kw


def runbook(settings, name: str):
    return {b.name: b for b in load_runbooks(Path(settings.resolved_runbooks_dir()))}[name]


# -- finding 1: the approver signs only what was shown, re-hashed ------------------------------------


@workflow.defn(name="IncidentWorkflow", sandboxed=False)
class RogueIncident:
    """A workflow that answers `status` with whatever the attacker wants the approver to see."""

    def __init__(self) -> None:
        self.answer: IncidentStatus | None = None

    @workflow.run
    async def run(self, answer: IncidentStatus) -> None:
        self.answer = answer
        await workflow.wait_condition(lambda: False)

    @workflow.query
    def status(self) -> IncidentStatus:
        assert self.answer is not None
        return self.answer


async def test_rogue_status_gets_no_signature_for_a_plan_it_did_not_show(
    dev_env: WorkflowEnvironment, settings, fleet, broker: BrokerServer, approvers, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
):
    checkout = build_plan(runbook(settings, "drill-rollback"), {"namespace": "shop", "service": "checkout"},
                          Hypothesis(id="bad_deploy", title="t", score=1, findings=[], actions=["rollback"]),
                          incident_id="checkout.drill-rollback", run_id="r-1", requesters=[])
    harmless = build_plan(runbook(settings, "drill-pair"), {"namespace": "shop", "service": "inventory"},
                          Hypothesis(id="busy", title="t", score=1, findings=[], actions=["restart", "scale_out"]),
                          incident_id="checkout.drill-rollback", run_id="r-1", requesters=[])
    assert checkout is not None and harmless is not None
    queue = f"rogue-{uuid.uuid4().hex[:6]}"
    lie = IncidentStatus(incident_id=checkout.incident_id, phase=Phase.awaiting_approval, runbook="drill-pair",
                         runbook_version=1, opened_at=await dev_env.get_current_time(), alerts_received=1,
                         plan=harmless, plan_hash=checkout.hash)
    state = tmp_path / "cli"
    state.mkdir()
    (state / "keys").symlink_to(settings.state_dir / "keys")
    (state / "stack.json").write_text(json.dumps({"settings": {
        "temporal": {"address": dev_env.client.service_client.config.target_host,
                     "payload_key_file": settings.temporal.payload_key_file},
        "roster": str(settings.resolved_roster()), "runbooks_dir": str(settings.resolved_runbooks_dir()),
        "api_url": "http://127.0.0.1:9"}}))
    before = agent_writes(fleet)
    async with Worker(dev_env.client, task_queue=queue, workflows=[RogueIncident]):
        wid = f"{checkout.incident_id}-{uuid.uuid4().hex[:6]}"
        lie = lie.model_copy(update={"incident_id": wid, "plan": harmless.model_copy(update={"incident_id": wid})})
        await dev_env.client.start_workflow("IncidentWorkflow", lie, id=wid, task_queue=queue)
        code = await asyncio.to_thread(main, ["approve", wid, "--as", "alice", "--state-dir", str(state)])
    out = capsys.readouterr()
    assert code == 1
    assert "fleet.restart" in out.out and "service/inventory" in out.out  # what the screen showed
    assert f"the workflow says the plan hash is {checkout.hash}" in out.err and "refusing to sign" in out.err

    # Had the rogue told the truth about its harmless plan, alice's signature covers that plan only.
    signed_for_harmless = approvers.approval("alice", checkout.incident_id, harmless.hash)
    await attack(broker, "signed for plan",
                 **mint_fields(checkout, "s1", [signed_for_harmless], [receipt_signer(settings.state_dir, None)(
                     checkout.incident_id)]))
    assert agent_writes(fleet) == before


# -- finding 2: hidden plan fields are re-derived by the broker ---------------------------------------


async def test_crafted_undo_params_and_verification_are_refused_naming_the_field(
    time_env: WorkflowEnvironment, settings, fleet, broker: BrokerServer, approvers
):
    """A forged IncidentInput carries a runbook whose undo deploys `pwned` and whose check never passes."""
    inject(fleet.url, "checkout", "bad_deploy")
    genuine = runbook(settings, "drill-rollback")
    action = genuine.remediate.actions["rollback"]
    assert action.undo is not None and action.verify is not None
    crafted = genuine.model_copy(deep=True)
    crafted.remediate.actions["rollback"] = action.model_copy(update={
        "undo": action.undo.model_copy(update={"params": {"version": "pwned"}}),
        "verify": action.verify.model_copy(update={"threshold": -1.0}),
    })
    wid = f"checkout.drill-rollback-{uuid.uuid4().hex[:6]}"
    before = agent_writes(fleet)
    async with build_worker(time_env.client, settings):
        alert = make_alert("DrillRollback")
        handle = await time_env.client.start_workflow(
            "IncidentWorkflow",
            IncidentInput(incident_id=wid, runbook=crafted, params={"namespace": "shop", "service": "checkout"},
                          receipts=[receipt_signer(settings.state_dir, None)(wid)]),
            id=wid, task_queue=settings.temporal.task_queue, start_signal="alert",
            start_signal_args=[AlertSignal(alerts=[alert], received_at=alert.starts_at,
                                           receipt=receipt_signer(settings.state_dir, None)(wid))],
            result_type=IncidentReport,
        )
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        # What alice is shown now includes the undo params: she would see `pwned` before signing.
        assert waiting.plan is not None and waiting.plan.steps[0].undo.params == {"version": "pwned"}
        approval = approvers.approval("alice", wid, waiting.plan_hash)
        outcome = await submit(handle, approval)
        assert outcome.counted  # the workflow is the attacker's; the broker is not
        report = await report_of(handle)
    assert report.phase == Phase.failed
    [step] = report.status.steps
    assert step.status == "failed" and "step s1: undo.params.version differs" in step.detail
    assert "undo.params.version differs" in denials(broker)[-1]
    assert agent_writes(fleet) == before


# -- findings 3 and 4: no undo before its step, approvals spent once ---------------------------------


async def test_early_undo_and_reused_approvals_are_refused_and_the_real_flow_still_runs(
    time_env: WorkflowEnvironment, settings, fleet, broker: BrokerServer, approvers
):
    bad = inject(fleet.url, "checkout", "bad_deploy")["version"]
    before = agent_writes(fleet)
    async with build_worker(time_env.client, settings):
        handle = await open_incident(time_env.client, settings, make_alert("DrillRollback"))
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        plan = waiting.plan
        assert plan is not None
        approval = approvers.approval("alice", handle.id, waiting.plan_hash)
        receipts = [receipt_signer(settings.state_dir, None)(handle.id)]
        # The attacker lifts alice's approval and asks for the undo (a deploy of any version) first.
        await attack(broker, "undo of step s1 before its step's write was issued",
                     **mint_fields(plan, "s1", [approval], receipts, undo=True))
        assert agent_writes(fleet) == before
        # The real flow: the step runs, verification fails here (no Prometheus), the undo restores.
        outcome = await submit(handle, approval)
        assert outcome.counted and outcome.decided
        report = await report_of(handle)
    assert report.phase == Phase.rolled_back, report.outcome
    assert report.status.steps[0].rollback is not None and report.status.steps[0].rollback.status == "succeeded"
    assert fleet.fleet.service_state("checkout")["version"] == bad  # the undo re-deployed what it replaced
    assert agent_writes(fleet) == before + 2
    # After the run closed, the same approvals cannot mint the step or its undo again.
    await attack(broker, "already minted for this run", **mint_fields(plan, "s1", [approval], receipts))
    await attack(broker, "step s1/undo of plan", **mint_fields(plan, "s1", [approval], receipts, undo=True))
    assert agent_writes(fleet) == before + 2


# -- finding 5: the requester comes from signed receipts ----------------------------------------------


async def test_leaving_the_requester_out_does_not_let_their_approval_count(
    time_env: WorkflowEnvironment, settings, fleet, broker: BrokerServer, approvers
):
    inject(fleet.url, "checkout", "bad_deploy")
    before = agent_writes(fleet)
    async with build_worker(time_env.client, settings):
        handle = await open_incident(time_env.client, settings, make_alert("DrillRollback"), requested_by="bob")
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        plan = waiting.plan
        assert plan is not None and plan.requesters == ["bob"]
        by_bob = approvers.approval("bob", handle.id, waiting.plan_hash)
        # Omitted entirely:
        await attack(broker, "carries no genuine receipt", **mint_fields(plan, "s1", [by_bob], []))
        # Replaced by the intake's receipt for another incident:
        other = receipt_signer(settings.state_dir, None)("payments.drill-rollback")
        await attack(broker, "receipt is for 'payments.drill-rollback'", **mint_fields(plan, "s1", [by_bob], [other]))
        # An intake receipt for this incident, forged with a key that is not the intake's:
        forged = signing.sign_receipt(other.model_copy(update={"incident_id": handle.id, "signature": ""}),
                                      signing.generate_key())
        await attack(broker, "does not verify", **mint_fields(plan.model_copy(update={"requesters": []}), "s1",
                                                              [by_bob], [forged]))
        # With the real receipt, bob is who raised it:
        await attack(broker, "bob requested this incident and cannot approve it",
                     **mint_fields(plan, "s1", [by_bob], [receipt_signer(settings.state_dir, "bob")(handle.id)]))
        await handle.terminate("attack test done")
    assert agent_writes(fleet) == before


# -- finding 6: identifiers are validated before they reach a path ------------------------------------


@workflow.defn(name="Scheduler", sandboxed=False)
class Scheduler:
    @workflow.run
    async def run(self, args: list[Any]) -> None:
        queue, request = args
        await workflow.execute_activity("file_ticket", request, task_queue=queue,
                                        start_to_close_timeout=timedelta(seconds=10),
                                        retry_policy=RetryPolicy(maximum_attempts=1))


async def test_a_traversal_incident_id_never_leaves_the_tickets_dir_even_with_the_payload_key(
    time_env: WorkflowEnvironment, settings, tmp_path: Path
):
    queue = f"attacker-{uuid.uuid4().hex[:6]}"
    request = TicketRequest.model_construct(incident_id="../../evil", event="proposed", summary="x",
                                            body_markdown="owned", payload={})
    async with build_worker(time_env.client, settings), Worker(time_env.client, task_queue=queue,
                                                               workflows=[Scheduler]):
        with pytest.raises(WorkflowFailureError) as failed:
            await time_env.client.execute_workflow(
                "Scheduler", [settings.temporal.task_queue, request.model_dump(mode="json")],
                id=f"attack-{uuid.uuid4().hex[:6]}", task_queue=queue)
    cause = failed.value.cause
    text = f"{cause} {getattr(cause, 'cause', '')}"
    assert "Failed decoding arguments" in text or "incident_id" in text
    assert not list(Path(settings.resolved_ticket_dir()).parent.parent.glob("evil*"))
    assert not list(Path(settings.resolved_ticket_dir()).glob("*evil*"))


# -- finding 7: a quorum across hours completes --------------------------------------------------------


async def test_a_quorum_whose_approvals_arrive_three_hours_apart_completes(
    time_env: WorkflowEnvironment, settings, fleet, approvers
):
    bad = inject(fleet.url, "checkout", "bad_deploy")["version"]
    before = agent_writes(fleet)
    async with build_worker(time_env.client, settings):
        handle = await open_incident(time_env.client, settings, make_alert("DrillSlow"))
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        first = await submit(handle, approvers.approval("alice", handle.id, waiting.plan_hash))
        assert first.counted and not first.decided
        await time_env.sleep(3 * 3600)  # alice's 15-minute signature has long expired by workflow time
        second = await submit(handle, approvers.approval("bob", handle.id, waiting.plan_hash))
        assert second.counted and second.decided, second.reason
        report = await report_of(handle)
    assert report.phase == Phase.resolved, report.outcome
    assert [n.approved_by for n in report.status.needed] == [["alice", "bob"]]
    assert fleet.fleet.service_state("checkout")["version"] != bad
    assert agent_writes(fleet) == before + 1
