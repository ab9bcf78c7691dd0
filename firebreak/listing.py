"""Listing incidents from Temporal visibility: `firebreak list`, `firebreak inbox` and `GET /v1/incidents`.

Everything here comes from visibility (search attributes and memo), so a list needs no worker: the
phase is the ``FirebreakPhase`` search attribute, what an incident waits for is a few words the
workflow keeps in its memo, and a run that ended needing a human is a Failed run.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus

from firebreak.incidents import MEMO_KEY, WAITING_KEY
from firebreak.temporal import PHASE, RUNBOOK, SERVICE, SEVERITY

if TYPE_CHECKING:  # the contracts (pydantic models) are imported where a memo is read, not by every `list`
    from firebreak.contracts import IncidentStatus, Phase

PLAIN = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")  # filter values: never quoted into a query otherwise


@dataclass(frozen=True)
class Filters:
    phase: Phase | None = None
    service: str | None = None
    runbook: str | None = None
    open: bool | None = None  # True: running only; False: closed only; None: both

    def query(self) -> str:
        """The visibility query. Values must be plain (checked here), so quoting cannot change it."""
        for name, value in (("service", self.service), ("runbook", self.runbook)):
            if value is not None and not PLAIN.fullmatch(value):
                raise ValueError(f"--{name} must match {PLAIN.pattern}")
        clauses = ["WorkflowType = 'IncidentWorkflow'"]  # by name, as intake starts it
        if self.phase is not None:
            clauses.append(f"{PHASE.name} = '{self.phase.value}'")
        if self.service is not None:
            clauses.append(f"{SERVICE.name} = '{self.service}'")
        if self.runbook is not None:
            clauses.append(f"{RUNBOOK.name} = '{self.runbook}'")
        if self.open is not None:
            clauses.append("ExecutionStatus = 'Running'" if self.open else "ExecutionStatus != 'Running'")
        return " AND ".join(clauses)


@dataclass(frozen=True)
class IncidentRow:
    incident_id: str
    run_id: str
    execution_status: str  # Temporal's: RUNNING, COMPLETED, FAILED (needs a human), TERMINATED...
    phase: str | None
    service: str | None
    runbook: str | None
    severity: str | None
    started_at: datetime | None
    closed_at: datetime | None
    waiting_for: str

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["started_at"] = self.started_at.isoformat() if self.started_at else None
        out["closed_at"] = self.closed_at.isoformat() if self.closed_at else None
        return out


async def list_incidents(client: Client, filters: Filters, limit: int = 100) -> list[IncidentRow]:
    """Newest first, as visibility returns them."""
    return [await _row(wf) async for wf in client.list_workflows(filters.query(), limit=limit)]


async def memo_status(wf: WorkflowExecution) -> IncidentStatus | None:
    """The status the workflow left in its memo (at its proposal, each approval and its end), if any."""
    from firebreak.contracts import IncidentStatus

    try:
        memo = await wf.memo_value(MEMO_KEY, None)
        return IncidentStatus.model_validate(memo) if memo is not None else None
    except Exception:  # noqa: BLE001 - a memo this version cannot read is no memo; the list still shows the row
        return None


async def _row(wf: WorkflowExecution) -> IncidentRow:
    attrs = wf.typed_search_attributes
    status = wf.status.name if isinstance(wf.status, WorkflowExecutionStatus) else "UNKNOWN"
    phase = attrs.get(PHASE)
    return IncidentRow(
        incident_id=wf.id, run_id=wf.run_id, execution_status=status, phase=phase,
        service=attrs.get(SERVICE), runbook=attrs.get(RUNBOOK), severity=attrs.get(SEVERITY),
        started_at=wf.start_time, closed_at=wf.close_time, waiting_for=await _waiting(wf, status, phase),
    )


async def _waiting(wf: WorkflowExecution, status: str, phase: str | None) -> str:
    if status not in ("RUNNING", "COMPLETED", "FAILED"):
        return "-"  # terminated, timed out, continued as new: nothing waits on this run
    try:
        waiting = await wf.memo_value(WAITING_KEY, None)
    except Exception:  # noqa: BLE001 - see memo_status
        waiting = None
    if isinstance(waiting, str):
        return waiting
    # An incident started before the workflow kept this in its memo: say what its phase implies.
    from firebreak.contracts import IncidentStatus, Phase
    from workflows.summary import waiting_for

    known = await memo_status(wf)
    if known is not None and phase is not None and known.phase.value == phase:
        return waiting_for(known)
    if phase is None:
        return "-"
    try:
        return waiting_for(IncidentStatus(incident_id=wf.id, phase=Phase(phase), runbook="", runbook_version=0,
                                          opened_at=wf.start_time, alerts_received=0))
    except ValueError:
        return "-"
