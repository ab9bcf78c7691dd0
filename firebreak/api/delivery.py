"""One webhook delivery: route its alerts, deliver them, record the rest, answer.

Order matters for "nothing acknowledged that was not recorded":

1. every alert is routed (:func:`firebreak.intake.route_alerts`); alerts of
   this delivery that share an incident become ONE signal;
2. the routed groups are delivered (signal-with-start), concurrently, under
   one deadline. If any group fails because Temporal is down or slow, the
   answer is 503 and the sender retries the whole delivery: at-least-once, so
   a group that did get through may count its alerts twice;
3. only then are unrouted and refused alerts written (fsync) to
   ``unrouted.jsonl``, so a retried 503 does not record them twice;
4. 202 names the incidents the alerts joined.

A delivery that mixes good alerts and an alert whose label a runbook refuses
(e.g. a ``service`` label that tries to break out of a PromQL string):
**the good alerts are delivered and the refused one is recorded with its
field and reason, answered 202 with a ``refused`` list.** Rejecting the whole
delivery would let one hostile or malformed label suppress the real alerts
grouped with it: Alertmanager does not retry a 4xx and re-sends the same group
(hostile alert included) every ``group_interval``, so the good alerts would
never arrive. A refused alert still never reaches a query, a workflow or a
target. When EVERY alert of a delivery is refused, nothing is started and the
answer is 422 naming the field (the refused alerts are recorded all the same).

A delivery that is authentic but must not count again is refused whole, opens
and closes nothing, and its alerts are recorded as refused with the reason:

- PagerDuty: an event already processed (its own ``event.id``, whatever the
  ``X-Webhook-Id``) is answered 202 ``duplicate``; a retry under the same
  ``X-Webhook-Id`` is the sender's ordinary retry and is not recorded again.
  An event whose ``occurred_at`` is outside the freshness window is 422
  naming ``event.occurred_at``: ids are remembered for that whole window, so
  nothing inside it is taken twice and nothing outside it at all;
- Grafana: a signed request seen before (same timestamp, same body) is
  answered 202 ``duplicate``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime, timedelta, timezone
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from temporalio.client import Client

from firebreak.api.gateway import TemporalGateway, TemporalUnavailable, is_unavailable
from firebreak.api.retries import DeliveryLog
from firebreak.api.sources import Parsed
from firebreak.api.unrouted import UnroutedLog, UnroutedRecord
from firebreak.contracts import Alert
from firebreak.intake import Delivered, Routed, deliver_routed, route_alerts
from firebreak.receipts import ReceiptSigner
from firebreak.runbook import Runbook

log = logging.getLogger("firebreak.api")
LISTED = 100  # alerts named in an answer; the rest are counted (a 500-alert group stays a small answer)
PAGERDUTY_FUTURE_S = 300.0  # clocks differ: an event "from the future" by more than this is refused


class FieldError(BaseModel):
    field: str
    error: str


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer."""

    error: str
    field: str | None = None
    errors: list[FieldError] = Field(default_factory=list)


class IncidentRef(BaseModel):
    incident_id: str
    run_id: str
    runbook: str
    alerts: int
    previous_run_id: str | None = Field(default=None, description="a closed run this delivery reopened as a new run")
    skipped: str | None = Field(default=None, description="why nothing was sent to this incident")


class AlertRef(BaseModel):
    fingerprint: str
    alertname: str
    reason: str
    field: str | None = None
    runbook: str | None = None


class Counts(BaseModel):
    alerts: int = 0
    routed: int = 0
    unrouted: int = 0
    refused: int = 0


class Accepted(BaseModel):
    """The 202 answer: which incidents the alerts joined, and what was only recorded."""

    status: Literal["accepted", "duplicate", "ignored", "test", "recorded"]
    source: str
    delivery_id: str
    incident_ids: list[str] = Field(default_factory=list)
    incidents: list[IncidentRef] = Field(default_factory=list)
    unrouted: list[AlertRef] = Field(default_factory=list, description=f"the first {LISTED}; see counts")
    refused: list[AlertRef] = Field(default_factory=list, description=f"the first {LISTED}; see counts")
    counts: Counts = Counts()
    detail: str = ""


