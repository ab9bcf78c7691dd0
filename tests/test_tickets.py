"""Tickets: filed when a plan is proposed, updated when the incident closes; file and webhook sinks."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from temporalio.testing import WorkflowEnvironment

from firebreak.contracts import AlertSignal, Phase
from incidents import inject, make_alert, open_incident, wait_for_phase
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
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        ticket_file = settings.resolved_ticket_dir() / f"{handle.id}.md"
        proposed = ticket_file.read_text()
        await handle.signal("alert", AlertSignal(alerts=[alert.model_copy(update={"status": "resolved"})],
                                                 received_at=alert.starts_at))
        report = await handle.result()

    assert [t.ref for t in waiting.tickets] == [handle.id]
    assert waiting.plan_hash in proposed and f"firebreak approve {handle.id}" in proposed
    assert "blast radius" in proposed and "fleet.rollback" in proposed
    assert report.phase == Phase.auto_resolved and "auto_resolved" in ticket_file.read_text()

    events = [r["body"] for r in received]
    assert [e["event"] for e in events] == ["proposed", "closed"]
    assert events[0]["plan"]["steps"][0]["blast_radius"] and events[0]["hypotheses"][0]["id"] == "bad_deploy"
    assert events[0]["approve_command"] == f"firebreak approve {handle.id} --key PATH"
    assert f"firebreak approve {handle.id}" in events[0]["body_markdown"]
    [link] = events[0]["evidence_links"]  # a graph link for the metrics read, even though Prometheus is down here
    assert "/graph?g0.expr=" in link and "checkout" in link
    keys = [r["headers"]["Idempotency-Key"] for r in received]
    assert len(set(keys)) == 2 and all(k.startswith(handle.id) for k in keys)
