"""Who may send, and what a body may be: tokens, signatures, sizes, shapes.

The API runs on a dev server of its own, with no worker: a 202 only needs
Temporal to record the signal-with-start.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from api_harness import (
    GRAFANA_SECRET,
    INDEX,
    PD_FIXTURES_MAX_AGE_S,
    PD_SECRET,
    TOKEN,
    alertmanager_body,
    bearer,
    fixture,
    grafana_headers,
    labels,
    pd_headers,
    running_api,
    start_dev_server,
)
from firebreak.api import ApiServer
from firebreak.api.auth import grafana_signature
from firebreak.config import Settings, TemporalSettings

PD_INDEX = {e["file"]: e for e in INDEX["fixtures"] if e["system"] == "pagerduty-v3"}
TRIGGERED = "pagerduty_v3_incident_triggered.json"


@pytest.fixture(scope="module")
async def temporal(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WorkflowEnvironment]:
    env = await start_dev_server(tmp_path_factory.mktemp("temporal-auth") / "temporal.db")
    yield env
    await env.shutdown()


@pytest.fixture(scope="module")
def plain_settings(runbooks_dir: Path) -> Settings:
    return Settings(temporal=TemporalSettings(task_queue=f"auth-{uuid.uuid4().hex[:8]}"), runbooks_dir=runbooks_dir)


@pytest.fixture(scope="module")
async def api(temporal: WorkflowEnvironment, plain_settings: Settings,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ApiServer]:
    async with running_api(temporal.client, plain_settings, tmp_path_factory.mktemp("api-auth"), worker=False,
                           intake_tokens=[TOKEN, "rotated-in-token"],
                           pagerduty_secrets=[PD_SECRET, "a-second-pagerduty-secret"],
                           pagerduty_max_age_s=PD_FIXTURES_MAX_AGE_S) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def _pd(api: ApiServer) -> str:
    return f"{api.url}/v1/alerts/pagerduty"


# -- PagerDuty X-PagerDuty-Signature ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PD_INDEX))
async def test_pagerduty_fixture_with_its_published_signature_is_accepted(api: ApiServer, http: httpx.AsyncClient,
                                                                           name: str) -> None:
    signature = PD_INDEX[name]["X-PagerDuty-Signature(test secret)"]
    response = await http.post(_pd(api), content=fixture(name), headers={"X-PagerDuty-Signature": signature})
    assert response.status_code == 202, response.text


async def test_pagerduty_signature_refusals(api: ApiServer, http: httpx.AsyncClient) -> None:
    body = fixture(TRIGGERED)
    good = PD_INDEX[TRIGGERED]["X-PagerDuty-Signature(test secret)"]
    wrong = "v1=" + "0" * 64
    cases = {
        "invalid": ({"X-PagerDuty-Signature": wrong}, body),
        "missing": ({}, body),
        "v0 ignored": ({"X-PagerDuty-Signature": "v0=" + good[3:]}, body),
        "not hex": ({"X-PagerDuty-Signature": "v1=" + "z" * 64}, body),
        "one byte changed": ({"X-PagerDuty-Signature": good}, body.replace(b"checkout", b"checkoup", 1)),
        "newline added": ({"X-PagerDuty-Signature": good}, body + b"\n"),
        "re-serialised": ({"X-PagerDuty-Signature": good}, json.dumps(json.loads(body), indent=2).encode()),
        "other secret": (pd_headers(body, secret="not-the-secret"), body),
    }
    for case, (headers, content) in cases.items():
        response = await http.post(_pd(api), content=content, headers=headers)
        assert response.status_code == 401, (case, response.text)
        assert response.json()["field"] == "headers.x-pagerduty-signature", case


async def test_pagerduty_rotation_either_side(api: ApiServer, http: httpx.AsyncClient) -> None:
    body = fixture(TRIGGERED)
    good = PD_INDEX[TRIGGERED]["X-PagerDuty-Signature(test secret)"]
    # PagerDuty rotating: one signature per active secret, ours is the second.
    rotated = await http.post(_pd(api), content=body, headers={"X-PagerDuty-Signature": f"v1={'0' * 64},{good}"})
    assert rotated.status_code == 202, rotated.text
    # Firebreak rotating: the second configured secret is accepted too.
    second = await http.post(_pd(api), content=body, headers=pd_headers(body, secret="a-second-pagerduty-secret"))
    assert second.status_code == 202, second.text


async def test_pagerduty_events_that_open_or_close_nothing_are_accepted_and_ignored(
    api: ApiServer, http: httpx.AsyncClient
) -> None:
    event = json.loads(fixture(TRIGGERED))
    event["event"]["event_type"] = "incident.acknowledged"
    body = json.dumps(event).encode()
    response = await http.post(_pd(api), content=body, headers=pd_headers(body))
    assert response.status_code == 202 and response.json()["status"] == "ignored"
    assert response.json()["incident_ids"] == []


# -- Grafana ---------------------------------------------------------------------------------


async def test_grafana_signatures_and_tokens(api: ApiServer, http: httpx.AsyncClient) -> None:
    url = f"{api.url}/v1/alerts/grafana"
    body = fixture("grafana_firing.json")
    now = str(int(time.time()))
    old = INDEX["grafana_timestamp_for_signature"]
    assert (await http.post(url, content=body, headers=grafana_headers(body, timestamp=now))).status_code == 202
    assert (await http.post(url, content=body, headers=grafana_headers(body, timestamp=now) | bearer())).json()[
        "status"] == "duplicate"  # the same signed request again: taken once
    refusals = {
        "neither": {},
        "no timestamp (replayable)": grafana_headers(body),
        "bearer alone (replayable)": bearer(),
        "wrong secret": grafana_headers(body, secret="wrong"),
        "stale timestamp (replay)": grafana_headers(body, timestamp=old),
        "timestamp not covered": grafana_headers(body) | {"X-Grafana-Alerting-Timestamp": now},
        "good signature, bad token": grafana_headers(body) | {"Authorization": "Bearer nope"},
        "good token, bad signature": bearer() | {"X-Grafana-Alerting-Signature": "00" * 32},
    }
    for case, headers in refusals.items():
        response = await http.post(url, content=body, headers=headers)
        assert response.status_code == 401, (case, response.text)
    changed = body.replace(b"payments", b"paymentz", 1)
    assert (await http.post(url, content=changed, headers=grafana_headers(body))).status_code == 401


async def test_grafana_signature_over_timestamp_and_body_matches_the_fixture_secret(
    temporal: WorkflowEnvironment, plain_settings: Settings, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """The index's timestamp, with the replay window off: the 'timestamp:body' scheme itself."""
    body = fixture("grafana_firing.json")
    stamp = INDEX["grafana_timestamp_for_signature"]
    signature = grafana_signature(GRAFANA_SECRET, body, stamp)
    assert signature == grafana_signature(GRAFANA_SECRET, stamp.encode() + b":" + body)
    async with running_api(temporal.client, plain_settings, tmp_path, worker=False, grafana_max_skew_s=None) as api:
        response = await http.post(f"{api.url}/v1/alerts/grafana", content=body, headers={
            "X-Grafana-Alerting-Signature": signature, "X-Grafana-Alerting-Timestamp": stamp})
        assert response.status_code == 202, response.text


