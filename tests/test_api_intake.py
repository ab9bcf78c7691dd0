"""The intake API end to end: real dev server, real worker, real broker and fleet, real HTTP.

Every shared fixture goes on the wire as its exact bytes and gets the answer
fixtures_index.json expects; then dedup, unrouted, refused, re-fire and the
read endpoints.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from api_harness import (
    INDEX,
    PD_FIXTURES_MAX_AGE_S,
    alertmanager_body,
    bearer,
    fixture,
    fresh_pagerduty,
    grafana_headers,
    incident_status,
    labels,
    now_stamp,
    pd_headers,
    running_api,
    start_dev_server,
    wait_status,
)
from demo.fleet import FleetServer
from firebreak import signing
from firebreak.api import ApiServer
from firebreak.api.sources import alertmanager_fingerprint
from firebreak.broker.server import BrokerServer
from conftest import worker_settings_for
from firebreak.config import Settings
from firebreak.contracts import IncidentInput
from firebreak.temporal import DATA_CONVERTER

CHECKOUT = "shop.checkout.error-rate"


@pytest.fixture(scope="module")
async def temporal(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WorkflowEnvironment]:
    # A server of this module's own: the fixtures open incidents with fixed ids.
    env = await start_dev_server(tmp_path_factory.mktemp("temporal-intake") / "temporal.db")
    yield env
    await env.shutdown()


@pytest.fixture(scope="module")
def module_fleet(broker: BrokerServer) -> Iterator[FleetServer]:
    verifier = signing.TargetVerifier.from_broker(broker.url, "fleet")
    with FleetServer(verifier=verifier, chaos_token="test-chaos") as server:
        # A recent deploy on every service: DrillRollback incidents then wait for approval (and stay open).
        for service in ("checkout", "payments", "inventory"):
            server.fleet.inject(service, "bad_deploy")
        yield server


@pytest.fixture(scope="module")
def worker_settings(state_dir: Path, runbooks_dir: Path, broker: BrokerServer, module_fleet: FleetServer) -> Settings:
    return worker_settings_for(state_dir, runbooks_dir, broker, module_fleet, queue_prefix="api")


@pytest.fixture(scope="module")
async def api(temporal: WorkflowEnvironment, worker_settings: Settings,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ApiServer]:
    # The shared PagerDuty fixtures go on the wire as recorded, long ago: the window covers their age.
    async with running_api(temporal.client, worker_settings, tmp_path_factory.mktemp("api-state"),
                           pagerduty_max_age_s=PD_FIXTURES_MAX_AGE_S) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


# -- every shared fixture, as the index says ----------------------------------------------

ENDPOINT = {
    "alertmanager": "/v1/alerts/alertmanager",
    "grafana": "/v1/alerts/grafana",
    "pagerduty-v3": "/v1/alerts/pagerduty",
    "none": "/v1/alerts/alertmanager",
    # Opsgenie is not a supported source (the index marks it optional): sent to the
    # Alertmanager endpoint it is a body of the wrong shape, 400 naming the field.
    "opsgenie": "/v1/alerts/alertmanager",
}


def _headers(entry: dict[str, Any], body: bytes) -> dict[str, str]:
    if entry["system"] == "pagerduty-v3":
        return pd_headers(body, webhook_id=f"wh-{uuid.uuid4().hex}")
    if entry["system"] == "grafana":
        return grafana_headers(body, timestamp=now_stamp())
    return bearer()


EXPECTED_STATUS = {
    "opsgenie_alert_create.json": 400,
    "hostile_promql_breakout.json": 422,
}


@pytest.mark.parametrize("entry", INDEX["fixtures"], ids=[e["file"] for e in INDEX["fixtures"]])
async def test_fixture_gets_the_answer_the_index_expects(api: ApiServer, http: httpx.AsyncClient,
                                                          temporal: WorkflowEnvironment, entry: dict[str, Any]) -> None:
    body = fixture(entry["file"])
    response = await http.post(api.url + ENDPOINT[entry["system"]], content=body, headers=_headers(entry, body))
    expected = EXPECTED_STATUS.get(entry["file"]) or (202 if entry["expect"].startswith("accept") else 400)
    assert response.status_code == expected, response.text
    answer = response.json()
    name = entry["file"]

    if expected == 202:
        assert answer["status"] == "accepted"
        assert answer["counts"]["alerts"] == len(json.loads(body).get("alerts", [None]))
    if name in ("alertmanager_firing_high_error_rate.json", "pagerduty_v3_incident_triggered.json"):
        # PagerDuty's derived labels (HighErrorRate, checkout, shop) join the same incident as Alertmanager's.
        assert answer["incident_ids"] == [CHECKOUT]
        assert answer["incidents"][0]["runbook"] == "bad-deploy" and answer["incidents"][0]["run_id"]
    elif name == "alertmanager_saturation.json":
        # Two alert names, one incident, ONE signal carrying both alerts.
        assert answer["incident_ids"] == ["shop.inventory.saturation"]
        assert answer["incidents"][0]["alerts"] == 2
    elif name == "alertmanager_group_mixed.json":
        assert answer["counts"] == {"alerts": 3, "routed": 0, "unrouted": 3, "refused": 0}
    elif name == "edge_alertmanager_500_alerts.json":
        assert answer["counts"]["unrouted"] == 500 and len(answer["unrouted"]) == 100
    elif name == "grafana_firing.json":
        assert answer["counts"]["unrouted"] == 1
        assert answer["unrouted"][0]["fingerprint"] == "07f718fac60c69f3"
    elif name in ("alertmanager_resolved_high_error_rate.json", "pagerduty_v3_incident_resolved.json"):
        # Resolved alerts reach the open run, or are skipped when nothing is open: never a new incident.
        [incident] = answer["incidents"]
        assert incident["incident_id"] == CHECKOUT
        assert incident["skipped"] or incident["run_id"]
    elif name == "edge_missing_required_fields.json":
        fields = {e["field"] for e in answer["errors"]}
        assert {"version", "groupKey", "status", "alerts[0].fingerprint", "alerts[0].status",
                "alerts[0].labels.alertname", "alerts[1].labels", "alerts[1].startsAt"} <= fields
        assert answer["field"] == "version"
    elif name == "edge_not_json.txt":
        assert answer["field"] == "body" and "not JSON" in answer["error"]
    elif name == "hostile_promql_breakout.json":
        assert answer["field"] == "alerts[0].labels.service"
        assert "does not match" in answer["error"]
        # Nothing started: no workflow carries the hostile value, nor any other new id.
        ids = [wf.id async for wf in temporal.client.list_workflows("WorkflowType = 'IncidentWorkflow'")]
        assert all("vector" not in i and '"' not in i for i in ids)
        refused = (await http.get(f"{api.url}/v1/unrouted", params={"kind": "refused"}, headers=bearer())).json()
        assert refused["items"][-1]["field"] == "alerts[0].labels.service"
        assert refused["items"][-1]["alert"]["fingerprint"] == "5f1d3b2a9c8e7d60"


# -- dedup ----------------------------------------------------------------------------------


async def test_same_alert_fifty_times_at_once_is_one_incident_counting_fifty(
    api: ApiServer, http: httpx.AsyncClient, temporal: WorkflowEnvironment
) -> None:
    body = alertmanager_body([{"labels": labels("DrillRollback", "payments"), "fingerprint": "aaaabbbbccccdddd"}])
    responses = await asyncio.gather(*[
        http.post(f"{api.url}/v1/alerts/alertmanager", content=body, headers=bearer()) for _ in range(50)
    ])
    assert [r.status_code for r in responses] == [202] * 50, [r.text for r in responses if r.status_code != 202]
    assert {tuple(r.json()["incident_ids"]) for r in responses} == {("payments.drill-rollback",)}
    assert len({r.json()["incidents"][0]["run_id"] for r in responses}) == 1

    status = await wait_status(http, api, "payments.drill-rollback", lambda s: s["alerts_received"] == 50)
    assert status["firing"] == ["aaaabbbbccccdddd"]
    runs = [wf async for wf in temporal.client.list_workflows("WorkflowId = 'payments.drill-rollback'")]
    assert len(runs) == 1


async def test_pagerduty_retry_with_the_same_webhook_id_is_answered_once(
    api: ApiServer, http: httpx.AsyncClient
) -> None:
    # A new event (the fixture's own id was processed above): its retries share its X-Webhook-Id.
    body = fresh_pagerduty("pagerduty_v3_incident_triggered.json")
    webhook_id = f"wh-{uuid.uuid4().hex}"
    first, *retries = await asyncio.gather(*[
        http.post(f"{api.url}/v1/alerts/pagerduty", content=body, headers=pd_headers(body, webhook_id))
        for _ in range(5)
    ])
    answers = sorted([first, *retries], key=lambda r: r.json()["status"])
    assert [r.status_code for r in answers] == [202] * 5
    assert [r.json()["status"] for r in answers] == ["accepted"] + ["duplicate"] * 4
    before = await incident_status(http, api, CHECKOUT)
    again = await http.post(f"{api.url}/v1/alerts/pagerduty", content=body, headers=pd_headers(body, webhook_id))
    assert again.json()["status"] == "duplicate"
    assert (await incident_status(http, api, CHECKOUT))["alerts_received"] == before["alerts_received"]


# -- unrouted, refused, mixed -------------------------------------------------------------


async def test_alert_matching_no_runbook_is_accepted_recorded_and_listed(
    api: ApiServer, http: httpx.AsyncClient, temporal: WorkflowEnvironment
) -> None:
    fingerprint = uuid.uuid4().hex[:16]
    body = alertmanager_body([{"labels": labels("NobodyHandlesThis", "payments"), "fingerprint": fingerprint}])
    response = await http.post(f"{api.url}/v1/alerts/alertmanager", content=body, headers=bearer())
    assert response.status_code == 202
    assert response.json()["incident_ids"] == []
    assert response.json()["unrouted"][0]["reason"] == "no runbook matches alertname 'NobodyHandlesThis'"

    listed = (await http.get(f"{api.url}/v1/unrouted", headers=bearer())).json()["items"]
    [record] = [r for r in listed if r["alert"]["fingerprint"] == fingerprint]
    assert record["kind"] == "unrouted" and record["source"] == "alertmanager"
    assert record["delivery_id"] == response.json()["delivery_id"]
    # On disk, one JSON line each, private to the service.
    path = api.app.state.settings.api_dir / "unrouted.jsonl"
    assert path.stat().st_mode & 0o077 == 0
    assert any(json.loads(line)["alert"]["fingerprint"] == fingerprint for line in path.read_text().splitlines())


async def test_mixed_delivery_delivers_the_good_alerts_and_records_the_refused_one(
    api: ApiServer, http: httpx.AsyncClient, temporal: WorkflowEnvironment
) -> None:
    service = f"mixed-{uuid.uuid4().hex[:6]}"
    hostile = 'checkout"} or vector(1) or {a="'
    body = alertmanager_body([
        {"labels": labels("HighErrorRate", service), "fingerprint": "1111222233334444"},
        {"labels": labels("HighErrorRate", hostile), "fingerprint": "5555666677778888"},
        {"labels": labels("NobodyHandlesThis", service), "fingerprint": "9999aaaabbbbcccc"},
    ])
    response = await http.post(f"{api.url}/v1/alerts/alertmanager", content=body, headers=bearer())
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["incident_ids"] == [f"shop.{service}.error-rate"]
    assert answer["counts"] == {"alerts": 3, "routed": 1, "unrouted": 1, "refused": 1}
    [refused] = answer["refused"]
    assert refused["field"] == "alerts[1].labels.service" and refused["runbook"] == "bad-deploy"
    assert refused["fingerprint"] == "5555666677778888"
    # The good alert opened its incident; the hostile one opened nothing and reached no query.
    await temporal.client.get_workflow_handle(f"shop.{service}.error-rate").describe()
    ids = [wf.id async for wf in temporal.client.list_workflows("WorkflowType = 'IncidentWorkflow'")]
    assert not any("vector" in i for i in ids)
    listed = (await http.get(f"{api.url}/v1/unrouted", params={"kind": "refused"}, headers=bearer())).json()
    assert listed["items"][-1]["alert"]["labels"]["service"] == hostile


async def test_every_alert_refused_is_422_naming_the_field_and_starts_nothing(
    api: ApiServer, http: httpx.AsyncClient
) -> None:
    body = json.dumps([
        {"fingerprint": "f1", "labels": {"alertname": "HighErrorRate", "namespace": "shop", "service": "a b"}},
    ]).encode()
    response = await http.post(f"{api.url}/v1/alerts", content=body, headers=bearer())
    assert response.status_code == 422
    assert response.json()["field"] == "[0].labels.service"


# -- resolve, close, re-fire -----------------------------------------------------------------


async def test_resolved_before_approval_closes_auto_resolved_and_a_refire_opens_a_linked_run(
    api: ApiServer, http: httpx.AsyncClient, temporal: WorkflowEnvironment
) -> None:
    incident = "inventory.drill-rollback"
    # The fingerprint Alertmanager gives these labels: only then does the resolved alert count.
    alert = {"labels": labels("DrillRollback", "inventory"),
             "fingerprint": alertmanager_fingerprint(labels("DrillRollback", "inventory"))}
    first = await http.post(f"{api.url}/v1/alerts/alertmanager", content=alertmanager_body([alert]), headers=bearer())
    assert first.status_code == 202
    first_run = first.json()["incidents"][0]["run_id"]
    await wait_status(http, api, incident, lambda s: s["phase"] == "awaiting_approval")

    resolved = await http.post(f"{api.url}/v1/alerts/alertmanager", headers=bearer(),
                               content=alertmanager_body([alert | {"status": "resolved"}]))
    assert resolved.status_code == 202 and resolved.json()["incidents"][0]["run_id"] == first_run
    closed = await wait_status(http, api, incident, lambda s: s["phase"] == "auto_resolved")
    assert closed["steps"] == [] and closed["alerts_received"] == 2 and closed["firing"] == []
    # The phase is set just before the run closes: wait for the close itself.
    await temporal.client.get_workflow_handle(incident, run_id=first_run).result()

    # Resolved again, with nothing open: accepted, skipped, no new run.
    late = await http.post(f"{api.url}/v1/alerts/alertmanager", headers=bearer(),
                           content=alertmanager_body([alert | {"status": "resolved"}]))
    assert late.json()["incidents"][0]["skipped"] and late.json()["incident_ids"] == []

    refire = await http.post(f"{api.url}/v1/alerts/alertmanager", content=alertmanager_body([alert]), headers=bearer())
    assert refire.status_code == 202
    [ref] = refire.json()["incidents"]
    assert ref["previous_run_id"] == first_run and ref["run_id"] != first_run
    # The new run's input names the closed run.
    history = await temporal.client.get_workflow_handle(incident, run_id=ref["run_id"]).fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    [incident_input] = DATA_CONVERTER.payload_converter.from_payloads(started.input.payloads, [IncidentInput])
    assert incident_input.previous_run_id == first_run
    # The earlier run is still readable by its run id.
    old = await incident_status(http, api, incident, run_id=first_run)
    assert old["phase"] == "auto_resolved"


# -- reads ------------------------------------------------------------------------------------


async def test_incident_list_shows_phase_service_and_runbook(api: ApiServer, http: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 20
    while True:  # visibility is eventually consistent
        response = await http.get(f"{api.url}/v1/incidents", params={"service": "payments"}, headers=bearer())
        assert response.status_code == 200, response.text
        found = [i for i in response.json()["incidents"] if i["incident_id"] == "payments.drill-rollback"]
        if found and found[0]["phase"] == "awaiting_approval" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    [item] = found
    assert item["phase"] == "awaiting_approval" and item["runbook"] == "drill-rollback"
    assert item["execution_status"] == "RUNNING" and item["service"] == "payments"

    by_phase = await http.get(f"{api.url}/v1/incidents", params={"phase": "awaiting_approval", "open": "true"},
                              headers=bearer())
    assert "payments.drill-rollback" in [i["incident_id"] for i in by_phase.json()["incidents"]]


async def test_read_endpoints_refuse_bad_input_and_missing_tokens(api: ApiServer, http: httpx.AsyncClient) -> None:
    assert (await http.get(f"{api.url}/v1/incidents")).status_code == 401
    assert (await http.get(f"{api.url}/v1/unrouted")).status_code == 401
    missing = await http.get(f"{api.url}/v1/incidents/no.such.incident", headers=bearer())
    assert missing.status_code == 404 and missing.json()["field"] == "path.incident_id"
    injected = await http.get(f"{api.url}/v1/incidents", params={"service": "x' OR WorkflowId != '"},
                              headers=bearer())
    assert injected.status_code == 400 and injected.json()["field"] == "query.service"
    bad_phase = await http.get(f"{api.url}/v1/incidents", params={"phase": "nope"}, headers=bearer())
    assert bad_phase.status_code == 400
    health = (await http.get(f"{api.url}/healthz")).json()
    assert health == {"status": "ok", "temporal": "ok", "runbooks": health["runbooks"]} and health["runbooks"] >= 3
    spec = (await http.get(f"{api.url}/openapi.json")).json()
    body_schema = spec["paths"]["/v1/alerts"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema["type"] == "array" and "Alert" in spec["components"]["schemas"]
    assert "AlertmanagerWebhook" in json.dumps(spec["paths"]["/v1/alerts/alertmanager"])

