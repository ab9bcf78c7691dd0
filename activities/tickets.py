"""Tickets: a markdown file per incident run by default, and a generic webhook if configured.

A ticket is keyed by incident id and run (the run's first run id, so a run that continued as new
keeps its ticket): the proposal and the closing of one run update one ticket, and a later run of the
same incident files its own, never overwriting an earlier run's. Its title starts with the phase it
was filed in. Filing is idempotent: a retry rewrites the same file and sends the same event id.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.deps import ActivityDeps
from firebreak.contracts import Ticket, TicketRequest


class TicketActivities:
    def __init__(self, deps: ActivityDeps) -> None:
        self.deps = deps

    @activity.defn(name="file_ticket")
    async def file_ticket(self, request: TicketRequest) -> Ticket:
        settings = self.deps.settings
        info = activity.info()
        event_id = f"{info.workflow_id}/{info.workflow_run_id}/{info.activity_id}"
        ref = ticket_ref(request.incident_id, request.run_id)
        if settings.ticket_webhook:
            response = await self.deps.http.post(
                settings.ticket_webhook,
                json={"event_id": event_id, "event": request.event, "incident_id": request.incident_id,
                      "ticket": ref, "run_id": request.run_id, "summary": request.summary,
                      "body_markdown": request.body_markdown, **request.payload},
                headers={"Idempotency-Key": event_id},
            )
            response.raise_for_status()
        directory = settings.resolved_ticket_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{ref}.md"
        # The contract's pattern already refuses separators; this makes the sink's promise local too.
        if path.resolve().parent != directory.resolve():
            raise ApplicationError(f"refused: ticket path for {request.incident_id!r} leaves {directory}",
                                   non_retryable=True)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        tmp = path.with_suffix(".md.tmp")
        run = f" · run {request.run_id}" if request.run_id else ""
        tmp.write_text(f"<!-- {request.event} at {stamp}{run}: {request.summary} -->\n{request.body_markdown}\n",
                       encoding="utf-8")
        os.replace(tmp, path)
        with (directory / "events.jsonl").open("a", encoding="utf-8") as log:
            log.write(json.dumps({"event_id": event_id, "event": request.event, "incident_id": request.incident_id,
                                  "ticket": ref, "summary": request.summary, "at": stamp}) + "\n")
        return Ticket(sink="webhook+file" if settings.ticket_webhook else "file", ref=ref, url=path.as_uri(),
                      run_id=request.run_id)


def ticket_ref(incident_id: str, run_id: str | None) -> str:
    """One ticket per run: ``INCIDENT.RUN`` (just ``INCIDENT`` for a workflow that sends no run)."""
    return f"{incident_id}.{run_id}" if run_id else incident_id