# -- bearer tokens ---------------------------------------------------------------------------


async def test_bearer_tokens(api: ApiServer, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    url = f"{api.url}/v1/alerts/alertmanager"
    body = fixture("alertmanager_saturation.json")
    caplog.set_level(logging.DEBUG)
    assert (await http.post(url, content=body, headers=bearer())).status_code == 202
    assert (await http.post(url, content=body, headers=bearer("rotated-in-token"))).status_code == 202
    secret_guess = "guess-" + uuid.uuid4().hex
    for headers in ({}, bearer(secret_guess), {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}):
        response = await http.post(url, content=body, headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["field"] == "headers.authorization"
        assert TOKEN not in response.text and secret_guess not in response.text
        assert response.headers["www-authenticate"] == "Bearer"
    # Neither the real token nor a wrong guess is ever logged (by the API or its server) or echoed.
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("firebreak", "uvicorn", "fastapi")))
    assert TOKEN not in ours and secret_guess not in ours


# -- sizes and shapes ------------------------------------------------------------------------


async def test_the_500_alert_group_fits_the_default_limit(api: ApiServer, http: httpx.AsyncClient) -> None:
    body = fixture("edge_alertmanager_500_alerts.json")
    assert 400_000 < len(body) < api.app.state.settings.max_body_bytes
    response = await http.post(f"{api.url}/v1/alerts/alertmanager", content=body, headers=bearer())
    assert response.status_code == 202 and response.json()["counts"]["alerts"] == 500


async def test_oversized_bodies_are_413_declared_or_streamed(
    temporal: WorkflowEnvironment, plain_settings: Settings, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    body = fixture("edge_alertmanager_500_alerts.json")
    async with running_api(temporal.client, plain_settings, tmp_path, worker=False, max_body_bytes=100_000) as api:
        url = f"{api.url}/v1/alerts/alertmanager"
        declared = await http.post(url, content=body, headers=bearer())
        assert declared.status_code == 413 and declared.json()["field"] == "body"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
            for i in range(0, len(body), 16_384):
                yield body[i:i + 16_384]

        streamed = await http.post(url, content=chunks(), headers=bearer())
        assert streamed.status_code == 413
        small = alertmanager_body([{"labels": labels("NobodyHandlesThis", "x"), "fingerprint": "ab"}])
        assert (await http.post(url, content=small, headers=bearer())).status_code == 202


async def test_bad_bodies_are_400_naming_the_field(api: ApiServer, http: httpx.AsyncClient) -> None:
    url = f"{api.url}/v1/alerts"
    cases = {
        b"": "body",
        b"{not json": "body",
        b"\xff\xfe": "body",
        b'{"alerts": []}': "body",
        b"[]": "body",
        b'[{"labels": {"alertname": "X"}}]': "[0].fingerprint",
        b'[{"fingerprint": "f", "labels": {"service": "x"}}]': "[0].labels.alertname",
        b'[{"fingerprint": "f", "labels": {"alertname": "X"}, "status": "burning"}]': "[0].status",
        b'[{"fingerprint": "f", "labels": {"alertname": "X"}, "extra": 1}]': "[0].extra",
        b"[" * 100_000 + b"]" * 100_000: "body",
    }
    for content, field in cases.items():
        response = await http.post(url, content=content, headers=bearer())
        assert response.status_code == 400, (content[:40], response.text)
        assert response.json()["field"] == field, (content[:40], response.json())
    am = await http.post(f"{api.url}/v1/alerts/alertmanager", headers=bearer(),
                         content=json.dumps({"version": "3", "groupKey": "g", "status": "firing", "alerts": []}))
    assert am.status_code == 400 and {e["field"] for e in am.json()["errors"]} == {"version", "alerts"}


async def test_own_format_is_accepted(api: ApiServer, http: httpx.AsyncClient) -> None:
    body = json.dumps([{"fingerprint": "own-1", "labels": labels("NobodyHandlesThis", "x"), "source": "cron"}])
    response = await http.post(f"{api.url}/v1/alerts", content=body, headers=bearer())
    assert response.status_code == 202, response.text
    assert response.json()["source"] == "generic" and response.json()["counts"]["unrouted"] == 1

