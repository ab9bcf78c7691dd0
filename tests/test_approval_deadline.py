"""In time is in time: an approval that reached Firebreak before the approval deadline (the API, or
Temporal's history) counts, even when no worker could judge it until after the deadline; one that
arrived after it never does.

The real stack: dev server, broker, fleet, API, worker. The drill's window is seconds long
(tests/data/runbooks/drill-deadline.yaml: escalate after 1 s, expire after 14 s). The worker runs
until the incidents have escalated, so that only the expiry's timer is left; it is then stopped,
and started again only after the deadline: the expiry timer and the queued approval signal then
reach it in the same workflow task.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import httpx
from temporalio.testing import WorkflowEnvironment

from api_harness import running_api
from firebreak.config import AGENT
from firebreak.contracts import Approval, IncidentStatus, Phase
from incidents import inject, make_alert, open_incident, report_of, wait_until
from worker import build_worker

WINDOW = timedelta(seconds=14)  # the drill's expire_after: also the longest an approval may be valid
SEND_BEFORE = timedelta(seconds=8)  # how long before the deadline the in-time approvals are sent


def agent_writes(fleet, service: str) -> list[str]:
    return [c["kind"] for c in fleet.fleet.changes(service) if c["author"] == AGENT]


async def sleep_until(at: datetime) -> None:
    await asyncio.sleep(max(0.0, (at - datetime.now(timezone.utc)).total_seconds()))


async def post_approval(http: httpx.AsyncClient, api_url: str, approval: Approval) -> httpx.Response:
    return await http.post(f"{api_url}/v1/incidents/{approval.workflow_id}/approvals",
                           content=approval.model_dump_json(), headers={"Content-Type": "application/json"})


async def test_a_worker_outage_across_the_deadline_counts_what_arrived_before_it_and_refuses_what_came_after(
    dev_env: WorkflowEnvironment, settings, fleet, approvers, state_dir
):
    services = ("payments", "checkout", "inventory")  # through the API in time, to Temporal in time, too late
    for service in services:
        inject(fleet.url, service, "bad_deploy")
    # A patient API: with no worker, an approval waits for a status query to time out before it goes as a
    # signal, and on this shared machine that can outlast the API's default 4 s answer to a webhook.
    async with running_api(dev_env.client, settings, state_dir, worker=False, temporal_timeout_s=20.0) as api, \
            httpx.AsyncClient(timeout=30) as http:
        async with build_worker(dev_env.client, settings):
            handles = [await open_incident(dev_env.client, settings, make_alert("DrillDeadline", service))
                       for service in services]
            waiting: list[IncidentStatus] = [
                await wait_until(handle, lambda s: s.escalated and s.phase == Phase.awaiting_approval)
                for handle in handles
            ]
        # The worker is gone; every deadline is still ahead.
        via_temporal = handles[1]
        deadlines = [status.expires_at for status in waiting]
        assert all(deadlines)
        before = {service: agent_writes(fleet, service) for service in services}

        def approval(index: int, expires_in: timedelta) -> Approval:
            return approvers.approval("alice", handles[index].id, waiting[index].plan_hash, expires_in=expires_in)

        # Before the deadline, and signed valid until a window after it: the broker, which judges an approval's
        # own expiry when it first sees it (once the worker is back), must still find it valid.
        await sleep_until(min(deadlines) - SEND_BEFORE)
        through_api, to_temporal = approval(0, WINDOW + SEND_BEFORE), approval(1, WINDOW + SEND_BEFORE)
        sent = await post_approval(http, api.url, through_api)
        assert sent.status_code == 202 and sent.json()["queued"], sent.text
        # As `firebreak approve` does when the API is unreachable: straight into the incident's history.
        await via_temporal.signal("approval", to_temporal.model_dump(mode="json"))
        assert datetime.now(timezone.utc) < min(deadlines), "the in-time approvals were not sent in time"

        await sleep_until(max(deadlines) + timedelta(seconds=0.5))
        after = await post_approval(http, api.url, approval(2, WINDOW))
        assert after.status_code == 202 and after.json()["queued"], after.text

        async with build_worker(dev_env.client, settings):
            reports = [await asyncio.wait_for(report_of(handle), 60) for handle in handles]

    for report, status, service in zip(reports[:2], waiting[:2], services[:2]):
        assert report.phase == Phase.resolved, (service, report.outcome)
        [alice] = report.status.approvals
        assert alice.approver == "alice" and alice.counted, alice.reason
        assert alice.received_at < status.expires_at  # shown as when it arrived, not when a worker took it
        assert agent_writes(fleet, service)[len(before[service]):] == ["restart"]

    expired = reports[2]
    assert expired.phase == Phase.expired, expired.outcome
    [refused] = expired.status.approvals
    assert not refused.counted and "after the approval deadline" in refused.reason, refused.reason
    assert agent_writes(fleet, "inventory") == before["inventory"]
