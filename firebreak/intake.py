"""From alerts to incidents: route each alert to a runbook and join its workflow.

Every intake path (the CLI, the HTTP API) goes through here, so routing,
grouping and label validation happen once, before any workflow starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from datetime import datetime, timezone

from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from firebreak.contracts import Alert, AlertSignal, IncidentInput, IncidentReport
from firebreak.escaping import markdown_code, markdown_text
from firebreak.receipts import ReceiptSigner
from firebreak.runbook import LabelError, Runbook, route


@dataclass
class Routed:
    """Alerts of one delivery that share one incident."""

    runbook: Runbook
    incident_id: str
    params: dict[str, str]
    alerts: list[Alert] = field(default_factory=list)


@dataclass(frozen=True)
class Unrouted:
    alert: Alert
    reason: str


@dataclass(frozen=True)
class Refused:
    """An alert whose labels a runbook refused: never substituted anywhere."""

    alert: Alert
    runbook: str
    field: str
    reason: str


@dataclass
class Routing:
    routed: list[Routed] = field(default_factory=list)
    unrouted: list[Unrouted] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)


def route_alerts(runbooks: list[Runbook], alerts: Iterable[Alert]) -> Routing:
    result = Routing()
    groups: dict[str, Routed] = {}
    for alert in alerts:
        runbook = route(runbooks, alert.labels)
        if runbook is None:
            result.unrouted.append(Unrouted(alert, f"no runbook matches alertname {alert.name!r}"))
            continue
        try:
            params = runbook.extract_params(alert.labels)
            incident_id = runbook.incident_key(params)
        except LabelError as exc:
            result.refused.append(Refused(alert, runbook.name, f"labels.{exc.label}", str(exc)))
            continue
        except ValueError as exc:
            result.refused.append(Refused(alert, runbook.name, "labels", str(exc)))
            continue
        group = groups.setdefault(incident_id, Routed(runbook, incident_id, params))
        group.alerts.append(alert)
    result.routed = list(groups.values())
    return result


WORKFLOW = "IncidentWorkflow"  # by name: an intake process need not import workflow code
ALERT_SIGNAL = "alert"


@dataclass(frozen=True)
class Delivered:
    """What delivering one :class:`Routed` group did."""

    incident_id: str
    run_id: str
    alerts: int
    previous_run_id: str | None = None  # set when a closed incident fired again and a new, linked run opened
    skipped: str | None = None  # why nothing was sent (only resolved alerts and no open incident)
    handle: WorkflowHandle[Any, IncidentReport] | None = None


async def deliver_routed(
    client: Client,
    routed: Routed,
    *,
    task_queue: str,
    requested_by: str | None = None,
    receipt: ReceiptSigner | None = None,
    delivery_id: str | None = None,
    received_at: datetime | None = None,
) -> Delivered:
    """Join the running incident or open it (signal-with-start), in one signal for the whole group.

    - Only resolved alerts: signal the open run, if any. A resolved alert never
      opens an incident, nor reopens a closed one.
    - The incident's last run has closed: start a new run whose input names the
      closed run (``previous_run_id``). The first attempt refuses to reuse a
      closed id, which tells us the closed run's id in the same round trip; the
      common case (running or new) stays one call.

    ``receipt`` signs who raised these alerts (the intake's key, or the person's own):
    without one, no write of this incident can ever be authorized by the broker.
    """
    signed = receipt(routed.incident_id) if receipt is not None else None
    signal = AlertSignal(
        alerts=routed.alerts, received_at=received_at or datetime.now(timezone.utc), delivery_id=delivery_id,
        requested_by=requested_by, receipt=signed,
    )
    count = len(routed.alerts)
    if all(alert.status == "resolved" for alert in routed.alerts):
        handle = client.get_workflow_handle(routed.incident_id, result_type=IncidentReport)
        try:
            await handle.signal(ALERT_SIGNAL, signal)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:  # not found, or found but already closed
                raise
            return Delivered(routed.incident_id, "", count, skipped="resolved, and no open incident to resolve",
                             handle=handle)
        description = await handle.describe()
        return Delivered(routed.incident_id, description.run_id, count, handle=handle)

    incident = IncidentInput(
        incident_id=routed.incident_id, runbook=routed.runbook, params=routed.params, requested_by=requested_by,
        receipts=[signed] if signed is not None else [],
    )
    try:
        started = await _signal_with_start(client, routed, incident, signal, task_queue, REJECT_CLOSED)
        return Delivered(routed.incident_id, started.result_run_id or "", count, handle=started)
    except WorkflowAlreadyStartedError as exc:
        previous = exc.run_id
    # A closed incident fired again: a new run of the same id, linked to the closed one.
    linked = incident.model_copy(update={"previous_run_id": previous})
    started = await _signal_with_start(client, routed, linked, signal, task_queue, REOPEN_CLOSED)
    return Delivered(routed.incident_id, started.result_run_id or "", count, previous_run_id=previous, handle=started)


# Signal-with-start joins a RUNNING workflow whatever these say; they only decide about a CLOSED one.
REJECT_CLOSED = WorkflowIDReusePolicy.REJECT_DUPLICATE
REOPEN_CLOSED = WorkflowIDReusePolicy.ALLOW_DUPLICATE


async def _signal_with_start(
    client: Client,
    routed: Routed,
    incident: IncidentInput,
    signal: AlertSignal,
    task_queue: str,
    reuse: WorkflowIDReusePolicy,
) -> WorkflowHandle[Any, IncidentReport]:
    handle = await client.start_workflow(
        WORKFLOW,
        incident,
        id=routed.incident_id,
        task_queue=task_queue,
        start_signal=ALERT_SIGNAL,
        start_signal_args=[signal],
        id_reuse_policy=reuse,
        static_summary=run_summary(routed, signal.received_at),
        static_details=run_details(routed, incident),
        result_type=IncidentReport,
    )
    return handle


def run_summary(routed: Routed, received_at: datetime) -> str:
    """One line for the UI: what fired, on which service, since when, and the runbook.

    The time the alert started (else when it arrived) is what tells two runs of one incident apart.
    Label values are escaped: the UI renders this as markdown.
    """
    first = routed.alerts[0]
    since = first.starts_at or received_at
    severity = first.labels.get("severity")
    return (f"{markdown_text(first.name)} on {markdown_text(routed.params.get('service', routed.incident_id))}"
            + (f" ({markdown_text(severity)})" if severity else "")
            + f" since {since.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC · runbook {routed.runbook.name}"
            + f" v{routed.runbook.version}")


def run_details(routed: Routed, incident: IncidentInput) -> str:
    """The alert as the UI's static details (markdown): its summary, description, labels, earlier run.

    The annotations and labels are the sender's text, so they are escaped into inert markdown (no raw
    HTML, no link): cut first, then escaped, so a cut never splits an escape.
    """
    first = routed.alerts[0]
    lines = [f"**{markdown_text((first.annotations.get('summary') or first.name)[:1000])}**"]
    if first.annotations.get("description"):
        lines.append(markdown_text(first.annotations["description"][:1000]))
    shown: list[str] = []
    for name, value in sorted(first.labels.items()):
        if sum(len(x) + 2 for x in shown) > 1000:
            shown.append("…")
            break
        shown.append(markdown_code(f"{name}={value}"[:200]))
    lines.append("Labels: " + ", ".join(shown))
    if len(routed.alerts) > 1:
        lines.append(f"{len(routed.alerts)} alerts in the first delivery")
    if incident.previous_run_id:
        lines.append(f"Fired again after run {markdown_code(incident.previous_run_id)} closed")
    lines.append(f"Follow it: `firebreak status {routed.incident_id} --watch`")
    return "\n\n".join(lines)

