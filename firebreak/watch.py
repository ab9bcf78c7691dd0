"""Following an incident to its end, one printed line per change (`firebreak status --watch`).

:func:`changes` is pure: what differs between two statuses, in the words of the incident card.
:func:`follow` polls a reader until the phase is terminal and returns the last status; its caller
turns that into the exit code (0 only when the incident resolved).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from firebreak.contracts import IncidentStatus, Phase
from workflows.summary import approval_line, phase_label, step_result_line

RESOLVED = frozenset({Phase.resolved, Phase.auto_resolved})


def changes(before: IncidentStatus | None, after: IncidentStatus) -> list[str]:
    """Lines for what is new in ``after``: phase, plan, approvals, held, step results, outcome."""
    out: list[str] = []
    if before is None or before.phase != after.phase:
        out.append(f"phase {phase_label(after.phase, after.needs_a_human)}")
    if after.plan_hash and (before is None or before.plan_hash != after.plan_hash):
        steps = ", ".join(f"{s.id} {s.verb} {s.resource}" for s in after.plan.steps) if after.plan else ""
        out.append(f"plan {after.plan_hash[:12]}: {steps}")
    seen = len(before.approvals) if before else 0
    out += [approval_line(a).replace("**", "") for a in after.approvals[seen:]]
    if after.held != (before.held if before else None):
        out.append(after.held or "no longer held: credentials thawed")
    done = {(s.step_id, s.status, s.verified, s.rollback.status if s.rollback else None)
            for s in (before.steps if before else [])}
    out += [step_result_line(s).removeprefix("- ").replace("**", "") for s in after.steps
            if (s.step_id, s.status, s.verified, s.rollback.status if s.rollback else None) not in done]
    if after.outcome and (before is None or before.outcome != after.outcome):
        out.append(f"outcome: {after.outcome}")
    return out


async def follow(read: Callable[[], Awaitable[IncidentStatus]], emit: Callable[[str], None],
                 interval: float = 1.0) -> IncidentStatus:
    """Print each change until the incident closes; the last status."""
    last: IncidentStatus | None = None
    while True:
        status = await read()
        for line in changes(last, status):
            emit(line)
        last = status
        if status.phase.closed:
            return status
        await asyncio.sleep(interval)
