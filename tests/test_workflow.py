"""IncidentWorkflow on the time-skipping server, with the real worker, broker and demo fleet.

Hours of approval windows pass in seconds; activities are the real ones.
"""

from __future__ import annotations

import json
from datetime import timedelta

from temporalio.client import WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from firebreak.contracts import AlertSignal, ApprovalOutcome, IncidentReport, Phase
from incidents import inject, make_alert, open_incident, report_of, status, submit, wait_for_phase
from worker import build_worker


def notifications(settings, incident_id: str) -> list[str]:
    path = settings.state_dir / "notifications.jsonl"
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines()]
    return [e["kind"] for e in events if e["incident_id"] == incident_id]


async def test_no_approval_escalates_then_expires_with_nothing_executed(time_env: WorkflowEnvironment, settings, fleet):
    before = inject(fleet.url, "checkout", "bad_deploy")
    async with build_worker(time_env.client, settings):
        handle = await open_incident(time_env.client, settings, make_alert("DrillRollback"))
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        assert waiting.plan is not None and [s.verb for s in waiting.plan.steps] == ["fleet.rollback"]
        assert waiting.escalates_at and waiting.expires_at
        assert waiting.expires_at - waiting.escalates_at == timedelta(hours=1, minutes=30)
        started = await time_env.get_current_time()
        report = await report_of(handle)
        elapsed = await time_env.get_current_time() - started

    assert report.phase == Phase.expired
    assert elapsed >= timedelta(hours=2)
    assert report.status.escalated
    assert notifications(settings, handle.id) == ["escalation", "expired"]
    assert report.status.steps == []
    assert fleet.fleet.service_state("checkout")["version"] == before["version"]


async def test_alert_resolved_before_approval_closes_auto_resolved(time_env: WorkflowEnvironment, settings, fleet):
    before = inject(fleet.url, "checkout", "bad_deploy")
    alert = make_alert("DrillRollback")
    async with build_worker(time_env.client, settings):
        handle = await open_incident(time_env.client, settings, alert)
        await wait_for_phase(handle, Phase.awaiting_approval)
        resolved = alert.model_copy(update={"status": "resolved"})
        await handle.signal("alert", AlertSignal(alerts=[resolved], received_at=alert.starts_at))
        report = await report_of(handle)

    assert report.phase == Phase.auto_resolved
    assert report.status.steps == []
    assert report.status.alerts_received == 2 and report.status.firing == []
    assert fleet.fleet.service_state("checkout")["version"] == before["version"]


async def test_failed_verification_rolls_the_step_back(time_env: WorkflowEnvironment, settings, fleet, approvers):
    bad = inject(fleet.url, "checkout", "bad_deploy")["version"]
    async with build_worker(time_env.client, settings):
        handle = await open_incident(time_env.client, settings, make_alert("DrillRollback"))
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        approval = approvers.approval("alice", handle.id, waiting.plan_hash)
        outcome = await submit(handle, approval)
        assert outcome.counted, outcome.reason
        report = await report_of(handle)

    assert report.phase == Phase.rolled_back, report.outcome
    [step] = report.status.steps
    assert step.status == "rolled_back" and step.verified is False
    assert step.grant is not None and step.rollback is not None and step.rollback.status == "succeeded"
    assert step.rollback.grant is not None and step.rollback.grant.grant_id != step.grant.grant_id
    # The rollback re-deployed the version the step had replaced.
    assert fleet.fleet.service_state("checkout")["version"] == bad
    kinds = [c["kind"] for c in fleet.fleet.changes("checkout")][-2:]
    assert kinds == ["rollback", "deploy"]


async def test_quorum_of_two_needs_two_people(time_env: WorkflowEnvironment, settings, fleet, approvers):
    bad = inject(fleet.url, "checkout", "bad_deploy")["version"]
    async with build_worker(time_env.client, settings):
        handle = await open_incident(time_env.client, settings, make_alert("DrillHigh"))
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        async def approve_as(name: str) -> ApprovalOutcome:
            return await submit(handle, approvers.approval(name, handle.id, waiting.plan_hash))

        first = await approve_as("alice")
        assert first.counted and first.phase == Phase.awaiting_approval
        assert not first.decided and first.waiting_for == ["s1: 1 more from oncall"]
        again = await approve_as("alice")
        assert not again.counted and "one person counts once" in again.reason
        assert (await status(handle)).phase == Phase.awaiting_approval
        second = await approve_as("bob")
        assert second.counted and second.decided
        report = await report_of(handle)

    assert report.phase == Phase.resolved, report.outcome
    assert [n.approved_by for n in report.status.needed] == [["alice", "bob"]]
    assert fleet.fleet.service_state("checkout")["version"] != bad


