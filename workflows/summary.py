"""Markdown views of an incident: the incident card (the UI's current details) and the ticket body. Pure.

The card is what an on-call engineer reads first, in the Temporal UI and in `firebreak status`: the phase,
the top hypotheses with their evidence, the plan with each step's blast radius and undo, every approval
and refusal (who, when, comment or reason, counted or not), each step's result and verification, the
tickets and the outcome. It is bounded, because it is rebuilt on every change and an incident can
collect many refused approvals.

Every value interpolated here (alert labels, the systems an incident read, approvers' comments) is
untrusted: it goes in through ``markdown_text`` (inert text) or ``markdown_code`` (a code span), so it
renders as the same characters and never as HTML or a live link.
"""

from __future__ import annotations

from firebreak.contracts import NEEDS_A_HUMAN, ApprovalRecord, IncidentStatus, Phase, PlanStep, StepResult
from firebreak.correlation import correlation_lines
from firebreak.escaping import markdown_code as _c
from firebreak.escaping import markdown_text as _t

MAX_HYPOTHESES = 3
MAX_FINDINGS = 5
MAX_APPROVALS = 20
MAX_CARD_CHARS = 16_000
_TIME = "%H:%M:%S UTC"


def phase_label(phase: Phase, needs_a_human: bool = False) -> str:
    """The phase as the first words an operator reads: the endings that need a human say so."""
    if phase in NEEDS_A_HUMAN or needs_a_human:
        return f"{phase.value.upper()}: needs a human"
    if phase == Phase.rejected:
        return "REJECTED: nothing executed"
    if phase in (Phase.resolved, Phase.auto_resolved):
        return phase.value.upper()
    return phase.value


def approval_line(record: ApprovalRecord) -> str:
    """One approval or rejection, with who, when, how it came, what they said and whether it counted."""
    verb = "rejected" if record.decision == "reject" else "approved" if record.decision == "approve" else record.decision
    steps = f" steps {_t(', '.join(record.steps))}" if record.steps else ""
    when = f"at {record.received_at:{_TIME}} via {_t(record.via)}"
    said = ""
    if record.comment:
        said = f'; {"reason" if record.decision == "reject" else "comment"}: "{_t(_one_line(record.comment, 300))}"'
    if record.counted:
        why = f" ({_t(record.reason)})" if record.reason and record.reason != "counted" else ""
        return f"✔ **{_t(record.approver)}** {_t(verb)}{steps} {when}, counted{why}{said}"
    return f"✘ **{_t(record.approver)}** {_t(verb)}{steps} {when}: **REFUSED**: {_t(record.reason)}{said}"


def status_markdown(status: IncidentStatus) -> str:
    """The incident card."""
    out = [f"### {phase_label(status.phase, status.needs_a_human)}",
           f"{_t(status.runbook)} v{status.runbook_version} on **{_t(status.service or status.incident_id)}**"
           + (f" · severity {_t(status.severity)}" if status.severity else "")
           + (f" · raised by {_t(status.requested_by)}" if status.requested_by else "")]
    if status.outcome:
        out.append(f"**Outcome:** {_t(status.outcome)}")
    if status.held:
        out.append(f"**Held:** {_t(status.held)}")
    if status.phase == Phase.awaiting_approval and status.escalates_at and status.expires_at:
        out.append(f"{'Escalated' if status.escalated else 'Escalates'} at {status.escalates_at:{_TIME}}; "
                   f"expires at {status.expires_at:{_TIME}}")
    out += _hypotheses(status)
    out += _correlation(status)
    out += _plan(status)
    out += _approvals(status)
    out += _results(status.steps)
    if status.tickets:
        out += ["#### Tickets"] + [f"- {_t(t.sink)}: {_c(t.ref)}" for t in status.tickets]
    notes = ([f"- gap: {_t(g)}" for g in status.gaps[:5]] + [f"- not sent: {_t(g)}" for g in status.sink_gaps[:5]]
             + [f"- re-proposed: {_t(r)}" for r in status.reproposals]
             + [f"- {_t(r)}" for r in status.refused_signals[-5:]])
    if notes:
        out += ["#### Notes"] + notes
    card = _blocks(out)
    return card if len(card) <= MAX_CARD_CHARS else card[: MAX_CARD_CHARS - 40] + "\n\n… (cut; see `firebreak status`)"


def _hypotheses(status: IncidentStatus) -> list[str]:
    if not status.hypotheses:
        return []
    out = ["#### Hypotheses"]
    for hyp in status.hypotheses[:MAX_HYPOTHESES]:
        # Each hypothesis a line of its own, then its findings (held or not) as a list under it. Not a
        # nested markdown list: the Temporal UI's stylesheet lays a nested list out inline, running the
        # findings into one line after the hypothesis.
        out.append(f"**{_t(hyp.title)}** {hyp.score:.0%}")
        out += [f"- {'✔' if f.held else '✘'} {_t(_one_line(f.detail, 240))}" for f in hyp.findings[:MAX_FINDINGS]]
    return out


