"""Notifications to the next tier: a generic webhook, or a local log on the embedded stack."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from temporalio import activity

from activities.deps import ActivityDeps
from firebreak.contracts import Notification


class NotifyActivities:
    def __init__(self, deps: ActivityDeps) -> None:
        self.deps = deps

    @activity.defn(name="notify")
    async def notify(self, notification: Notification) -> None:
        info = activity.info()
        event = {"event_id": f"{info.workflow_id}/{info.workflow_run_id}/{info.activity_id}",
                 "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **notification.model_dump(mode="json")}
        if self.deps.settings.notify_webhook:
            response = await self.deps.http.post(self.deps.settings.notify_webhook, json=event,
                                                 headers={"Idempotency-Key": event["event_id"]})
            response.raise_for_status()
        path = self.deps.settings.state_dir / "notifications.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(event) + "\n")
        activity.logger.info("notified %s: %s", notification.to, notification.summary)
