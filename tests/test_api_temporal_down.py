"""Temporal unreachable: 503 with Retry-After, nothing acknowledged that was not recorded; then it works again.

A real dev server on a fixed port and database file is stopped and started
again under the API, which connects through ``firebreak.temporal.connect``.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from temporalio.api.enums.v1 import EventType

from api_harness import alertmanager_body, api_settings, bearer, labels, start_dev_server
from firebreak.api import ApiServer
from firebreak.config import TemporalSettings
from firebreak.temporal import connect


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def _signals(client, workflow_id: str) -> int:  # noqa: ANN001
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return sum(1 for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)


async def test_temporal_down_is_503_then_the_same_delivery_succeeds(
    tmp_path: Path, runbooks_dir: Path, http: httpx.AsyncClient
) -> None:
    port = _free_port()
    temporal = TemporalSettings(address=f"127.0.0.1:{port}", task_queue=f"down-{uuid.uuid4().hex[:8]}")
    settings = api_settings(tmp_path / "state", temporal, runbooks_dir, temporal_timeout_s=2.0)
    service = f"down-{uuid.uuid4().hex[:6]}"
    incident = f"shop.{service}.error-rate"
    body = alertmanager_body([{"labels": labels("HighErrorRate", service), "fingerprint": "feedfacecafebeef"}])
    url = "/v1/alerts/alertmanager"

    async with ApiServer(settings, lambda: connect(temporal)) as api:
        # 1. Temporal has never been up: the API runs, says so, and refuses with 503.
        health = (await http.get(f"{api.url}/healthz")).json()
        assert health["status"] == "ok" and health["temporal"] == "unreachable"
        down = await http.post(api.url + url, content=body, headers=bearer())
        assert down.status_code == 503, down.text
        assert down.headers["retry-after"] and "Temporal" in down.json()["error"]
        assert (await http.get(f"{api.url}/v1/incidents", headers=bearer())).status_code == 503
        # An alert no runbook matches needs no Temporal: it is recorded and accepted.
        unrouted = alertmanager_body([{"labels": labels("NobodyHandlesThis", service), "fingerprint": "ab"}])
        assert (await http.post(api.url + url, content=unrouted, headers=bearer())).status_code == 202

        # 2. Temporal comes up: the sender's retry of the same delivery is accepted.
        env = await start_dev_server(tmp_path / "temporal.db", port=port)
        try:
            up = await http.post(api.url + url, content=body, headers=bearer())
            assert up.status_code == 202, up.text
            assert up.json()["incident_ids"] == [incident]
            assert await _signals(env.client, incident) == 1  # the 503 delivered nothing
        finally:
            await env.shutdown()

        # 3. Temporal goes away under a connected client: 503 again, within the deadline.
        again = await http.post(api.url + url, content=body, headers=bearer())
        assert again.status_code == 503, again.text
        assert (await http.get(f"{api.url}/healthz")).json()["temporal"] == "unreachable"

        # 4. Back on the same database: the retry joins the same incident, and only 202s were counted.
        env = await start_dev_server(tmp_path / "temporal.db", port=port)
        try:
            retried = await http.post(api.url + url, content=body, headers=bearer())
            assert retried.status_code == 202, retried.text
            assert retried.json()["incidents"][0]["run_id"] == up.json()["incidents"][0]["run_id"]
            assert await _signals(env.client, incident) == 2
            assert (await http.get(f"{api.url}/healthz")).json()["temporal"] == "ok"
        finally:
            await env.shutdown()
