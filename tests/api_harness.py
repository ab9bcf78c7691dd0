"""Helpers for the API tests: a real dev server, the real worker and the API in-process.

Plain functions and context managers; each test module builds its own module-scoped
fixtures from them, so modules that send the shared fixtures' fixed incident ids do
not meet each other's workflows.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import Client

from firebreak.api import ApiServer, ApiSettings
from firebreak.api.auth import grafana_signature, pagerduty_signature
from firebreak.config import Settings, TemporalSettings
from conftest import start_dev_server  # noqa: F401 - the API tests start their own servers with it

# A copy of ../shared/fixtures: real webhook bodies, byte for byte, so the suite runs anywhere.
FIXTURES = Path(__file__).resolve().parent / "data" / "webhooks"
INDEX: dict[str, Any] = json.loads((FIXTURES / "fixtures_index.json").read_text())
PD_SECRET: str = INDEX["pagerduty_test_secret"]
GRAFANA_SECRET: str = INDEX["grafana_test_secret"]
TOKEN = "test-intake-token-" + uuid.uuid4().hex


def _pd_fixture_age_s() -> float:
    occurred = [json.loads((FIXTURES / e["file"]).read_bytes())["event"]["occurred_at"]
                for e in INDEX["fixtures"] if e["system"] == "pagerduty-v3"]
    oldest = min(datetime.fromisoformat(o.replace("Z", "+00:00")) for o in occurred)
    return (datetime.now(timezone.utc) - oldest).total_seconds()


# The real PagerDuty fixtures were recorded long ago: a module that sends them as their exact bytes
# widens the freshness window to their age (plus a day), and nothing more.
PD_FIXTURES_MAX_AGE_S: float = _pd_fixture_age_s() + 86_400


def fixture(name: str) -> bytes:
    """The exact bytes on the wire."""
    return (FIXTURES / name).read_bytes()


def fresh_pagerduty(name: str, **data: Any) -> bytes:
    """A PagerDuty fixture as a new event: its own new id, occurred now (``data`` updates ``event.data``)."""
    body = json.loads(fixture(name))
    body["event"]["id"] = "01" + uuid.uuid4().hex[:24].upper()
    body["event"]["occurred_at"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    body["event"]["data"].update(data)
    return json.dumps(body, separators=(",", ":")).encode()


def now_stamp() -> str:
    """A Grafana timestamp header value for now."""
    return str(int(time.time()))


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def pd_headers(body: bytes, webhook_id: str | None = None, secret: str = PD_SECRET) -> dict[str, str]:
    headers = {"X-PagerDuty-Signature": pagerduty_signature(secret, body), "Content-Type": "application/json"}
    if webhook_id:
        headers["X-Webhook-Id"] = webhook_id
    return headers


def grafana_headers(body: bytes, timestamp: str | None = None, secret: str = GRAFANA_SECRET) -> dict[str, str]:
    headers = {"X-Grafana-Alerting-Signature": grafana_signature(secret, body, timestamp),
               "Content-Type": "application/json"}
    if timestamp is not None:
        headers["X-Grafana-Alerting-Timestamp"] = timestamp
    return headers


def api_settings(state_dir: Path, temporal: TemporalSettings, runbooks_dir: Path, **overrides: Any) -> ApiSettings:
    values: dict[str, Any] = {
        "state_dir": state_dir,
        "temporal": temporal,
        "runbooks_dir": runbooks_dir,
        "intake_tokens": [TOKEN],
        "pagerduty_secrets": [PD_SECRET],
        "grafana_secrets": [GRAFANA_SECRET],
    }
    values.update(overrides)
    return ApiSettings.model_validate(values)


def client_factory(client: Client):  # noqa: ANN201 - a ClientFactory
    async def factory() -> Client:
        return client

    return factory


@asynccontextmanager
async def running_api(client: Client, settings: Settings, state_dir: Path, *, worker: bool = True,
                      **overrides: Any) -> AsyncIterator[ApiServer]:
    """The API (and, unless ``worker=False``, the real worker) on ``settings``' task queue."""
    api = ApiServer(api_settings(state_dir, settings.temporal, settings.resolved_runbooks_dir(), **overrides),
                    client_factory(client))
    if not worker:
        async with api:
            yield api
        return
    from worker import build_worker

    async with build_worker(client, settings), api:
        yield api


async def incident_status(http: httpx.AsyncClient, api: ApiServer, incident_id: str,
                          run_id: str | None = None) -> dict[str, Any]:
    params = {"run_id": run_id} if run_id else None
    response = await http.get(f"{api.url}/v1/incidents/{incident_id}", headers=bearer(), params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def wait_status(http: httpx.AsyncClient, api: ApiServer, incident_id: str, predicate: Any,
                      timeout: float = 30.0, run_id: str | None = None) -> dict[str, Any]:
    """Poll ``GET /v1/incidents/{id}`` until ``predicate(status)``."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        response = await http.get(f"{api.url}/v1/incidents/{incident_id}", headers=bearer(),
                                  params={"run_id": run_id} if run_id else None)
        if response.status_code == 200:
            last = response.json()
            if predicate(last):
                return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"{incident_id}: condition not met in {timeout}s; last status {last}")


def alertmanager_body(alerts: list[dict[str, Any]], group_key: str = "{}:{}") -> bytes:
    """An Alertmanager v4 body around ``alerts`` (each: labels, status, fingerprint)."""
    # Now: diagnosis looks for changes shortly before the alert started.
    now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    return json.dumps({
        "receiver": "firebreak", "status": "firing", "version": "4", "groupKey": group_key, "truncatedAlerts": 0,
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am",
        "alerts": [{"status": a.get("status", "firing"), "labels": a["labels"], "annotations": {},
                    "startsAt": now, "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "",
                    "fingerprint": a["fingerprint"]} for a in alerts],
    }).encode()


def labels(alertname: str, service: str, **extra: str) -> dict[str, str]:
    return {"alertname": alertname, "namespace": "shop", "service": service, "severity": "critical", **extra}
