"""The operator's views, pure: the incident card, what an incident waits for, the inbox, --watch lines, tables."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from firebreak.contracts import (
    ApprovalRecord,
    Finding,
    Hypothesis,
    IncidentStatus,
    Phase,
    Plan,
    PlanStep,
    PolicyNeed,
    StepResult,
    Ticket,
    UndoStep,
)
from firebreak.inbox import inbox_items
from firebreak.tables import age, render_table
from firebreak.watch import changes
from workflows.summary import MAX_CARD_CHARS, plan_markdown, status_markdown, waiting_for

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def incident(**update: object) -> IncidentStatus:
    step = PlanStep(id="s1", action="rollback", target="fleet", verb="fleet.rollback", resource="service/checkout",
                    risk="medium", blast_radius="checkout (all replicas)", timeout_s=30,
                    undo=UndoStep(verb="fleet.deploy", params={"version": "{result.previous_version}"}))
    plan = Plan(incident_id="shop.checkout.error-rate", run_id="r1", runbook="bad-deploy", runbook_version=3,
                hypothesis="bad_deploy", steps=[step], requesters=["bob"])
    base = IncidentStatus(
        incident_id="shop.checkout.error-rate", phase=Phase.awaiting_approval, runbook="bad-deploy",
        runbook_version=3, service="checkout", severity="critical", requested_by="bob", opened_at=T0,
        alerts_received=1,
        hypotheses=[Hypothesis(id="bad_deploy", title="A recent deploy", score=0.92, actions=["rollback"], findings=[
            Finding(evidence="error_rate", test="above", held=True, weight=1, detail="error_rate 0.31 above 0.05"),
            Finding(evidence="changes", test="recent_change", held=True, weight=1,
                    detail="deploy v2.4.1 at 03:01:00, 3m before the alert")]),
            Hypothesis(id="saturation", title="CPU saturation", score=0.1, actions=[], findings=[])],
        plan=plan, plan_hash=plan.hash,
        needed=[PolicyNeed(step="s1", risk="medium", approvers=1, groups=["oncall"], approved_by=[])],
        approvals=[ApprovalRecord(approver="bob", decision="approve", counted=False,
                                  reason="bob requested this incident and cannot approve it",
                                  received_at=T0 + timedelta(minutes=1), via="update")],
        tickets=[Ticket(sink="file", ref="shop.checkout.error-rate.r1", run_id="r1")],
    )
    return base.model_copy(update=update)


def resolved() -> IncidentStatus:
    waiting = incident()
    return waiting.model_copy(update={
        "phase": Phase.resolved, "outcome": "remediation applied and verified", "needed": [],
        "approvals": [*waiting.approvals, ApprovalRecord(
            approver="alice", decision="approve", counted=True, reason="counted", comment="the deploy is the cause",
            received_at=T0 + timedelta(minutes=2), via="update")],
        "steps": [StepResult(step_id="s1", action="rollback", status="succeeded", detail="rolled back to v2.4.0",
                             verified=True, verification="error_rate 0.004 below 0.05")],
    })


def test_the_card_names_phase_hypotheses_plan_approvals_results_tickets_and_outcome():
    card = status_markdown(resolved())
    assert card.startswith("### RESOLVED")
    assert "**A recent deploy** 92%\n\n- ✔ error_rate 0.31 above 0.05" in card and "error_rate 0.31 above 0.05" in card and "CPU saturation" in card
    assert "`fleet.rollback` on `service/checkout`" in card and "blast radius: checkout (all replicas)" in card
    assert "undo `fleet.deploy` (version={result.previous_version})" in card
    assert "✔ **alice** approved at 03:06:05 UTC via update, counted;" in card
    assert 'comment: "the deploy is the cause"' in card
    assert "✘ **bob** approved at 03:05:05 UTC via update: **REFUSED**: bob requested this incident" in card
    assert "**s1** succeeded: rolled back to v2.4.0; verified: error_rate 0.004 below 0.05" in card
    assert "file: `shop.checkout.error-rate.r1`" in card
    assert "**Outcome:** remediation applied and verified" in card


def test_a_rejection_reads_with_its_reason_and_an_ending_that_needs_a_human_says_so():
    rejected = incident(phase=Phase.rejected, outcome="rejected by carol; nothing executed", approvals=[
        ApprovalRecord(approver="carol", decision="reject", counted=True, reason="rejection recorded",
                       comment="deploy freeze until 18:00", received_at=T0, via="signal")])
    card = status_markdown(rejected)
    assert card.startswith("### REJECTED: nothing executed")
    assert '✔ **carol** rejected at 03:04:05 UTC via signal, counted (rejection recorded); reason: "deploy freeze' in card
    for phase in (Phase.failed, Phase.expired, Phase.rollback_failed):
        assert status_markdown(incident(phase=phase)).startswith(f"### {phase.value.upper()}: needs a human")


def test_the_card_stays_bounded_with_many_refusals():
    many = [ApprovalRecord(approver=f"p{i}", decision="approve", counted=False, reason="x" * 500,
                           received_at=T0, via="signal") for i in range(500)]
    card = status_markdown(incident(approvals=many))
    assert len(card) <= MAX_CARD_CHARS and "(480 earlier not shown)" in card


def test_the_ticket_body_carries_the_full_plan_hash_and_how_to_approve():
    body = plan_markdown(incident())
    assert body.startswith("# [awaiting_approval] shop.checkout.error-rate")
    assert f"Plan hash: `{incident().plan_hash}`" in body
    assert "firebreak approve shop.checkout.error-rate --key PATH" in body
    assert "firebreak approve" not in plan_markdown(resolved())


def test_what_an_incident_waits_for():
    assert waiting_for(incident()) == "approval: s1 1 more from oncall"
    assert waiting_for(incident(held="held: credentials frozen by carol")).startswith("the broker's kill switch")
    assert waiting_for(incident(phase=Phase.verifying)) == "verification"
    assert waiting_for(incident(phase=Phase.expired)) == "a human (escalated)"
    assert waiting_for(resolved()) == "-"


def test_the_inbox_lists_what_i_can_approve_and_never_what_i_raised():
    waiting = incident()
    [item] = inbox_items([waiting], "alice", ["oncall"])
    assert item.incident_id == "shop.checkout.error-rate" and item.steps == ["s1: 1 more from oncall (you can)"]
    assert inbox_items([waiting], "bob", ["oncall"]) == []  # bob raised it
    assert inbox_items([waiting], "carol", ["sre-leads"]) == []  # not her group
    approved = waiting.model_copy(update={"needed": [
        PolicyNeed(step="s1", risk="high", approvers=2, groups=["oncall"], approved_by=["alice"])]})
    assert inbox_items([approved], "alice", ["oncall"]) == []  # one person counts once
    assert inbox_items([resolved()], "alice", ["oncall"]) == []


def test_watch_prints_each_change_once():
    first = incident(phase=Phase.investigating, plan=None, plan_hash=None, approvals=[], hypotheses=[])
    assert changes(None, first) == ["phase investigating"]
    waiting = incident()
    lines = changes(first, waiting)
    assert lines[0] == "phase awaiting_approval" and lines[1].startswith("plan ")
    assert lines[2].startswith("✘ bob approved") and "REFUSED" in lines[2]
    done = resolved()
    lines = changes(waiting, done)
    assert lines[0] == "phase RESOLVED"
    assert any(line.startswith("✔ alice approved") for line in lines)
    assert any(line.startswith("s1 succeeded") for line in lines)
    assert lines[-1] == "outcome: remediation applied and verified"
    assert changes(done, done) == []


def test_tables_and_ages():
    table = render_table(["id", "waiting for"], [["a", "approval"], ["longer-id", "-"]])
    assert table.splitlines() == ["ID          WAITING FOR", "a           approval", "longer-id   -"]
    assert [age(T0 - d, T0) for d in (timedelta(seconds=5), timedelta(minutes=12), timedelta(hours=3, minutes=5),
                                      timedelta(days=2, hours=4))] == ["5s", "12m", "3h5m", "2d4h"]