async def test_partial_approval_executes_only_the_approved_steps(time_env: WorkflowEnvironment, settings, fleet, approvers):
    inject(fleet.url, "checkout", "bad_deploy")
    replicas = fleet.fleet.service_state("checkout")["replicas"]
    async with build_worker(time_env.client, settings):
        handle = await open_incident(time_env.client, settings, make_alert("DrillPair"))
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        assert [s.id for s in waiting.plan.steps] == ["s1", "s2"]
        approval = approvers.approval("alice", handle.id, waiting.plan_hash, steps=["s1"])
        outcome = await submit(handle, approval)
        assert outcome.counted
        report = await report_of(handle)

    assert report.phase == Phase.resolved
    by_id = {s.step_id: s for s in report.status.steps}
    assert by_id["s1"].status == "succeeded"
    assert by_id["s2"].status == "skipped" and "alice approved only other steps" in by_id["s2"].detail
    assert fleet.fleet.changes("checkout")[-1]["kind"] == "restart"
    assert fleet.fleet.service_state("checkout")["replicas"] == replicas


async def test_bad_approvals_are_refused_recorded_and_nothing_executes(
    time_env: WorkflowEnvironment, settings, fleet, approvers
):
    before = inject(fleet.url, "checkout", "bad_deploy")
    async with build_worker(time_env.client, settings):
        handle = await open_incident(time_env.client, settings, make_alert("DrillRollback"), requested_by="bob")
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        plan_hash, wid = waiting.plan_hash, handle.id
        # Approvals carry wall-clock expiries: the broker judges each when it arrives, by its own clock.
        sign = lambda name, **kw: approvers.approval(name, kw.pop("wid", wid), kw.pop("hash", plan_hash), **kw)  # noqa: E731

        unsigned = sign("alice").model_copy(update={"signature": ""})
        forged = sign("alice", sign_as="carol")
        other_workflow = sign("alice", wid="shop.payments.error-rate")
        older_plan = sign("alice", hash="0" * 64)
        carol = sign("carol")  # sre-leads only: not in the oncall group this runbook asks for
        expired = sign("alice", expires_in=timedelta(minutes=-1))
        stranger = approvers.approval("alice", wid, plan_hash).model_copy(update={"approver": "mallory"})
        requester = sign("bob")

        attempts = [
            (unsigned, "unsigned"),
            (forged, "signature"),
            (other_workflow, "not " + repr(wid)),
            (older_plan, "plan"),
            (carol, "not in"),
            (carol, "nonce already used"),
            (expired, "expired"),
            (stranger, "mallory"),
            (requester, "requested this incident"),
        ]
        for approval, _ in attempts:
            await handle.signal("approval", approval.model_dump(mode="json"))
        await handle.signal("approval", "not an approval at all")
        # The update path gives the same verdicts at once.
        refused = await submit(handle, requester)
        assert not refused.counted
        try:
            await submit(handle, unsigned)
            raise AssertionError("an unsigned update must be refused by its validator")
        except WorkflowUpdateFailedError as exc:
            assert "not signed" in str(exc.cause)

        report = await report_of(handle)

    records = report.status.approvals
    assert len(records) == len(attempts) + 2
    for record, (_, expected) in zip(records, attempts):
        assert not record.counted
        assert expected in record.reason, (expected, record.reason)
    assert "malformed" in records[len(attempts)].reason
    assert report.phase == Phase.expired
    assert report.status.steps == []
    assert fleet.fleet.service_state("checkout")["version"] == before["version"]


async def test_rejection_closes_the_incident(time_env: WorkflowEnvironment, settings, fleet, approvers):
    before = inject(fleet.url, "checkout", "bad_deploy")
    async with build_worker(time_env.client, settings):
        handle = await open_incident(time_env.client, settings, make_alert("DrillRollback"))
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        rejection = approvers.approval("alice", handle.id, waiting.plan_hash, decision="reject")
        outcome = await submit(handle, rejection)
        assert outcome.counted
        report = await report_of(handle)
    assert report.phase == Phase.rejected and "alice" in report.outcome
    assert fleet.fleet.service_state("checkout")["version"] == before["version"]
