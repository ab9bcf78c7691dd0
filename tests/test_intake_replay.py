"""Intake that cannot be replayed or spoofed (issue 24), through the real API, worker, broker and fleet.

Each attack is refused with its reason, recorded where refused alerts go (``GET /v1/unrouted``), and
opens or closes nothing: the incident it aims at gets no signal (its history is read to be sure).
The legitimate flow next to each attack still goes through.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from api_harness import (
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
from conftest import worker_settings_for
from demo.fleet import FleetServer
from demo.prom import AlertmanagerProcess, find_binary, free_port
from firebreak import signing
from firebreak.api import ApiServer
from firebreak.api.sources import alertmanager_fingerprint
from firebreak.broker.server import BrokerServer
from firebreak.config import Settings
from firebreak.contracts import ApprovalRecord, Finding, Hypothesis, StepResult
from workflows.summary import plan_markdown, status_markdown

PD_TRIGGERED = "pagerduty_v3_incident_triggered.json"


@pytest.fixture(scope="module")
async def temporal(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WorkflowEnvironment]:
    env = await start_dev_server(tmp_path_factory.mktemp("temporal-replay") / "temporal.db")
    yield env
    await env.shutdown()


@pytest.fixture(scope="module")
def module_fleet(broker: BrokerServer) -> Iterator[FleetServer]:
    verifier = signing.TargetVerifier.from_broker(broker.url, "fleet")
    with FleetServer(verifier=verifier, chaos_token="test-chaos") as server:
        # A recent deploy: a DrillRollback incident then waits for approval, and stays open.
        server.fleet.inject("inventory", "bad_deploy")
        yield server


@pytest.fixture(scope="module")
def worker_settings(state_dir: Path, runbooks_dir: Path, broker: BrokerServer, module_fleet: FleetServer) -> Settings:
    return worker_settings_for(state_dir, runbooks_dir, broker, module_fleet, queue_prefix="replay")


@pytest.fixture(scope="module")
async def api(temporal: WorkflowEnvironment, worker_settings: Settings,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ApiServer]:
    # The default freshness window (48 h): every PagerDuty body here is a new event, made now.
    async with running_api(temporal.client, worker_settings, tmp_path_factory.mktemp("api-replay")) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


# -- helpers ------------------------------------------------------------------------------------


def service_name() -> str:
    return f"replay-{uuid.uuid4().hex[:8]}"


async def signals(temporal: WorkflowEnvironment, incident_id: str) -> int:
    """How many alert signals the incident's runs received (signal-with-start records its signal too)."""
    count = 0
    async for wf in temporal.client.list_workflows(f"WorkflowId = '{incident_id}'"):
        history = await temporal.client.get_workflow_handle(incident_id, run_id=wf.run_id).fetch_history()
        count += sum(1 for e in history.events
                     if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
                     and e.workflow_execution_signaled_event_attributes.signal_name == "alert")
    return count


async def exists(temporal: WorkflowEnvironment, incident_id: str) -> bool:
    try:
        await temporal.client.get_workflow_handle(incident_id).describe()
        return True
    except RPCError as exc:
        assert exc.status == RPCStatusCode.NOT_FOUND, exc
        return False


async def refused_records(http: httpx.AsyncClient, api: ApiServer, fingerprint: str) -> list[dict[str, Any]]:
    listed = await http.get(f"{api.url}/v1/unrouted", params={"kind": "refused", "limit": 10_000}, headers=bearer())
    assert listed.status_code == 200, listed.text
    return [r for r in listed.json()["items"] if r["alert"]["fingerprint"] == fingerprint]


def pd_body(service: str, **data: Any) -> bytes:
    """A new PagerDuty event (the real fixture, new id, now) for ``service`` in shop/prod."""
    summary = {"summary": f"{service} (shop/prod)", "id": "P7CHKT2"}
    return fresh_pagerduty(PD_TRIGGERED, service=summary, incident_key=uuid.uuid4().hex, **data)


