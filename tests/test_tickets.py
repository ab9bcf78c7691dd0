"""Tickets: filed when a plan is proposed, updated when the incident closes; file and webhook sinks."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from temporalio.testing import WorkflowEnvironment

from firebreak.contracts import AlertSignal, Phase
from firebreak.intake import deliver_routed, route_alerts
from firebreak.runbook import load_runbooks
from incidents import inject, make_alert, open_incident, receipt_signer, report_of, submit, wait_for_phase, wait_until
from worker import build_worker


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict]]]:
    """A real HTTP receiver on loopback, standing where a ticketing system's webhook would."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"headers": dict(self.headers), "body": json.loads(body)})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/tickets", received
    server.shutdown()


async def test_ticket_filed_on_proposal_and_updated_on_close(time_env: WorkflowEnvironment, settings, fleet, webhook):
    url, received = webhook
    settings.ticket_webhook = url
    inject(fleet.url, "checkout", "bad_deploy")
    alert = make_alert("DrillRollback")
    async with build_worker(time_env.client, settings):
        handle = await open_incident(time_env.client, settings, alert)
        await wait_for_phase(handle, Phase.awaiting_approval)
        waiting = await wait_until(handle, lambda s: s.tickets)  # filed off the critical path
        run_id = (await handle.describe()).run_id
        ticket_file = settings.resolved_ticket_dir() / f"{handle.id}.{run_id}.md"
        proposed = ticket_file.read_text()
        await handle.signal("alert", AlertSignal(alerts=[alert.model_copy(update={"status": "resolved"})],
                                                 received_at=alert.starts_at))
        report = await report_of(handle)

    assert [(t.ref, t.run_id) for t in waiting.tickets] == [(f"{handle.id}.{run_id}", run_id)]
    assert proposed.startswith("<!-- proposed at ") and f"run {run_id}" in proposed.splitlines()[0]
    assert waiting.plan_hash in proposed and f"firebreak approve {handle.id}" in proposed
    assert "blast radius" in proposed and "fleet.rollback" in proposed
    assert report.phase == Phase.auto_resolved
    assert ticket_file.read_text().splitlines()[1] == f"# [auto_resolved] {handle.id}"

    events = [r["body"] for r in received]
    assert [e["event"] for e in events] == ["proposed", "closed"]
    assert {e["ticket"] for e in events} == {f"{handle.id}.{run_id}"} and {e["run_id"] for e in events} == {run_id}
    assert events[1]["summary"].startswith("[auto_resolved] drill-rollback on checkout")
    assert events[0]["plan"]["steps"][0]["blast_radius"] and events[0]["hypotheses"][0]["id"] == "bad_deploy"
    assert events[0]["approve_command"] == f"firebreak approve {handle.id} --key PATH"
    assert f"firebreak approve {handle.id}" in events[0]["body_markdown"]
    [link] = events[0]["evidence_links"]  # a graph link for the metrics read, even though Prometheus is down here
    assert "/graph?g0.expr=" in link and "checkout" in link
    keys = [r["headers"]["Idempotency-Key"] for r in received]
    assert len(set(keys)) == 2 and all(k.startswith(handle.id) for k in keys)


async def test_a_later_run_of_the_same_incident_files_its_own_ticket(
    time_env: WorkflowEnvironment, settings, fleet, approvers
):
    inject(fleet.url, "checkout", "bad_deploy")
    async with build_worker(time_env.client, settings):
        first = await open_incident(time_env.client, settings, make_alert("DrillRollback"))
        waiting = await wait_for_phase(first, Phase.awaiting_approval)
        rejection = approvers.approval("alice", first.id, waiting.plan_hash, decision="reject")
        assert (await submit(first, rejection)).counted
        closed = await report_of(first)
        # The same incident fires again: a new run, linked to the first.
        second = await reopen(time_env.client, settings, make_alert("DrillRollback"), first.id)
        await wait_for_phase(second, Phase.awaiting_approval)
        waiting_again = await wait_until(second, lambda s: s.tickets)
        await second.terminate("test over")

    first_ticket, second_ticket = closed.status.tickets[0], waiting_again.tickets[0]
    assert first_ticket.run_id != second_ticket.run_id and first_ticket.ref != second_ticket.ref
    first_file = settings.resolved_ticket_dir() / f"{first_ticket.ref}.md"
    second_file = settings.resolved_ticket_dir() / f"{second_ticket.ref}.md"
    # The earlier run's ticket is still its own, closed as rejected; the new run's title says where it stands.
    assert first_file.read_text().splitlines()[1] == f"# [rejected] {first.id}"
    assert "✔ **alice** rejected" in first_file.read_text()
    assert second_file.read_text().splitlines()[1] == f"# [awaiting_approval] {first.id}"


async def reopen(client, settings, alert, incident_id: str):
    """Deliver ``alert`` to an existing incident id (a closed one opens its next run)."""
    routing = route_alerts(load_runbooks(settings.resolved_runbooks_dir()), [alert])
    routed = routing.routed[0]
    routed.incident_id = incident_id
    delivered = await deliver_routed(client, routed, task_queue=settings.temporal.task_queue,
                                     receipt=receipt_signer(settings.state_dir, None))
    assert delivered.previous_run_id is not None and delivered.handle is not None
    return delivered.handle