def _correlation(status: IncidentStatus) -> list[str]:
    """The failing dependency, its owner, the blast radius, catalog refusals and past incidents."""
    top = status.hypotheses[0] if status.hypotheses else None
    lines = correlation_lines(top, status.service, status.evidence, status.plan)
    lines += [f"past incidents: {ev.past.summary()}" for ev in status.evidence if ev.past is not None]
    return ["#### Correlation"] + [f"- {_t(_one_line(line, 400))}" for line in lines] if lines else []


def _step_line(step: PlanStep) -> str:
    params = _t(", ".join(f"{k}={v}" for k, v in step.params.items()))
    if step.undo is None:
        undo = "no undo declared"
    else:
        undo_params = _t(", ".join(f"{k}={v}" for k, v in step.undo.params.items()))
        undo = f"undo {_c(step.undo.verb)}" + (f" ({undo_params})" if undo_params else "")
    return (f"- **{_t(step.id)}** {_c(step.verb)} on {_c(step.resource)}" + (f" ({params})" if params else "")
            + f" · risk {_t(step.risk)} · blast radius: {_t(step.blast_radius)} · {undo}")


def _plan(status: IncidentStatus) -> list[str]:
    if status.plan is None:
        return []
    out = [f"#### Plan `{(status.plan_hash or '')[:12]}`"] + [_step_line(s) for s in status.plan.steps]
    waiting = [f"{_t(n.step)}: {n.approvers - len(n.approved_by)} more approver(s) from {_t(', '.join(n.groups))}"
               for n in status.needed if not n.met]
    if waiting and not status.phase.closed:
        out.append("Needs " + "; ".join(waiting))
    return out


def _approvals(status: IncidentStatus) -> list[str]:
    if not status.approvals:
        return []
    shown = status.approvals[-MAX_APPROVALS:]
    earlier = len(status.approvals) - len(shown)
    return (["#### Approvals"] + ([f"- ({earlier} earlier not shown)"] if earlier else [])
            + [f"- {approval_line(a)}" for a in shown])


def step_result_line(step: StepResult) -> str:
    line = f"- **{_t(step.step_id)}** {_t(step.status)}: {_t(_one_line(step.detail, 300))}"
    if step.verification:
        verdict = {True: "verified", False: "did not hold", None: "not verified"}[step.verified]
        line += f"; {verdict}: {_t(_one_line(step.verification, 300))}"
    if step.rollback:
        line += f"; rollback {_t(step.rollback.status)}: {_t(_one_line(step.rollback.detail, 300))}"
    return line


def _results(steps: list[StepResult]) -> list[str]:
    return ["#### Results"] + [step_result_line(s) for s in steps] if steps else []


def _blocks(lines: list[str]) -> str:
    """Markdown blocks, a blank line apart, except between list items: a list stays tight (a loose list
    puts each item in a paragraph, which the Temporal UI shows as a bullet on a line of its own)."""
    shown = [line for line in lines if line]
    return "".join(line if i == 0 else ("\n" if line.startswith("- ") and shown[i - 1].startswith("- ") else "\n\n")
                   + line for i, line in enumerate(shown))


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def plan_markdown(status: IncidentStatus) -> str:
    """The ticket body and `firebreak status`: the card, the evidence links and how to approve."""
    title = f"# [{status.phase.value}] {_t(status.incident_id)}"
    out = [title, "", status_markdown(status)]
    if status.plan_hash:
        out += ["", f"Plan hash: `{status.plan_hash}`"]
    links = [e.link for e in status.evidence if e.link]
    if links:
        out += ["", "#### Evidence"] + [f"- {_t(link)}" for link in links]
    if status.plan and not status.phase.closed:
        out += ["", "#### Approve", f"`firebreak approve {status.incident_id} --key PATH`"]
    return "\n".join(out)


_WORKING = {
    Phase.investigating: "evidence (investigating)",
    Phase.diagnosing: "the diagnosis",
    Phase.proposing: "a plan",
    Phase.executing: "the steps to run",
    Phase.verifying: "verification",
}


def waiting_for(status: IncidentStatus) -> str:
    """What the incident waits for, in a few words: the last column of `firebreak list`."""
    if status.phase in NEEDS_A_HUMAN or status.needs_a_human:
        return "a human (escalated)"
    if status.phase.closed:
        return "-"
    if status.held:
        return f"the broker's kill switch to thaw ({_one_line(status.held, 80)})"
    if status.phase == Phase.awaiting_approval:
        needs = [f"{n.step} {n.approvers - len(n.approved_by)} more from {'/'.join(n.groups)}"
                 for n in status.needed if not n.met]
        return "approval: " + "; ".join(needs) if needs else "approval"
    return _WORKING.get(status.phase, status.phase.value)