def error_response(status: int, error: str, field: str | None = None, errors: list[dict[str, str]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=error, field=field, errors=[FieldError(**e) for e in errors or []])
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def accepted(body: Accepted) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"), status_code=202)


class Intake:
    def __init__(self, runbooks: list[Runbook], gateway: TemporalGateway, log_: UnroutedLog, task_queue: str,
                 receipt: ReceiptSigner | None = None) -> None:
        self.runbooks = runbooks
        self.gateway = gateway
        self.unrouted = log_
        self.task_queue = task_queue
        self.receipt = receipt  # signs "an alert system raised this": the broker derives requesters from it

    async def accept(self, parsed: Parsed) -> JSONResponse:
        delivery_id = parsed.delivery_id or f"{parsed.source}-{uuid.uuid4().hex}"
        if parsed.test:
            # Recorded, so whoever pressed "test" can see it arrived; nothing is routed or started.
            at = datetime.now(timezone.utc)
            alerts = [sa.alert for sa in parsed.alerts] or [
                Alert(source=parsed.source, fingerprint=parsed.event_id or delivery_id, labels={"alertname": "Ping"})]
            await self.unrouted.append([UnroutedRecord(at=at, kind="test", source=parsed.source, delivery_id=delivery_id,
                                                       reason=parsed.test, alert=a) for a in alerts])
            return accepted(Accepted(status="test", source=parsed.source, delivery_id=delivery_id,
                                     detail=parsed.ignored or parsed.test,
                                     counts=Counts(alerts=len(parsed.alerts))))
        if parsed.ignored:
            return accepted(Accepted(status="ignored", source=parsed.source, delivery_id=delivery_id,
                                     detail=parsed.ignored))
        if parsed.note:
            # An event about an alert that changes no incident (Opsgenie's acknowledge): kept, nothing sent.
            at = datetime.now(timezone.utc)
            await self.unrouted.append([UnroutedRecord(at=at, kind="event", source=parsed.source,
                                                       delivery_id=delivery_id, reason=parsed.note, alert=sa.alert)
                                        for sa in parsed.alerts])
            return accepted(Accepted(status="recorded", source=parsed.source, delivery_id=delivery_id,
                                     detail=parsed.note, counts=Counts(alerts=len(parsed.alerts))))
        received_at = datetime.now(timezone.utc)
        by_alert = {id(sa.alert): sa for sa in parsed.alerts}
        routing = route_alerts(self.runbooks, (sa.alert for sa in parsed.alerts))

        refused = [
            UnroutedRecord(at=received_at, kind="refused", source=parsed.source, delivery_id=delivery_id,
                           reason=r.reason, field=r.field, alert=r.alert)
            for r in parsed.refused
        ] + [
            UnroutedRecord(at=received_at, kind="refused", source=parsed.source, delivery_id=delivery_id,
                           reason=r.reason, field=by_alert[id(r.alert)].field_for(r.field), runbook=r.runbook,
                           alert=r.alert)
            for r in routing.refused
        ]
        unrouted = [
            UnroutedRecord(at=received_at, kind="unrouted", source=parsed.source, delivery_id=delivery_id,
                           reason=u.reason + by_alert[id(u.alert)].unrouted_hint,
                           field=by_alert[id(u.alert)].missing_at if by_alert[id(u.alert)].unrouted_hint else None,
                           alert=u.alert)
            for u in routing.unrouted
        ]
        if refused and not routing.routed and not routing.unrouted:
            await self.unrouted.append(refused)
            first = refused[0]
            log.warning("refused delivery %s from %s: %s: %s", delivery_id, parsed.source, first.field, first.reason)
            return error_response(
                422, f"refused: {first.field}: {first.reason}", first.field,
                [{"field": r.field or "", "error": r.reason} for r in refused],
            )

        delivered = await self._deliver(routing.routed, delivery_id, received_at)
        await self.unrouted.append(unrouted + refused)
        if refused:
            log.warning("delivery %s from %s: %d alert(s) refused, first at %s", delivery_id, parsed.source,
                        len(refused), refused[0].field)
        incidents = [
            IncidentRef(incident_id=d.incident_id, run_id=d.run_id, runbook=g.runbook.name, alerts=d.alerts,
                        previous_run_id=d.previous_run_id, skipped=d.skipped)
            for g, d in zip(routing.routed, delivered)
        ]
        return accepted(Accepted(
            status="accepted",
            source=parsed.source,
            delivery_id=delivery_id,
            incident_ids=[i.incident_id for i in incidents if not i.skipped],
            incidents=incidents,
            unrouted=[_ref(r) for r in unrouted[:LISTED]],
            refused=[_ref(r) for r in refused[:LISTED]],
            counts=Counts(alerts=len(parsed.alerts) + len(parsed.refused), routed=sum(len(g.alerts) for g in routing.routed),
                          unrouted=len(unrouted), refused=len(refused)),
        ))

    async def record_refused(self, parsed: Parsed, field: str, reason: str, delivery_id: str | None = None) -> list[
            UnroutedRecord]:
        """Every alert of a delivery refused whole (a replay, a stale event), written where refused alerts go."""
        at = datetime.now(timezone.utc)
        delivery = delivery_id or parsed.delivery_id or parsed.event_id
        records = [UnroutedRecord(at=at, kind="refused", source=parsed.source, delivery_id=delivery, reason=reason,
                                  field=field, alert=alert)
                   for alert in [sa.alert for sa in parsed.alerts] + [r.alert for r in parsed.refused]]
        await self.unrouted.append(records)
        log.warning("refused delivery %s from %s: %s: %s", delivery, parsed.source, field, reason)
        return records

    async def duplicate(self, parsed: Parsed, field: str, reason: str, *, record: bool = True) -> JSONResponse:
        """202 ``duplicate``: already processed, so this copy opens and closes nothing."""
        records = await self.record_refused(parsed, field, reason) if record else []
        delivery_id = parsed.delivery_id or parsed.event_id or f"{parsed.source}-{uuid.uuid4().hex}"
        return accepted(Accepted(
            status="duplicate", source=parsed.source, delivery_id=delivery_id, detail=reason,
            refused=[_ref(r) for r in records[:LISTED]],
            counts=Counts(alerts=len(parsed.alerts) + len(parsed.refused), refused=len(records)),
        ))

    async def accept_pagerduty(self, parsed: Parsed, seen: DeliveryLog, *, max_age_s: float,
                               now: datetime | None = None) -> JSONResponse:
        """A signed PagerDuty event: fresh, and processed once by its own ``event.id``.

        The signature covers the body but no time and no delivery id, so an attacker holding one
        signed body could send it again under any ``X-Webhook-Id``: the event's id is what counts.
        """
        now = now or datetime.now(timezone.utc)
        occurred = parsed.occurred_at
        if occurred is None or parsed.event_id is None:
            # The parser requires both; a check that lacks its field refuses.
            return error_response(400, "a PagerDuty event needs event.id and event.occurred_at", "event")
        if occurred.tzinfo is None:
            occurred = occurred.replace(tzinfo=timezone.utc)
        age = now - occurred
        if age > timedelta(seconds=max_age_s) or age < -timedelta(seconds=PAGERDUTY_FUTURE_S):
            reason = (f"event {parsed.event_id} occurred at {occurred.isoformat()}, outside the freshness window "
                      f"(at most {max_age_s:.0f}s old, {PAGERDUTY_FUTURE_S:.0f}s ahead): a replay or a stuck sender")
            await self.record_refused(parsed, "event.occurred_at", reason)
            return error_response(422, f"refused: event.occurred_at: {reason}", "event.occurred_at")
        if parsed.ignored:
            return await self.accept(parsed)
        event_key = f"event:{parsed.event_id}"
        webhook_id = parsed.delivery_id
        # Each id kind has its own prefix, so no X-Webhook-Id can pass for an event id; a bare id is
        # a webhook id recorded before event ids were (kept for retries across the upgrade).
        webhook_key = f"webhook:{webhook_id}" if webhook_id is not None else None
        async with seen.hold(event_key) as event_seen:
            legacy = webhook_id is not None and not webhook_id.startswith(("event:", "webhook:")) and seen.seen(
                webhook_id)
            retry = legacy or (webhook_key is not None and seen.seen(webhook_key))
            if event_seen or retry:
                if retry:
                    return await self.duplicate(parsed, "headers.x-webhook-id",
                                                "this X-Webhook-Id was already processed", record=False)
                return await self.duplicate(parsed, "event.id", f"PagerDuty event {parsed.event_id} was already "
                                            "processed under another X-Webhook-Id: a replay or a second copy")
            response = await self.accept(parsed)
            if response.status_code < 500:  # a 503 is retried by PagerDuty and must then be processed
                await seen.mark(event_key)
                if webhook_key is not None:
                    await seen.mark(webhook_key)
            return response

    async def _deliver(self, groups: list[Routed], delivery_id: str, received_at: datetime) -> list[Delivered]:
        if not groups:
            return []

        async def send(client: Client) -> list[Delivered | BaseException]:
            return await asyncio.gather(
                *[deliver_routed(client, group, task_queue=self.task_queue, receipt=self.receipt,
                                 delivery_id=delivery_id, received_at=received_at) for group in groups],
                return_exceptions=True,
            )

        results = await self.gateway.call(send)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            # Some groups may have gone through; the sender's retry re-sends them (at-least-once).
            if all(is_unavailable(f) for f in failures):
                missed = f"{len(failures)} of {len(groups)} incident(s) not delivered"
                raise TemporalUnavailable(missed) from failures[0]
            raise failures[0]
        return [r for r in results if isinstance(r, Delivered)]


def _ref(record: UnroutedRecord) -> AlertRef:
    return AlertRef(fingerprint=record.alert.fingerprint, alertname=record.alert.name, reason=record.reason,
                    field=record.field, runbook=record.runbook)
