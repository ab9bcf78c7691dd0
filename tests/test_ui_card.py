"""What the Temporal UI shows of an incident, pure: the card's markdown lays findings out under their
hypothesis, commands copy as the ASCII they are, and a Failed ending carries no stack trace."""

from __future__ import annotations

import re

from temporalio.api.failure.v1 import Failure
from temporalio.converter import DataConverter
from test_console_views import incident, resolved

from firebreak.contracts import (
    NEEDS_A_HUMAN_FAILURE,
    Finding,
    Hypothesis,
    IncidentInput,
    IncidentStatus,
)
from firebreak.escaping import markdown_text
from workflows.incident import _Ending
from workflows.summary import plan_markdown, status_markdown


def test_each_finding_is_a_tight_list_item_under_its_hypothesis() -> None:
    card = status_markdown(resolved())
    lines = card.splitlines()
    top = lines.index("**A recent deploy** 92%")
    # The hypothesis is a paragraph of its own; its findings follow as one tight list (no blank line
    # between items: a loose list puts each in a paragraph, shown as a bullet alone on its line).
    assert lines[top + 1] == ""
    assert lines[top + 2:top + 4] == ["- ✔ error_rate 0.31 above 0.05",
                                      "- ✔ deploy v2.4.1 at 03:01:00, 3m before the alert"]
    assert lines[top + 4] == "" and lines[top + 5] == "**CPU saturation** 10%"
    # No nested list anywhere (the UI's stylesheet lays a nested list inline, into one run of text).
    assert not [line for line in lines if re.match(r"\s+[-*] ", line)], card
    # Every list in the card is tight.
    assert not re.search(r"^- .*\n\n- ", card, re.MULTILINE), card


def test_a_refuted_finding_is_shown_under_its_hypothesis_too() -> None:
    hyp = Hypothesis(id="saturation", title="CPU saturation", score=0.1, actions=[], findings=[
        Finding(evidence="cpu", test="above", held=False, weight=1, detail="cpu 0.2 not above 0.9")])
    card = status_markdown(incident(hypotheses=[hyp]))
    assert "**CPU saturation** 10%\n\n- ✘ cpu 0.2 not above 0.9" in card


def _commands_outside_code(markdown: str) -> list[str]:
    without_code = re.sub(r"(`+)(.+?)\1", "", markdown)
    return re.findall(r"firebreak [^\n]*", without_code)


def test_commands_are_ascii_code_spans_and_text_never_renders_a_double_dash_as_a_dash() -> None:
    waiting = incident()
    for shown in (status_markdown(waiting), plan_markdown(waiting), plan_markdown(resolved())):
        spans = [span for _, span in re.findall(r"(`+)(.+?)\1", shown) if span.strip().startswith("firebreak")]
        assert all(span.isascii() for span in spans), spans
        assert not _commands_outside_code(shown), shown
    assert "`firebreak approve shop.checkout.error-rate --key PATH`" in plan_markdown(waiting)
    # Text from an alert (a sample's description is a command): "--" is escaped, so the UI's typographer
    # cannot turn it into an en dash; CommonMark renders the escape as the same "-".
    escaped = markdown_text("firebreak alert --sample stuck")
    assert not re.search(r"(?<!\\)--", escaped) and escaped.replace("\\-", "-") == "firebreak alert --sample stuck"


def test_the_details_of_a_sample_alert_show_its_commands_as_ascii() -> None:
    from pathlib import Path

    from firebreak.contracts import Alert
    from firebreak.intake import route_alerts, run_details
    from firebreak.runbook import load_runbooks

    runbooks = load_runbooks(Path(__file__).resolve().parent.parent / "runbooks")
    # The alert `firebreak alert --sample stuck` sends: its description is the command that sent it.
    alert = Alert(fingerprint="sample-stuck-payments", source="cli", annotations={
        "summary": "payments stopped serving", "description": "firebreak alert --sample stuck"},
        labels={"alertname": "ServiceStuck", "namespace": "shop", "service": "payments", "severity": "critical"})
    [routed] = route_alerts(runbooks, [alert]).routed
    details = run_details(routed, IncidentInput(incident_id=routed.incident_id, runbook=routed.runbook,
                                                params=routed.params))
    assert not re.search(r"(?<!\\)--", re.sub(r"(`+)(.+?)\1", "", details)), details  # no en dash in what the UI renders
    assert "firebreak alert \\-\\-sample stuck" not in details  # one escape is enough: "\--"
    assert "firebreak alert \\--sample stuck" in details
    assert f"`firebreak status {routed.incident_id} --watch`" in details


