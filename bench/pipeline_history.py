"""Where an incident's time went, read from its history (server timestamps) and its spans (worker clock).

Same machine, same wall clock: the webhook's 202 (the bench), history events (the dev server),
spans (the worker) and the fleet's arrival stamps compare directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent

from bench.pipeline_otlp import Span

E = EventType


def _t(event: HistoryEvent) -> float:
    return event.event_time.ToNanoseconds() / 1e9


@dataclass
class ActivityRun:
    type: str
    activity_id: str
    scheduled: float
    started: float | None = None
    closed: float | None = None
    task: int = 0  # the workflow task that scheduled it (by completion order)

    @property
    def queued(self) -> float:
        return (self.started or self.scheduled) - self.scheduled

    @property
    def ran(self) -> float:
        return (self.closed or self.started or self.scheduled) - (self.started or self.scheduled)


@dataclass
class Timeline:
    """The events of one run that the bench's figures are made of."""

    started: float = 0.0
    first_task_done: float | None = None
    awaiting: float | None = None  # FirebreakPhase set to awaiting_approval (bare: its background activity scheduled)
    update_accepted: float | None = None
    signaled: dict[str, float] = field(default_factory=dict)  # signal name -> first time
    closed: float | None = None
    activities: list[ActivityRun] = field(default_factory=list)
    task_spans: list[tuple[float, float]] = field(default_factory=list)  # workflow tasks: scheduled, completed

    @property
    def tasks(self) -> int:
        return len(self.task_spans)

    def task_seconds(self, since: float = 0.0, until: float = float("inf")) -> float:
        return sum(done - scheduled for scheduled, done in self.task_spans if since <= scheduled and done <= until)

    def first(self, type_: str, after: float = 0.0) -> ActivityRun | None:
        return next((a for a in self.activities if a.type == type_ and a.scheduled >= after), None)

    def first_started_after(self, t: float) -> float | None:
        return min((a.started for a in self.activities if a.started and a.started >= t), default=None)


def timeline(events: list[HistoryEvent], *, bare_background: int | None = None) -> Timeline:
    """``bare_background``: for the bare workflow, the index of the first activity scheduled once it waits."""
    tl = Timeline()
    by_id: dict[int, ActivityRun] = {}
    task_scheduled: float | None = None
    for ev in events:
        t = _t(ev)
        kind = ev.event_type
        if kind == E.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            tl.started = t
        elif kind == E.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            task_scheduled = t
        elif kind == E.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            tl.task_spans.append((task_scheduled if task_scheduled is not None else t, t))
            tl.first_task_done = tl.first_task_done or t
        elif kind == E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = ev.activity_task_scheduled_event_attributes
            run = ActivityRun(attrs.activity_type.name, attrs.activity_id, t, task=tl.tasks)
            by_id[ev.event_id] = run
            tl.activities.append(run)
            if bare_background is not None and len(tl.activities) == bare_background + 1 and tl.awaiting is None:
                tl.awaiting = t
        elif kind == E.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            by_id[ev.activity_task_started_event_attributes.scheduled_event_id].started = t
        elif kind in (E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED, E.EVENT_TYPE_ACTIVITY_TASK_FAILED,
                      E.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT, E.EVENT_TYPE_ACTIVITY_TASK_CANCELED):
            attrs = (ev.activity_task_completed_event_attributes if kind == E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
                     else ev.activity_task_failed_event_attributes)
            run = by_id.get(attrs.scheduled_event_id)
            if run is not None:
                run.closed = t
        elif kind == E.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            fields = ev.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
            phase = fields.get("FirebreakPhase")
            if phase is not None and json.loads(phase.data or b"null") == "awaiting_approval" and tl.awaiting is None:
                tl.awaiting = t
        elif kind == E.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            tl.update_accepted = tl.update_accepted or t
        elif kind == E.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            tl.signaled.setdefault(ev.workflow_execution_signaled_event_attributes.signal_name, t)
        elif kind in (E.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED, E.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED):
            tl.closed = t
    return tl


@dataclass
class Credential:
    step: str
    activity_id: str
    mint: float
    use: float  # the query, or the write
    revoke: float


