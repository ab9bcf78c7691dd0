"""What waits for me: the incidents awaiting an approval that this person could give. Pure.

The same rules the policy applies when the approval arrives (firebreak/policy.py): whoever raised an
incident may not approve it, a step needs approvers from its groups, and one person counts once. So
the inbox never lists an incident whose approval would be refused for who the approver is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from firebreak.contracts import IncidentStatus, Phase


@dataclass(frozen=True)
class InboxItem:
    incident_id: str
    runbook: str
    service: str
    plan_hash: str
    escalated: bool
    steps: list[str] = field(default_factory=list)  # what each step still needs, and whether I can give it


def inbox_items(statuses: list[IncidentStatus], name: str, groups: list[str]) -> list[InboxItem]:
    items: list[InboxItem] = []
    for status in statuses:
        if status.phase != Phase.awaiting_approval or status.plan is None or status.held:
            continue
        raised_by = set(status.plan.requesters or []) | ({status.requested_by} if status.requested_by else set())
        if name in raised_by:
            continue  # separation of duties: it would be refused
        steps: list[str] = []
        mine = False
        for need in status.needed:
            if need.met:
                continue
            can = name not in need.approved_by and bool(set(groups) & set(need.groups))
            mine = mine or can
            more = need.approvers - len(need.approved_by)
            steps.append(f"{need.step}: {more} more from {'/'.join(need.groups)}"
                         + (" (you can)" if can else " (not your group)" if name not in need.approved_by
                            else " (you approved)"))
        if mine:
            items.append(InboxItem(status.incident_id, status.runbook, status.service, status.plan_hash or "",
                                   status.escalated, steps))
    return items
