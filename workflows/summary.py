"""Short markdown views of an incident, for the Temporal UI and for tickets. Pure."""

from __future__ import annotations

from firebreak.contracts import IncidentStatus


def status_markdown(status: IncidentStatus) -> str:
    lines = [f"**{status.phase.value}** · {status.runbook} v{status.runbook_version} · {status.service or status.incident_id}"]
    if status.hypotheses:
        top = status.hypotheses[0]
        lines.append(f"Top hypothesis: {top.title} ({top.score:.0%})")
    if status.plan:
        steps = ", ".join(f"{s.id} {s.verb} {s.resource}" for s in status.plan.steps)
        lines.append(f"Plan `{status.plan_hash[:12] if status.plan_hash else ''}`: {steps}")
    for need in status.needed:
        if not need.met:
            lines.append(f"Needs {need.approvers - len(need.approved_by)} more approver(s) for {need.step} from {', '.join(need.groups)}")
    refused = [a for a in status.approvals if not a.counted]
    if refused:
        last = refused[-1]
        lines.append(f"Refused approval from {last.approver}: {last.reason}")
    if status.escalates_at and status.phase.value == "awaiting_approval":
        lines.append(f"{'Escalated' if status.escalated else 'Escalates'} at {status.escalates_at:%H:%M:%S} UTC; expires at {status.expires_at:%H:%M:%S} UTC" if status.expires_at else "")
    if status.outcome:
        lines.append(f"Outcome: {status.outcome}")
    return "\n\n".join(line for line in lines if line)


def plan_markdown(status: IncidentStatus) -> str:
    """The ticket body: evidence, hypotheses, plan with blast radius and rollback, how to approve."""
    out = [f"# {status.incident_id}: {status.phase.value}", "", status_markdown(status), "", "## Hypotheses"]
    for hyp in status.hypotheses:
        out.append(f"- **{hyp.title}** ({hyp.score:.0%})")
        out.extend(f"  - {'✔' if f.held else '✘'} {f.detail}" for f in hyp.findings)
    if status.gaps:
        out += ["", "## Investigation gaps"] + [f"- {gap}" for gap in status.gaps]
    links = [e.link for e in status.evidence if e.link]
    if links:
        out += ["", "## Evidence"] + [f"- {link}" for link in links]
    if status.plan:
        out += ["", f"## Plan `{status.plan_hash}`"]
        for step in status.plan.steps:
            undo = f"undo: {step.undo.verb}" if step.undo else "no undo declared"
            out.append(f"- {step.id} `{step.verb}` on `{step.resource}` (risk {step.risk}): {step.description}")
            out.append(f"  - blast radius: {step.blast_radius}; {undo}")
        if not status.phase.closed:
            out += ["", "## Approve", f"`firebreak approve {status.incident_id} --key PATH`"]
    if status.approvals:
        out += ["", "## Approvals"]
        out += [f"- {a.approver} {a.decision}: {'counted' if a.counted else 'refused'} ({a.reason})" for a in status.approvals]
    if status.steps:
        out += ["", "## Results"]
        for step in status.steps:
            line = f"- {step.step_id} {step.status}: {step.detail}"
            if step.verification:
                line += f"; verification: {step.verification}"
            if step.rollback:
                line += f"; rollback {step.rollback.status}: {step.rollback.detail}"
            out.append(line)
    return "\n".join(out)