def credentials(spans: list[Span]) -> list[Credential]:
    """Each credential span split by its events: mint, then its use (the query or the write), then the revoke."""
    out = []
    for span in spans:
        if span.name != "firebreak.credential" or "minted" not in span.events or "released" not in span.events:
            continue
        minted, released = span.events["minted"], span.events["released"]
        out.append(Credential(step=str(span.attributes.get("firebreak.step", "")),
                              activity_id=str(span.attributes.get("temporal.activity_id", "")),
                              mint=(minted - span.start_ns) / 1e9, use=(released - minted) / 1e9,
                              revoke=(span.end_ns - released) / 1e9))
    return out


def breakdown(tl: Timeline, spans: list[Span], accepted_202: float, webhook_s: float,
              first_write: float | None) -> dict[str, float]:
    """Seconds per part of one Firebreak incident, in pipeline order. Keys ending in ``*`` are off the
    critical path (they overlap the rest)."""
    creds = {c.activity_id: c for c in credentials(spans)}
    parts: dict[str, float] = {"intake (webhook to 202)": webhook_s}
    if tl.first_task_done:
        parts["workflow start (202 to first task done)"] = tl.first_task_done - accepted_202
    investigations = [a for a in tl.activities if a.type == "investigate" and (tl.awaiting is None
                                                                               or a.scheduled < tl.awaiting)]
    if investigations:
        first = min(a.scheduled for a in investigations)
        last = max(a.closed or a.scheduled for a in investigations)
        parts["investigations, all (parallel)"] = last - first
        for a in investigations:
            c = creds.get(a.activity_id)
            name = c.step if c else a.activity_id
            parts[f"  investigate {name}: queued"] = a.queued
            if c:
                parts[f"  investigate {name}: mint"] = c.mint
                parts[f"  investigate {name}: query"] = c.use
                parts[f"  investigate {name}: revoke"] = c.revoke
                # Dispatch, decoding, the SDK and waiting for the worker's event loop (shared with everything).
                parts[f"  investigate {name}: rest of the activity"] = a.ran - c.mint - c.use - c.revoke
            parts[f"  investigate {name}: activity"] = a.ran
    diagnose = tl.first("diagnose")
    if diagnose:
        parts["diagnosis (activity, queued + ran)"] = diagnose.queued + diagnose.ran
    else:  # a local activity: a marker in history, its time only in its span
        local = [x for x in spans if x.name == "RunActivity:diagnose"]
        if local:
            parts["diagnosis (local activity, ran)"] = min(local, key=lambda x: x.start_ns).seconds
    observe = tl.first("observe_target")
    if observe and tl.awaiting and observe.scheduled < tl.awaiting:
        parts["precondition read at proposal"] = observe.queued + observe.ran
    ticket = tl.first("file_ticket")
    if ticket:
        parts["ticket at proposal*"] = ticket.queued + ticket.ran
    if tl.awaiting:
        parts["proposal: 202 to awaiting_approval"] = tl.awaiting - accepted_202
        parts["workflow tasks to the proposal (sum)"] = tl.task_seconds(until=tl.awaiting)
    accepted = tl.update_accepted
    check = tl.first("verify_approval")
    if accepted and check:
        parts["approval check (activity)"] = check.queued + check.ran
        recheck = tl.first("observe_target", after=accepted)
        if recheck:
            parts["precondition re-read before the write"] = recheck.queued + recheck.ran
        execute = tl.first("execute_step", after=accepted)
        if execute:
            parts["execute: queued"] = execute.queued
            c = creds.get(execute.activity_id)
            if c:
                parts["execute: mint"] = c.mint
                parts["execute: write"] = c.use
                parts["execute: revoke"] = c.revoke
                parts["execute: rest of the activity"] = execute.ran - c.mint - c.use - c.revoke
        if first_write:
            parts["approval to first write"] = first_write - accepted
        verify = tl.first("verify_step", after=accepted)
        if verify:
            parts["verification (activity)"] = verify.queued + verify.ran
        if tl.closed:
            parts["workflow tasks from approval to closed (sum)"] = tl.task_seconds(since=accepted)
            parts["approval to closed"] = tl.closed - accepted
    return parts

