"""Earlier incidents of the same service and runbook, read from Temporal visibility as evidence.

The read is declared by the runbook (``kind: past_incidents``) and, like every read, asks the broker
for its credential first: the grant and the audit record say what was read. The query takes only
validated, plain values (firebreak.listing.Filters) and the runbook's window.
"""

from __future__ import annotations

from datetime import datetime

from temporalio import activity

from firebreak.contracts import Evidence, InvestigateRequest
from firebreak.listing import Filters, memo_status
from firebreak.past_incidents import PastIncident, PastIncidents
from firebreak.runbook import parse_duration
from firebreak.temporal import PHASE

MAX_PAST = 50


async def read_past(request: InvestigateRequest, evidence: Evidence, started: datetime) -> None:
    spec = request.spec
    service = request.params["service"]
    since = started - parse_duration(spec.lookback)
    query = Filters(service=service, runbook=request.runbook, open=False).query()
    # A closed run of this incident id, or any other: all but this very run.
    query += f" AND CloseTime > '{since.isoformat().replace('+00:00', 'Z')}'"
    evidence.query = f"visibility: {query}"
    current = activity.info().workflow_run_id
    past = PastIncidents(service=service, runbook=request.runbook, window=spec.lookback)
    async for wf in activity.client().list_workflows(query, limit=MAX_PAST):
        if wf.run_id == current:
            continue
        status = await memo_status(wf)
        phase = (status.phase.value if status else None) or wf.typed_search_attributes.get(PHASE) or "unknown"
        plan = status.plan if status else None
        past.incidents.append(PastIncident(
            incident_id=wf.id, run_id=wf.run_id, phase=str(phase), hypothesis=plan.hypothesis if plan else "",
            subject=(plan.params or {}).get("dependency", "") if plan else "", closed_at=wf.close_time))
    evidence.past = past

