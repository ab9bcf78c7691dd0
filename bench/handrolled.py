"""The pipeline a team would write by hand: the third side of ``bench/pipeline.py``.

    python -m bench.handrolled --address HOST:PORT --task-queue QUEUE --fleet-url URL --prometheus-url URL \\
        --ticket-dir DIR        # the fleet's standing token in $HANDROLLED_FLEET_TOKEN

A plain Temporal workflow and worker, written as the temporalio samples write them: the bench's
incident (``bench/pipeline.py``'s runbook) without Firebreak. The same three reads with the same
queries against the same Prometheus and fleet, the same diagnosis (a deploy within 12 h before the
alert: a plain function in the workflow, as a team would write it, not Firebreak's runbook engine),
the service read for the proposal, the proposal as a ticket file, one ``approve`` signal, the same
rollback at the fleet with one standing bearer token (no broker, no approval check, no re-read of the
precondition, no payload MAC, no receipts), one look at the same verification query, and the closing
ticket. Default retry policies, an idempotency key on the write.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():
    import httpx

WORKFLOW = "HandRolledIncident"
TOKEN_ENV = "HANDROLLED_FLEET_TOKEN"

# The bench runbook's queries (bench/pipeline.py runbook_text), for one namespace.
ERROR_RATE = ('sum(rate(http_requests_total{{namespace="{ns}",code=~"5.."}}[30s])) / '
              'sum(rate(http_requests_total{{namespace="{ns}"}}[30s]))')
LATENCY_P99 = 'histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{{namespace="{ns}"}}[30s])))'
VERIFY = "vector(0)"


@dataclass
class Alert:
    service: str
    namespace: str
    started_at: str  # RFC 3339, from Alertmanager's startsAt
    prometheus: bool = True  # whether the bench runs Prometheus (the runbook then has no metric reads)


@dataclass
class Ticket:
    incident: str
    event: str  # "proposal" or "closing"
    summary: str
    body: str


# -- activities ------------------------------------------------------------------------------


class IncidentActivities:
    def __init__(self, http: httpx.AsyncClient, fleet_url: str, prometheus_url: str, token: str,
                 ticket_dir: Path) -> None:
        self.http, self.fleet_url, self.prometheus_url = http, fleet_url, prometheus_url
        self.headers = {"Authorization": f"Bearer {token}"}
        self.ticket_dir = ticket_dir

    @activity.defn
    async def query_prometheus(self, query: str, lookback_s: float, step_s: float) -> list[dict]:
        """An instant query (``lookback_s`` 0) or a range query ending now."""
        now = time.time()
        params: dict[str, str | float]
        if lookback_s:
            url, params = "/api/v1/query_range", {"query": query, "start": now - lookback_s, "end": now, "step": step_s}
        else:
            url, params = "/api/v1/query", {"query": query, "time": now}
        response = await self.http.get(self.prometheus_url + url, params=params)
        response.raise_for_status()
        return response.json()["data"]["result"]

    @activity.defn
    async def read_changes(self, service: str, since: str) -> list[dict]:
        response = await self.http.get(f"{self.fleet_url}/services/{service}/changes", params={"since": since},
                                       headers=self.headers)
        response.raise_for_status()
        return response.json()["changes"]

    @activity.defn
    async def read_service(self, service: str) -> dict:
        response = await self.http.get(f"{self.fleet_url}/services/{service}", headers=self.headers)
        response.raise_for_status()
        return response.json()

    @activity.defn
    async def rollback(self, service: str) -> dict:
        # One key per incident: a retried activity is answered from the fleet's record, never acts twice.
        key = f"{activity.info().workflow_id}/rollback"
        response = await self.http.post(f"{self.fleet_url}/services/{service}/rollback",
                                        headers={**self.headers, "Idempotency-Key": key})
        response.raise_for_status()
        return response.json()

    @activity.defn
    async def file_ticket(self, ticket: Ticket) -> str:
        """A markdown file per incident, replaced atomically, and a line in the events log."""
        self.ticket_dir.mkdir(parents=True, exist_ok=True)
        path = self.ticket_dir / f"{ticket.incident}.md"
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(f"<!-- {ticket.event} at {stamp}: {ticket.summary} -->\n{ticket.body}\n", encoding="utf-8")
        os.replace(tmp, path)
        with (self.ticket_dir / "events.jsonl").open("a", encoding="utf-8") as log:
            log.write(json.dumps({"event": ticket.event, "incident_id": ticket.incident, "summary": ticket.summary,
                                  "at": stamp}) + "\n")
        return path.as_uri()


# -- the diagnosis ---------------------------------------------------------------------------


def recent_deploy(changes: list[dict], alert_started: datetime, within: timedelta) -> dict | None:
    """The latest change to the service within ``within`` before the alert: the bad-deploy rule."""
    recent = [c for c in changes
              if alert_started - within <= datetime.fromisoformat(c["at"]) <= alert_started]
    return max(recent, key=lambda c: c["at"], default=None)


# -- the workflow ----------------------------------------------------------------------------


@workflow.defn(name=WORKFLOW)
class HandRolledIncident:
    def __init__(self) -> None:
        self.phase = "investigating"
        self.approver: str | None = None

    @workflow.signal
    def approve(self, approver: str) -> None:
        self.approver = approver

    @workflow.query
    def status(self) -> dict[str, str]:
        return {"phase": self.phase}

    @workflow.run
    async def run(self, alert: Alert) -> str:
        incident = workflow.info().workflow_id
        started = datetime.fromisoformat(alert.started_at)
        timeout = timedelta(seconds=30)
        reads = [workflow.execute_activity_method(IncidentActivities.read_changes,
                                                  args=[alert.service, (started - timedelta(hours=12)).isoformat()],
                                                  start_to_close_timeout=timeout)]
        if alert.prometheus:
            reads += [
                workflow.execute_activity_method(IncidentActivities.query_prometheus,
                                                 args=[ERROR_RATE.format(ns=alert.namespace), 15 * 60, 5],
                                                 start_to_close_timeout=timeout),
                workflow.execute_activity_method(IncidentActivities.query_prometheus,
                                                 args=[LATENCY_P99.format(ns=alert.namespace), 0, 0],
                                                 start_to_close_timeout=timeout),
            ]
        changes, *_metrics = await asyncio.gather(*reads)

        deploy = recent_deploy(changes, started, timedelta(hours=12))
        if deploy is None:
            self.phase = "no_diagnosis"
            await self.ticket(incident, "closing", f"{alert.service}: no recent deploy, nothing to propose", "")
            return self.phase

        state = await workflow.execute_activity_method(IncidentActivities.read_service, alert.service,
                                                       start_to_close_timeout=timeout)
        self.phase = "awaiting_approval"
        await self.ticket(incident, "proposal", f"roll back {alert.service} from {state['version']} to "
                          f"{state['previous_version']}?", f"Deploy {deploy['version']} at {deploy['at']} by "
                          f"{deploy['author']}. Approve with the `approve` signal.")
        if not await self.approved(within=timedelta(hours=2)):
            self.phase = "expired"
            return self.phase

        self.phase = "executing"
        result = await workflow.execute_activity_method(IncidentActivities.rollback, alert.service,
                                                        start_to_close_timeout=timedelta(seconds=60))
        check = await workflow.execute_activity_method(IncidentActivities.query_prometheus, args=[VERIFY, 0, 0],
                                                       start_to_close_timeout=timeout) if alert.prometheus else []
        healthy = all(float(s["value"][1]) < 0.5 for s in check)
        self.phase = "resolved" if healthy else "failed"
        await self.ticket(incident, "closing", f"{alert.service} rolled back to {result['version']} by "
                          f"{self.approver}: {self.phase}", "")
        return self.phase

    async def approved(self, within: timedelta) -> bool:
        try:
            await workflow.wait_condition(lambda: self.approver is not None, timeout=within)
        except TimeoutError:
            return False
        return True

    async def ticket(self, incident: str, event: str, summary: str, body: str) -> str:
        return await workflow.execute_activity_method(IncidentActivities.file_ticket,
                                                      Ticket(incident, event, summary, body),
                                                      start_to_close_timeout=timedelta(seconds=30))


# -- the worker ------------------------------------------------------------------------------


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--fleet-url", required=True)
    parser.add_argument("--prometheus-url", required=True)
    parser.add_argument("--ticket-dir", type=Path, required=True)
    parser.add_argument("--workflow-cache", type=int, default=1000, help="max_cached_workflows, as the worker's")
    parser.add_argument("--workflow-task-slots", type=int, default=None,
                        help="max_concurrent_workflow_tasks, as the worker's (default: the SDK's)")
    args = parser.parse_args()
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise SystemExit(f"bench.handrolled: ${TOKEN_ENV} (the fleet's standing token) is unset")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from firebreak.telemetry import export_from_env, temporal_interceptors

    # Traced as the other two workers are, so that tracing is not part of the difference.
    export_from_env("handrolled-worker")
    client = await Client.connect(args.address, interceptors=temporal_interceptors())
    async with httpx.AsyncClient(timeout=30) as http:
        activities = IncidentActivities(http, args.fleet_url.rstrip("/"), args.prometheus_url.rstrip("/"), token,
                                        args.ticket_dir)
        worker = Worker(client, task_queue=args.task_queue, workflows=[HandRolledIncident],
                        activities=[activities.query_prometheus, activities.read_changes, activities.read_service,
                                    activities.rollback, activities.file_ticket],
                        max_cached_workflows=args.workflow_cache,
                        max_concurrent_workflow_tasks=args.workflow_task_slots)
        logging.getLogger("handrolled").info("worker on %s task queue %s", args.address, args.task_queue)
        await worker.run()


if __name__ == "__main__":
    # Run from the module by its own name: the workflow sandbox re-imports a workflow's module, never __main__.
    from bench import handrolled

    asyncio.run(handrolled.main())
    sys.stdout.flush()
    os._exit(0)  # sdk-python#300: never finalize an interpreter that used a client
