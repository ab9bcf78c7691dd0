"""Helpers for tests that open incidents and watch them: no fixtures, plain functions."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx
from temporalio.client import Client, WorkflowHandle

from firebreak import signing
from firebreak.config import Settings
from firebreak.contracts import Alert, Approval, ApprovalOutcome, IncidentReport, IncidentStatus, Phase
from firebreak.incidents import approval_outcome, final_report
from firebreak.intake import deliver_routed, route_alerts
from firebreak.receipts import ReceiptSigner, ensure_intake_key, intake_signer, person_signer
from firebreak.runbook import load_runbooks


def inject(fleet_url: str, service: str, kind: str, token: str = "test-chaos") -> dict:
    response = httpx.post(f"{fleet_url}/demo/faults", json={"service": service, "kind": kind},
                          headers={"Authorization": f"Bearer {token}"}, timeout=10)
    response.raise_for_status()
    return response.json()


def make_alert(alertname: str, service: str = "checkout", *, status: str = "firing", fingerprint: str | None = None) -> Alert:
    return Alert(
        source="test", fingerprint=fingerprint or uuid.uuid4().hex[:16], status=status,  # type: ignore[arg-type]
        labels={"alertname": alertname, "namespace": "shop", "service": service, "severity": "critical"},
        starts_at=datetime.now(timezone.utc),
    )


async def open_incident(client: Client, settings: Settings, alert: Alert, *, requested_by: str | None = None,
                        unique: bool = True) -> WorkflowHandle:
    routing = route_alerts(load_runbooks(Path(settings.resolved_runbooks_dir())), [alert])
    assert routing.routed, f"alert not routed: {routing.unrouted or routing.refused}"
    routed = routing.routed[0]
    if unique:  # tests share servers: keep their incidents apart
        routed.incident_id = f"{routed.incident_id}-{uuid.uuid4().hex[:6]}"
    # The handle from start_workflow: on the time-skipping server only it skips time while awaiting a result.
    delivered = await deliver_routed(client, routed, task_queue=settings.temporal.task_queue, requested_by=requested_by,
                                     receipt=receipt_signer(settings.state_dir, requested_by))
    assert delivered.handle is not None
    return delivered.handle


def receipt_signer(state_dir: Path, requested_by: str | None) -> ReceiptSigner:
    """As the real senders sign: the person raising it with their own key, else the intake's key."""
    if requested_by:
        return person_signer(requested_by, signing.load_private_key(state_dir / "keys" / f"{requested_by}.pem"))
    return intake_signer(ensure_intake_key(state_dir))


async def status(handle: WorkflowHandle) -> IncidentStatus:
    return await handle.query("status", result_type=IncidentStatus)


async def wait_for_phase(handle: WorkflowHandle, phase: Phase, timeout: float = 30.0) -> IncidentStatus:
    deadline = time.monotonic() + timeout
    last: IncidentStatus | None = None
    while time.monotonic() < deadline:
        try:
            last = await status(handle)
            if last.phase == phase:
                return last
            if last.phase.closed:
                break
        except Exception:  # noqa: BLE001 - the workflow may not have run its first task yet
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"{handle.id} did not reach {phase.value}; last phase {last.phase.value if last else None}: "
                         f"{last.outcome if last else ''}")


async def report_of(handle: WorkflowHandle) -> IncidentReport:
    """The incident's report: its result, or, for an ending that needs a human, its Failed run's details.

    Through ``handle.result()``, so that on the time-skipping server time still skips while waiting.
    With ``FIREBREAK_RECORD_HISTORIES=DIR`` it also saves the run's history there, named by its ending:
    candidates for tests/histories/ (see tests/test_replay.py for how one is added).
    """
    report = await final_report(handle)
    if directory := os.environ.get("FIREBREAK_RECORD_HISTORIES"):
        history = await handle.fetch_history()
        path = Path(directory) / f"{report.phase.value}-{handle.id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(history.to_json())
    return report


async def submit(handle: WorkflowHandle, approval: Approval) -> ApprovalOutcome:
    """The ``submit_approval`` update's outcome, also when refused (a refusal fails the update)."""
    return await approval_outcome(handle, approval)


async def wait_until(handle: WorkflowHandle, predicate, timeout: float = 30.0) -> IncidentStatus:  # noqa: ANN001
    """Poll the status query until ``predicate(status)``: for what lands off the critical path (tickets)."""
    deadline = time.monotonic() + timeout
    last: IncidentStatus | None = None
    while time.monotonic() < deadline:
        last = await status(handle)
        if predicate(last):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{handle.id}: condition not met in {timeout}s; last phase {last.phase if last else None}")