def grafana_body(service: str) -> bytes:
    """The real Grafana body, its alert renamed to one a runbook handles, for ``service``."""
    body = json.loads(fixture("grafana_firing.json"))
    body["alerts"][0]["labels"] |= {"alertname": "HighErrorRate", "service": service}
    body["alerts"][0]["fingerprint"] = uuid.uuid4().hex[:16]
    return json.dumps(body, separators=(",", ":")).encode()


_CODE_SPAN = re.compile(r"(?<!\\)(`+)(.+?)(?<!`)\1(?!`)", re.S)


def assert_inert(markdown: str) -> None:
    """No raw HTML, no autolink, no link or image: outside code spans, every '<' and every '](' ,
    ']:' or '][' is escaped. (The only '[' left are the card's own, like '# [awaiting_approval]'.)"""
    text = _CODE_SPAN.sub("", markdown)
    unescaped = re.compile(r"(?<!\\)(?:\\\\)*")
    assert not re.search(unescaped.pattern + r"<", text), text
    assert not re.search(unescaped.pattern + r"\][(:\[]", text), text


def unescape(markdown: str) -> str:
    return re.sub(r"\\(.)", r"\1", markdown)


# -- PagerDuty ------------------------------------------------------------------------------------


async def test_a_pagerduty_event_under_a_new_webhook_id_is_a_recorded_duplicate(
    api: ApiServer, http: httpx.AsyncClient, temporal: WorkflowEnvironment
) -> None:
    service = service_name()
    incident = f"shop.{service}.error-rate"
    body = pd_body(service)
    url = f"{api.url}/v1/alerts/pagerduty"
    first = await http.post(url, content=body, headers=pd_headers(body, webhook_id=f"wh-{uuid.uuid4().hex}"))
    assert first.status_code == 202 and first.json()["incident_ids"] == [incident], first.text
    fingerprint = json.loads(body)["event"]["data"]["incident_key"]
    before = await signals(temporal, incident)
    assert before == 1

    # The same signed body, replayed under another X-Webhook-Id, and with none at all.
    for headers in (pd_headers(body, webhook_id=f"wh-{uuid.uuid4().hex}"), pd_headers(body)):
        replay = await http.post(url, content=body, headers=headers)
        assert replay.status_code == 202, replay.text
        answer = replay.json()
        assert answer["status"] == "duplicate" and answer["incident_ids"] == []
        assert "already processed under another X-Webhook-Id" in answer["detail"]
        assert answer["refused"][0]["field"] == "event.id"
    assert await signals(temporal, incident) == before
    records = await refused_records(http, api, fingerprint)
    assert len(records) == 2 and all(r["field"] == "event.id" and "already processed" in r["reason"] for r in records)

    # PagerDuty's own retry (the same X-Webhook-Id) is a duplicate too, but not a replay: not recorded again.
    retry_id = f"wh-{uuid.uuid4().hex}"
    other = pd_body(service)
    assert (await http.post(url, content=other, headers=pd_headers(other, retry_id))).json()["status"] == "accepted"
    again = await http.post(url, content=other, headers=pd_headers(other, retry_id))
    assert again.json()["status"] == "duplicate" and again.json()["refused"] == []
    assert await refused_records(http, api, json.loads(other)["event"]["data"]["incident_key"]) == []


async def test_a_stale_or_future_pagerduty_event_is_refused_recorded_and_opens_nothing(
    api: ApiServer, http: httpx.AsyncClient, temporal: WorkflowEnvironment
) -> None:
    window = api.app.state.settings.pagerduty_max_age_s
    for offset in (timedelta(seconds=-window - 60), timedelta(hours=1)):
        service = service_name()
        event = json.loads(pd_body(service))
        occurred = datetime.now(timezone.utc) + offset
        event["event"]["occurred_at"] = occurred.isoformat().replace("+00:00", "Z")
        body = json.dumps(event).encode()
        response = await http.post(f"{api.url}/v1/alerts/pagerduty", content=body,
                                   headers=pd_headers(body, webhook_id=f"wh-{uuid.uuid4().hex}"))
        assert response.status_code == 422, response.text
        assert response.json()["field"] == "event.occurred_at" and "freshness window" in response.json()["error"]
        assert not await exists(temporal, f"shop.{service}.error-rate")
        [record] = await refused_records(http, api, event["event"]["data"]["incident_key"])
        assert record["field"] == "event.occurred_at" and "outside the freshness window" in record["reason"]