def test_a_failed_ending_is_sent_with_its_reason_and_no_stack_trace() -> None:
    def close() -> None:
        raise _Ending("failed: escalated to a human: no hypothesis is supported well enough", {"phase": "failed"},
                      type=NEEDS_A_HUMAN_FAILURE, non_retryable=True)

    try:
        close()
    except _Ending as raised:
        error = raised
    failure = Failure()
    converter = DataConverter.default
    converter.failure_converter.to_failure(error, converter.payload_converter, failure)
    assert failure.message.startswith("failed: escalated to a human")
    assert failure.stack_trace == ""
    assert failure.application_failure_info.type == NEEDS_A_HUMAN_FAILURE
    assert failure.application_failure_info.non_retryable
    assert failure.application_failure_info.HasField("details")  # the report still rides along
    # Any other error keeps its stack trace: only the chosen ending drops it.
    try:
        raise ValueError("a bug")
    except ValueError as bug:
        other = Failure()
        converter.failure_converter.to_failure(bug, converter.payload_converter, other)
    assert other.stack_trace


def _memo_bytes(memo: dict) -> int:
    [payload] = DataConverter.default.payload_converter.to_payloads([memo])
    return payload.ByteSize()


def test_the_memo_stays_under_temporals_2kb_warning_and_says_what_it_left_out() -> None:
    from datetime import timedelta

    from test_console_views import T0

    from firebreak.contracts import ApprovalRecord, StepResult
    from firebreak.incidents import memo_status
    from workflows.incident import bounded_memo

    small = incident(approvals=[], hypotheses=[])
    assert bounded_memo(small) == memo_status(small)  # nothing to shed: the memo is the status

    big = resolved()
    big = big.model_copy(update={
        "approvals": [ApprovalRecord(approver=f"mallory{i}", decision="approve", counted=False, via="update",
                                     reason="mallory is not in group oncall", received_at=T0 + timedelta(seconds=i))
                      for i in range(30)],
        "steps": [StepResult(step_id="s1", action="rollback", status="succeeded", detail="rolled back " * 30,
                             verified=True, verification="error_rate 0.004 below 0.05 " * 10)],
        "gaps": ["prometheus: query timed out " * 5]})
    assert _memo_bytes(memo_status(big)) > 2048  # what the memo held before: over the warning
    memo = bounded_memo(big)
    assert _memo_bytes(memo) < 2048
    kept = IncidentStatus.model_validate(memo)
    # What an approver and the inbox read without a worker is all there.
    assert kept.plan == big.plan and kept.plan_hash == big.plan_hash and kept.needed == big.needed
    assert (kept.phase, kept.outcome, kept.tickets) == (big.phase, big.outcome, big.tickets)
    # And it says what it left out, where the full detail is.
    [note] = [gap for gap in kept.gaps if gap.startswith("the memo leaves out")]
    assert "findings" in note and "approvals" in note and "the ticket" in note
    assert not kept.approvals and all(not h.findings for h in kept.hypotheses)


def test_a_plan_over_the_budget_stays_whole_while_it_waits_and_is_left_to_the_ticket_once_closed() -> None:
    from workflows.incident import bounded_memo

    waiting = incident()
    assert waiting.plan is not None
    steps = [waiting.plan.steps[0].model_copy(update={"id": f"s{i}", "blast_radius": "checkout, orders, " * 8})
             for i in range(1, 9)]
    plan = waiting.plan.model_copy(update={"steps": steps})
    waiting = waiting.model_copy(update={"plan": plan, "plan_hash": plan.hash})
    # An approver without a worker is shown this plan and signs its hash: it must be whole.
    kept = IncidentStatus.model_validate(bounded_memo(waiting))
    assert kept.plan == plan and kept.plan is not None and kept.plan.hash == kept.plan_hash
    # Closed, nobody signs it any more: the ticket keeps it, the memo says so and stays under the warning.
    closed = resolved().model_copy(update={"plan": plan, "plan_hash": plan.hash})
    memo = bounded_memo(closed)
    assert _memo_bytes(memo) < 2048
    shown = IncidentStatus.model_validate(memo)
    assert shown.plan is None and shown.plan_hash == plan.hash and shown.phase == closed.phase
    assert any("the plan" in gap and "the ticket" in gap for gap in shown.gaps), shown.gaps
