"""Tickets: a markdown file per incident by default, and a generic webhook if configured.

Filing is idempotent: the ticket is keyed by incident id, and a retry rewrites
the same file and sends the same event id.
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
        if settings.ticket_webhook:
            response = await self.deps.http.post(
                settings.ticket_webhook,
                json={"event_id": event_id, "event": request.event, "incident_id": request.incident_id,
                      "summary": request.summary, "body_markdown": request.body_markdown, **request.payload},
                headers={"Idempotency-Key": event_id},
            )
            response.raise_for_status()
        directory = settings.resolved_ticket_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{request.incident_id}.md"
        # The contract's pattern already refuses separators; this makes the sink's promise local too.
        if path.resolve().parent != directory.resolve():
            raise ApplicationError(f"refused: ticket path for {request.incident_id!r} leaves {directory}",
                                   non_retryable=True)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(f"<!-- {request.event} at {stamp} -->\n{request.body_markdown}\n", encoding="utf-8")
        os.replace(tmp, path)
        with (directory / "events.jsonl").open("a", encoding="utf-8") as log:
            log.write(json.dumps({"event_id": event_id, "event": request.event, "incident_id": request.incident_id,
                                  "summary": request.summary, "at": stamp}) + "\n")
        return Ticket(sink="webhook+file" if settings.ticket_webhook else "file", ref=request.incident_id, url=path.as_uri())
