"""Grants as Temporal history recorded them: a witness the audit log's owner cannot rewrite.

Every grant an activity holds comes back in its result as ``{"grant_id": ...,
"audit_seq": ...}``, the sequence number of its ``mint`` record in the broker's
audit log. Temporal keeps those results in workflow history, out of the broker
host's reach, so ``{audit_seq: grant_id}`` gathered here lets
:func:`firebreak.broker.audit.verify_chain` catch a log cut short or rewritten
even when its checkpoints were removed with it.

The walk is generic on purpose: grants turn up in evidence, step results and
verification results, and any new place that carries a grant is found too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from firebreak.history import decode_json

INCIDENTS = "WorkflowType = 'IncidentWorkflow'"


def grants_in(value: Any) -> Iterator[tuple[str, int | None]]:
    """(grant_id, audit_seq) for every object anywhere in ``value`` with both keys.

    ``audit_seq`` is None where the grant predates it (or is not a whole number):
    such a grant cannot be checked against the log, but is still counted.
    """
    if isinstance(value, dict):
        grant_id = value.get("grant_id")
        if isinstance(grant_id, str) and "audit_seq" in value:
            seq = value["audit_seq"]
            # bool is an int in Python; true/false is not a sequence number.
            yield grant_id, seq if isinstance(seq, int) and not isinstance(seq, bool) else None
        for inner in value.values():
            yield from grants_in(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from grants_in(inner)


@dataclass
class HistoryGrants:
    """``by_seq`` is what :func:`~firebreak.broker.audit.verify_chain` takes as ``history``."""

    by_seq: dict[int, str] = field(default_factory=dict)
    where: dict[int, str] = field(default_factory=dict)  # seq -> where in history it was first seen
    conflicts: list[str] = field(default_factory=list)  # one seq, two grants; or one grant, two seqs
    without_seq: set[str] = field(default_factory=set)
    workflows: int = 0
    _seq_of: dict[str, int] = field(default_factory=dict, repr=False)

    def add(self, value: Any, where: str) -> None:
        """Every grant in one decoded result; the same grant seen again (evidence, step, verify) is one grant."""
        for grant_id, seq in grants_in(value):
            if seq is None:
                self.without_seq.add(grant_id)
                continue
            known = self.by_seq.get(seq)
            if known is not None and known != grant_id:
                self.conflicts.append(
                    f"Temporal history names two grants for audit record {seq}: {known!r} ({self.where[seq]})"
                    f" and {grant_id!r} ({where})"
                )
                continue
            earlier = self._seq_of.get(grant_id)
            if earlier is not None and earlier != seq:
                self.conflicts.append(
                    f"Temporal history gives grant {grant_id!r} two audit records: {earlier}"
                    f" ({self.where[earlier]}) and {seq} ({where})"
                )
                continue
            if known is None:
                self.by_seq[seq], self.where[seq], self._seq_of[grant_id] = grant_id, where, seq


# One way to read history payloads: the same as `firebreak history`, where a payload the codec refuses
# (an outsider's, or an SDK marker) reads as the refusal instead of breaking the walk.
decode_payloads = decode_json


async def history_grants(client: Client, query: str = INCIDENTS) -> HistoryGrants:
    """Walk the activity results of every run ``query`` lists (closed runs too) and collect their grants."""
    found = HistoryGrants()
    async for execution in client.list_workflows(query):
        found.workflows += 1
        handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
        history = await handle.fetch_history()
        for event in history.events:
            if event.event_type != EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                continue
            payloads = list(event.activity_task_completed_event_attributes.result.payloads)
            for value in await decode_payloads(payloads, client.data_converter):
                found.add(value, f"workflow {execution.id} run {execution.run_id} event {event.event_id}")
    return found