async def test_a_stale_resolved_pagerduty_event_closes_nothing(
    api: ApiServer, http: httpx.AsyncClient, temporal: WorkflowEnvironment
) -> None:
    service = service_name()
    incident = f"shop.{service}.error-rate"
    key = uuid.uuid4().hex
    summary = {"summary": f"{service} (shop/prod)", "id": "P7CHKT2"}
    opened = fresh_pagerduty(PD_TRIGGERED, service=summary, incident_key=key)
    assert (await http.post(f"{api.url}/v1/alerts/pagerduty", content=opened,
                            headers=pd_headers(opened))).json()["incident_ids"] == [incident]
    before = await signals(temporal, incident)
    resolved = json.loads(fresh_pagerduty("pagerduty_v3_incident_resolved.json", service=summary, incident_key=key))
    resolved["event"]["occurred_at"] = "2025-11-18T14:21:38.016Z"  # the fixture's own, a year old
    body = json.dumps(resolved).encode()
    response = await http.post(f"{api.url}/v1/alerts/pagerduty", content=body, headers=pd_headers(body))
    assert response.status_code == 422 and response.json()["field"] == "event.occurred_at"
    assert await signals(temporal, incident) == before
    assert key in (await incident_status(http, api, incident))["firing"]


# -- Grafana ---------------------------------------------------------------------------------------


async def test_grafana_without_a_timestamp_is_refused_and_a_replay_is_a_recorded_duplicate(
    api: ApiServer, http: httpx.AsyncClient, temporal: WorkflowEnvironment
) -> None:
    service = service_name()
    incident = f"shop.{service}.error-rate"
    body = grafana_body(service)
    fingerprint = json.loads(body)["alerts"][0]["fingerprint"]
    url = f"{api.url}/v1/alerts/grafana"

    # Signed, but over the body alone: good for ever, so refused, and recorded (the signature was good).
    untimed = await http.post(url, content=body, headers=grafana_headers(body))
    assert untimed.status_code == 401, untimed.text
    assert untimed.json()["field"] == "headers.x-grafana-alerting-timestamp"
    # A bearer token alone is just as replayable.
    token_only = await http.post(url, content=body, headers=bearer())
    assert token_only.status_code == 401 and token_only.json()["field"] == "headers.x-grafana-alerting-signature"
    assert not await exists(temporal, incident)
    records = await refused_records(http, api, fingerprint)
    assert [r["field"] for r in records] == ["headers.x-grafana-alerting-timestamp",
                                             "headers.x-grafana-alerting-signature"]
    assert all("replay" in r["reason"] for r in records)

    # Signed over a timestamp: accepted once.
    headers = grafana_headers(body, timestamp=now_stamp())
    first = await http.post(url, content=body, headers=headers)
    assert first.status_code == 202 and first.json()["incident_ids"] == [incident], first.text
    assert await signals(temporal, incident) == 1
    # The same request again, inside the skew window: a duplicate, recorded, and no signal.
    replay = await http.post(url, content=body, headers=headers)
    assert replay.status_code == 202 and replay.json()["status"] == "duplicate", replay.text
    assert replay.json()["refused"][0]["field"] == "headers.x-grafana-alerting-signature"
    assert await signals(temporal, incident) == 1
    assert len(await refused_records(http, api, fingerprint)) == 3


