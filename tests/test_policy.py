"""Approval policy, pure: who counts, how many, separation of duties, expiry, plan binding."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from firebreak.config import AGENT
from firebreak.contracts import Approval, ApprovalCheck, Hypothesis
from firebreak.plan import build_plan
from firebreak.policy import evaluate
from firebreak.runbook import load_runbook
from conftest import TESTS

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)
PAIR = load_runbook(TESTS / "data" / "runbooks" / "drill-pair.yaml")
HIGH = load_runbook(TESTS / "data" / "runbooks" / "drill-high.yaml")
ONCALL = ApprovalCheck(valid=True, groups=["oncall"])


def plan_for(book):
    hyp = Hypothesis(id="bad_deploy", title="t", score=1, findings=[], actions=book.diagnose[0].actions)
    return build_plan(book, {"service": "checkout"}, hyp, incident_id="wf", run_id="r1")


def approval(name: str, plan, **changes) -> Approval:
    fields = dict(workflow_id="wf", plan_hash=plan.hash, decision="approve", nonce=f"nonce-{name}-{len(changes)}",
                  expires_at=(NOW + timedelta(minutes=5)).isoformat(), approver=name, signature="sig")
    fields.update(changes)
    return Approval(**fields)


def judge(book, items, requested_by=None):
    return evaluate(plan_for(book), book, items, workflow_id="wf", requested_by=requested_by, now=NOW)


def test_one_oncall_approval_meets_a_medium_and_low_plan():
    p = plan_for(PAIR)
    result = judge(PAIR, [(approval("alice", p), ONCALL)])
    assert result.judgements[0].counted and result.approved_steps == {"s1", "s2"} and result.complete


def test_refusals_each_with_a_reason():
    p = plan_for(PAIR)
    cases = [
        ((approval("alice", p), ApprovalCheck(valid=False, reason="bad signature")), "bad signature"),
        ((approval("alice", p, workflow_id="other"), ONCALL), "not 'wf'"),
        ((approval("alice", p, plan_hash="0" * 64), ONCALL), "plan"),
        ((approval("alice", p, expires_at=(NOW - timedelta(seconds=1)).isoformat()), ONCALL), "expired"),
        ((approval(AGENT, p), ONCALL), "agent"),
        ((approval("bob", p), ONCALL), "requested this incident"),
        ((approval("carol", p), ApprovalCheck(valid=True, groups=["sre-leads"])), "not in"),
        ((approval("alice", p, steps=["s9"]), ONCALL), "not in the plan"),
    ]
    for item, reason in cases:
        result = judge(PAIR, [item], requested_by="bob")
        assert not result.judgements[0].counted and reason in result.judgements[0].reason, reason
        assert result.approved_steps == set()


def test_replayed_nonce_and_same_person_twice():
    p = plan_for(HIGH)
    first = approval("alice", p)
    result = judge(HIGH, [(first, ONCALL), (first, ONCALL), (approval("alice", p, nonce="other-nonce"), ONCALL)])
    assert [j.counted for j in result.judgements] == [True, False, False]
    assert "nonce" in result.judgements[1].reason and "counts once" in result.judgements[2].reason
    assert result.approved_steps == set()
    two = judge(HIGH, [(first, ONCALL), (approval("bob", p), ONCALL)])
    assert two.approved_steps == {"s1"} and two.needs[0].approved_by == ["alice", "bob"]


def test_partial_approval_covers_only_its_steps_and_rejection_wins():
    p = plan_for(PAIR)
    result = judge(PAIR, [(approval("alice", p, steps=["s2"]), ONCALL)])
    assert result.approved_steps == {"s2"} and not result.complete
    rejected = judge(PAIR, [(approval("alice", p, decision="reject"), ONCALL)])
    assert rejected.rejected and rejected.rejected_by == "alice" and rejected.approved_steps == set()


def test_high_risk_defaults_to_two_people():
    from firebreak.runbook import DEFAULT_POLICY

    assert DEFAULT_POLICY["high"].approvers == 2