async def test_a_grafana_replay_is_refused_after_an_api_restart(
    temporal: WorkflowEnvironment, worker_settings: Settings, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    service = service_name()
    body = grafana_body(service)
    headers = grafana_headers(body, timestamp=now_stamp())
    async with running_api(temporal.client, worker_settings, tmp_path, worker=False) as api:
        assert (await http.post(f"{api.url}/v1/alerts/grafana", content=body, headers=headers)).json()[
            "status"] == "accepted"
    async with running_api(temporal.client, worker_settings, tmp_path, worker=False) as api:
        replay = await http.post(f"{api.url}/v1/alerts/grafana", content=body, headers=headers)
        assert replay.json()["status"] == "duplicate", replay.text
    assert await signals(temporal, f"shop.{service}.error-rate") == 1


# -- a resolved alert with another label set ---------------------------------------------------------


async def test_a_resolved_alert_whose_labels_do_not_give_its_fingerprint_resolves_nothing(
    api: ApiServer, http: httpx.AsyncClient, temporal: WorkflowEnvironment
) -> None:
    incident = "inventory.drill-rollback"
    firing_labels = labels("DrillRollback", "inventory")
    real = alertmanager_fingerprint(firing_labels)
    url = f"{api.url}/v1/alerts/alertmanager"
    opened = await http.post(url, headers=bearer(),
                             content=alertmanager_body([{"labels": firing_labels, "fingerprint": real}]))
    assert opened.status_code == 202 and opened.json()["incident_ids"] == [incident], opened.text
    await wait_status(http, api, incident, lambda s: s["phase"] == "awaiting_approval")
    before = await signals(temporal, incident)

    # Another label set (it routes to the same incident) carrying the firing alert's fingerprint.
    spoof = {"labels": firing_labels | {"pod": "attacker"}, "fingerprint": real, "status": "resolved"}
    response = await http.post(url, headers=bearer(), content=alertmanager_body([spoof]))
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "alerts[0].fingerprint"
    assert "must be its labels' fingerprint" in response.json()["error"]
    # In a mixed delivery the spoof is refused alone; the good alert goes on.
    mixed = await http.post(url, headers=bearer(), content=alertmanager_body([
        {"labels": firing_labels | {"pod": "p2"}, "fingerprint": alertmanager_fingerprint(firing_labels | {"pod": "p2"})},
        spoof,
    ]))
    assert mixed.status_code == 202 and mixed.json()["counts"]["refused"] == 1, mixed.text
    assert mixed.json()["refused"][0]["field"] == "alerts[1].fingerprint"

    assert await signals(temporal, incident) == before + 1  # the good alert's signal only
    status = await incident_status(http, api, incident)
    assert status["phase"] == "awaiting_approval" and real in status["firing"]
    records = await refused_records(http, api, real)
    assert [r["field"] for r in records] == ["alerts[0].fingerprint", "alerts[1].fingerprint"]
    assert all(r["alert"]["labels"]["pod"] == "attacker" for r in records)

    # The real resolution (its own labels) still counts.
    real_resolved = await http.post(url, headers=bearer(), content=alertmanager_body([
        {"labels": firing_labels, "fingerprint": real, "status": "resolved"},
        {"labels": firing_labels | {"pod": "p2"}, "fingerprint": alertmanager_fingerprint(firing_labels | {"pod": "p2"}),
         "status": "resolved"},
    ]))
    assert real_resolved.status_code == 202 and real_resolved.json()["counts"]["refused"] == 0
    await wait_status(http, api, incident, lambda s: s["phase"] == "auto_resolved")


async def test_a_resolved_alert_in_firebreaks_own_format_is_held_to_the_same_fingerprint(
    api: ApiServer, http: httpx.AsyncClient
) -> None:
    alert = {"fingerprint": "0123456789abcdef", "status": "resolved", "labels": labels("HighErrorRate", "nowhere")}
    response = await http.post(f"{api.url}/v1/alerts", content=json.dumps([alert]).encode(), headers=bearer())
    assert response.status_code == 422 and response.json()["field"] == "[0].fingerprint", response.text


def test_the_fingerprint_is_alertmanagers_on_every_real_fixture() -> None:
    checked = 0
    for name in ("alertmanager_firing_high_error_rate.json", "alertmanager_resolved_high_error_rate.json",
                 "alertmanager_group_mixed.json", "alertmanager_saturation.json", "edge_alertmanager_500_alerts.json"):
        for alert in json.loads(fixture(name))["alerts"]:
            assert alertmanager_fingerprint(alert["labels"]) == alert["fingerprint"], (name, alert["labels"])
            checked += 1
    assert checked == 507
    assert alertmanager_fingerprint({}) == "cbf29ce484222325"  # prometheus/common's emptyLabelSignature


@pytest.mark.e2e
def test_the_fingerprint_is_the_one_the_real_alertmanager_computes(tmp_path: Path) -> None:
    assert find_binary("alertmanager"), "prometheus-alertmanager (Debian) is part of the stack"
    label_sets = [
        {"alertname": "HighErrorRate", "namespace": "shop", "service": "checkout", "severity": "critical"},
        {"alertname": "Ünïcødé", "service": "caf\u00e9 \u2603 \U0001f525", "quote": 'a"b\\c', "empty_ok": "x"},
        {"alertname": "Z", "a": "1", "B": "2", "_u": "3", "a_b": "<script>alert(1)</script>"},
    ]
    am = AlertmanagerProcess(tmp_path / "am", free_port(), "http://127.0.0.1:9/unused", "unused-token")
    try:
        am.start()
        am.wait_ready(30)
        assert am.web_auth is not None  # the stack's Alertmanager API takes only its own credentials
        posted = httpx.post(f"{am.url}/api/v2/alerts", json=[{"labels": ls} for ls in label_sets], timeout=5,
                            auth=am.web_auth.httpx())
        assert posted.status_code == 200, posted.text
        seen = {json.dumps(a["labels"], sort_keys=True): a["fingerprint"] for a in am.alerts()}
    finally:
        am.stop()
    for ls in label_sets:
        assert seen[json.dumps(ls, sort_keys=True)] == alertmanager_fingerprint(ls), ls


# -- hostile annotations -------------------------------------------------------------------------------

HOSTILE = {
    "summary": '<img src=x onerror="alert(1)"> **[open](javascript:alert(2))**',
    "description": "<script>alert(3)</script>\n[ref]: javascript:alert(4)\n<javascript:alert(5)> ![i](javascript:x) `a` & b",
}


async def test_a_hostile_annotation_renders_inert_in_the_ui_details(
    api: ApiServer, http: httpx.AsyncClient, temporal: WorkflowEnvironment
) -> None:
    service = service_name()
    incident = f"shop.{service}.error-rate"
    body = json.loads(alertmanager_body([{"labels": labels("HighErrorRate", service, severity="<b>x</b>"),
                                          "fingerprint": uuid.uuid4().hex[:16]}]))
    body["alerts"][0]["annotations"] = HOSTILE
    response = await http.post(f"{api.url}/v1/alerts/alertmanager", content=json.dumps(body).encode(),
                               headers=bearer())
    assert response.status_code == 202 and response.json()["incident_ids"] == [incident], response.text

    described = await temporal.client.get_workflow_handle(incident).describe()
    details, summary = await described.static_details(), await described.static_summary()
    assert details and summary
    for shown in (details, summary):
        assert_inert(shown)
    # What is shown is what was sent, character for character, once the escapes are read.
    assert HOSTILE["summary"] in unescape(details)
    for line in HOSTILE["description"].splitlines():
        assert line in unescape(details)
    assert "<b>x</b>" in unescape(summary)


async def test_hostile_text_renders_inert_in_the_card_and_the_ticket(
    api: ApiServer, http: httpx.AsyncClient
) -> None:
    """The incident's own status, read through the API, with sender-controlled text in every free field."""
    from firebreak.contracts import IncidentStatus

    incident = "inventory.drill-rollback"
    status = IncidentStatus.model_validate(await incident_status(http, api, incident))
    evil = "<a href='javascript:alert(1)'>x</a> [y](javascript:alert(2)) <javascript:alert(3)> `z`"
    at = datetime.now(timezone.utc)
    hostile = status.model_copy(update={
        "outcome": evil, "held": evil, "service": evil, "severity": evil, "requested_by": evil,
        "gaps": [evil], "sink_gaps": [evil], "reproposals": [evil], "refused_signals": [evil],
        "hypotheses": [Hypothesis(id="h", title=evil, score=0.5, actions=[], findings=[
            Finding(evidence="e", test="t", held=True, weight=1, detail=evil)])],
        "approvals": [ApprovalRecord(approver="mallory", decision="approve", counted=False, reason=evil,
                                     comment=evil, received_at=at, via="signal")],
        "steps": [StepResult(step_id="s1", action="a", status="failed", detail=evil, verification=evil)],
    })
    for shown in (status_markdown(hostile), plan_markdown(hostile)):
        assert_inert(shown)
        assert evil.replace("`z`", "") in unescape(shown)


# -- issue 28: per-alert isolation and test notifications, with real payloads (tests/fixtures/README.md) ----

REAL = Path(__file__).resolve().parent / "fixtures"
PING_SECRET = "HvPtlQNKMPpHSSqJpCdndXfo7HnGXa1pnH6w5axpxLFn9aRBNBGh4e8/HlonK5mz"  # public, from the ping's source
PING_SIGNATURE = "v1=0e83584cbab86f98c51517cf96a70c90e910532d3d2f067d58c753cc8980a05b"


async def test_an_alert_without_alertname_is_refused_alone_and_the_good_one_opens_its_incident(
    api: ApiServer, http: httpx.AsyncClient, temporal: WorkflowEnvironment
) -> None:
    body = (REAL / "alertmanager_one_alert_without_alertname.json").read_bytes()
    response = await http.post(f"{api.url}/v1/alerts/alertmanager", content=body, headers=bearer())
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["incident_ids"] == ["shop.inventory.saturation"]
    assert answer["counts"] == {"alerts": 2, "routed": 1, "unrouted": 0, "refused": 1}
    [refused] = answer["refused"]
    assert refused["field"] == "alerts[1].labels.alertname" and refused["fingerprint"] == "d266e3360084b4de"
    await temporal.client.get_workflow_handle("shop.inventory.saturation").describe()
    [record] = await refused_records(http, api, "d266e3360084b4de")
    assert record["field"] == "alerts[1].labels.alertname" and record["alert"]["labels"]["pod"]


async def test_a_grafana_alert_missing_its_fingerprint_is_refused_alone(
    api: ApiServer, http: httpx.AsyncClient
) -> None:
    service = service_name()
    good = json.loads(grafana_body(service))
    broken = json.loads(json.dumps(good["alerts"][0]))
    del broken["fingerprint"]
    broken["labels"]["service"] = f"{service}-x"
    good["alerts"].append(broken)
    body = json.dumps(good).encode()
    response = await http.post(f"{api.url}/v1/alerts/grafana", content=body,
                               headers=grafana_headers(body, timestamp=now_stamp()))
    assert response.status_code == 202, response.text
    assert response.json()["incident_ids"] == [f"shop.{service}.error-rate"]
    assert response.json()["counts"]["refused"] == 1
    assert response.json()["refused"][0]["field"] == "alerts[1].fingerprint"


async def test_grafanas_contact_point_test_gets_a_2xx_is_recorded_and_opens_nothing(
    api: ApiServer, http: httpx.AsyncClient, temporal: WorkflowEnvironment
) -> None:
    body = (REAL / "grafana_contact_point_test.json").read_bytes()
    before = [wf.id async for wf in temporal.client.list_workflows("WorkflowType = 'IncidentWorkflow'")]
    response = await http.post(f"{api.url}/v1/alerts/grafana", content=body,
                               headers=grafana_headers(body, timestamp=now_stamp()))
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "test" and response.json()["incident_ids"] == []
    listed = (await http.get(f"{api.url}/v1/unrouted", params={"kind": "test"}, headers=bearer())).json()["items"]
    assert any(r["alert"]["fingerprint"] == "57c6d9296de2ad39" and r["source"] == "grafana" for r in listed)
    after = [wf.id async for wf in temporal.client.list_workflows("WorkflowType = 'IncidentWorkflow'")]
    assert sorted(after) == sorted(before)


async def test_pagerdutys_ping_with_its_real_signature_gets_a_2xx_and_is_recorded(
    temporal: WorkflowEnvironment, worker_settings: Settings, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    body = (REAL / "pagerduty_v3_ping.json").read_bytes()
    occurred = datetime.fromisoformat(json.loads(body)["event"]["occurred_at"].replace("Z", "+00:00"))
    age = (datetime.now(timezone.utc) - occurred).total_seconds() + 86_400  # the capture's age, and no more
    async with running_api(temporal.client, worker_settings, tmp_path, worker=False,
                           pagerduty_secrets=[PING_SECRET], pagerduty_max_age_s=age) as api:
        response = await http.post(f"{api.url}/v1/alerts/pagerduty", content=body,
                                   headers={"X-PagerDuty-Signature": PING_SIGNATURE})
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "test" and response.json()["incident_ids"] == []
        listed = (await http.get(f"{api.url}/v1/unrouted", params={"kind": "test"}, headers=bearer())).json()
        assert [r["reason"] for r in listed["items"]] == ["pagerduty ping"]


async def test_utf8_label_names_are_accepted_and_shown_escaped(api: ApiServer, http: httpx.AsyncClient) -> None:
    from firebreak.api.sources import parse_alertmanager
    from firebreak.contracts import IncidentInput
    from firebreak.intake import route_alerts, run_details
    from firebreak.runbook import load_runbooks

    body = (REAL / "alertmanager_utf8_label_names.json").read_bytes()
    response = await http.post(f"{api.url}/v1/alerts/alertmanager", content=body, headers=bearer())
    assert response.status_code == 202, response.text
    assert response.json()["counts"] == {"alerts": 2, "routed": 2, "unrouted": 0, "refused": 0}
    # What the UI's details would show for this delivery: the names as sent, inert.
    [group] = route_alerts(load_runbooks(api.app.state.settings.runbooks_dir),
                           (sa.alert for sa in parse_alertmanager(body).alerts)).routed
    details = run_details(group, IncidentInput(incident_id=group.incident_id, runbook=group.runbook,
                                               params=group.params))
    assert_inert(details)
    assert "région=eu-west-1" in details and "service.name=inventory" in details
    assert "<img src=x onerror=alert(1)>=x" in details  # inside a code span: shown, never rendered


async def test_firebreaks_own_format_refuses_a_bad_alert_alone(api: ApiServer, http: httpx.AsyncClient) -> None:
    service = service_name()
    good = {"fingerprint": uuid.uuid4().hex[:16], "labels": labels("HighErrorRate", service)}
    bad = {"labels": labels("HighErrorRate", f"{service}-b"), "status": "burning"}
    response = await http.post(f"{api.url}/v1/alerts", content=json.dumps([bad, good]).encode(), headers=bearer())
    assert response.status_code == 202, response.text
    assert response.json()["incident_ids"] == [f"shop.{service}.error-rate"]
    assert response.json()["counts"] == {"alerts": 2, "routed": 1, "unrouted": 0, "refused": 1}
    assert response.json()["refused"][0]["field"] == "[0].fingerprint"
    assert "+1 more" in response.json()["refused"][0]["reason"]  # the status too


async def test_a_delivery_whose_every_alert_is_unreadable_is_refused_naming_the_field_and_recorded(
    api: ApiServer, http: httpx.AsyncClient
) -> None:
    body = json.loads(alertmanager_body([{"labels": labels("HighErrorRate", service_name()), "fingerprint": "x"}]))
    fingerprint = uuid.uuid4().hex[:16]
    body["alerts"][0] |= {"fingerprint": fingerprint, "startsAt": "not a time"}
    response = await http.post(f"{api.url}/v1/alerts/alertmanager", content=json.dumps(body).encode(),
                               headers=bearer())
    assert response.status_code == 422 and response.json()["field"] == "alerts[0].startsAt", response.text
    [record] = await refused_records(http, api, fingerprint)
    assert record["field"] == "alerts[0].startsAt"
