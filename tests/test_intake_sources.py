"""PagerDuty and Opsgenie as real services send them (issue 28): real bodies, the real API, worker, broker and fleet.

- a PagerDuty incident maps to labels through its service id: configured in the API's settings, or read from
  a catalog entity's ``pagerduty.com/service-id`` annotation; an unmapped service is recorded as unrouted
  with the reason; an error names a path that is in the body;
- Opsgenie's outgoing webhook: Create opens, Acknowledge is recorded and changes nothing, Close resolves.

The bodies are in tests/fixtures/ (sources in its README). The PagerDuty ones are sent as their exact bytes
with the signatures PagerDuty gave them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from api_harness import PD_SECRET, bearer, fresh_pagerduty, pd_headers, running_api, start_dev_server, wait_status
from conftest import worker_settings_for
from demo.catalog import ENTITIES
from demo.fleet import FleetServer
from firebreak import signing
from firebreak.api import ApiServer
from firebreak.api.sources import parse_pagerduty
from firebreak.broker.server import BrokerServer
from firebreak.config import Settings

REAL = Path(__file__).resolve().parent / "fixtures"
# The public test secret of Aldaviva/PagerDuty's WebhookResourceTests, and the signatures PagerDuty gave
# these two captured deliveries under it (see tests/fixtures/README.md).
ALDAVIVA_SECRET = "HvPtlQNKMPpHSSqJpCdndXfo7HnGXa1pnH6w5axpxLFn9aRBNBGh4e8/HlonK5mz"
PD_TRIGGERED = "pagerduty_v3_incident_triggered_webhook_tester.json"
PD_TRIGGERED_SIGNATURE = "v1=3e3032b45bbe1801c13f182b0e0a7f4f3f530225cef07e3e90cbc57874d01c49"
PD_RESOLVED = "pagerduty_v3_incident_resolved_webhook_tester.json"
PD_RESOLVED_SIGNATURE = "v1=60a745384fb05b03acfc592b157b05e105e498da2f72f53c437c9d7c8d9aa879"
WEBHOOK_TESTER = "PNE3JZM"  # the captured incidents' service ("Webhook Tester")
# Configured in the API's settings: the captured service's incidents are the drill on inventory.
MAPPING = {"pagerduty_services": {WEBHOOK_TESTER: {"alertname": "DrillRollback", "namespace": "shop",
                                                    "service": "inventory"}}}


def _age_s(name: str) -> float:
    occurred = json.loads((REAL / name).read_bytes())["event"]["occurred_at"]
    return (datetime.now(timezone.utc) - datetime.fromisoformat(occurred.replace("Z", "+00:00"))).total_seconds()


# The captures are old: the freshness window covers their age plus a day, and no more.
MAX_AGE_S = max(_age_s(PD_TRIGGERED), _age_s(PD_RESOLVED)) + 86_400


@pytest.fixture(scope="module")
async def temporal(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WorkflowEnvironment]:
    env = await start_dev_server(tmp_path_factory.mktemp("temporal-sources") / "temporal.db")
    yield env
    await env.shutdown()


@pytest.fixture(scope="module")
def module_fleet(broker: BrokerServer) -> Iterator[FleetServer]:
    verifier = signing.TargetVerifier.from_broker(broker.url, "fleet")
    with FleetServer(verifier=verifier, chaos_token="test-chaos") as server:
        # A recent deploy on every service: drill incidents then wait for approval (and stay open).
        for service in ("checkout", "payments", "inventory"):
            server.fleet.inject(service, "bad_deploy")
        yield server


@pytest.fixture(scope="module")
def worker_settings(state_dir: Path, runbooks_dir: Path, broker: BrokerServer, module_fleet: FleetServer) -> Settings:
    return worker_settings_for(state_dir, runbooks_dir, broker, module_fleet, queue_prefix="sources")


@pytest.fixture(scope="module")
def catalog_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo catalog's entities as a catalog file: each carries pagerduty.com/service-id."""
    path = tmp_path_factory.mktemp("catalog") / "catalog.json"
    path.write_text(json.dumps(ENTITIES), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
async def api(temporal: WorkflowEnvironment, worker_settings: Settings, catalog_file: Path,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ApiServer]:
    async with running_api(temporal.client, worker_settings, tmp_path_factory.mktemp("api-sources"),
                           pagerduty_secrets=[PD_SECRET, ALDAVIVA_SECRET], pagerduty_max_age_s=MAX_AGE_S,
                           label_mapping=MAPPING, catalog_files=[catalog_file]) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def records(http: httpx.AsyncClient, api: ApiServer, kind: str) -> list[dict[str, Any]]:
    listed = await http.get(f"{api.url}/v1/unrouted", params={"kind": kind, "limit": 1000}, headers=bearer())
    assert listed.status_code == 200, listed.text
    return listed.json()["items"]


def has_path(body: bytes, path: str) -> bool:
    """Whether a dotted path such as ``event.data.service.id`` exists in the JSON body."""
    node: Any = json.loads(body)
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# -- PagerDuty ------------------------------------------------------------------------------------


async def test_a_pagerduty_incident_of_a_mapped_service_opens_on_its_runbook_and_its_resolve_closes_it(
    api: ApiServer, http: httpx.AsyncClient
) -> None:
    body = (REAL / PD_TRIGGERED).read_bytes()
    response = await http.post(f"{api.url}/v1/alerts/pagerduty", content=body,
                               headers={"X-PagerDuty-Signature": PD_TRIGGERED_SIGNATURE})
    assert response.status_code == 202, response.text
    answer = response.json()
    # "Webhook Tester", titled "Test": by its service id, the drill on shop/inventory.
    assert answer["incident_ids"] == ["inventory.drill-rollback"]
    assert answer["incidents"][0]["runbook"] == "drill-rollback"
    # Opened when the incident was (2025): the fleet's deploys are later, so it stays open diagnosing.
    status = await wait_status(http, api, "inventory.drill-rollback", lambda s: True)
    assert status["runbook"] == "drill-rollback" and status["service"] == "inventory"
    assert status["firing"] == ["dfead9d88e0649e8b7dee514b1875756"]  # data.incident_key

    resolved = (REAL / PD_RESOLVED).read_bytes()
    response = await http.post(f"{api.url}/v1/alerts/pagerduty", content=resolved,
                               headers={"X-PagerDuty-Signature": PD_RESOLVED_SIGNATURE})
    assert response.status_code == 202, response.text
    assert response.json()["incidents"][0]["run_id"] == answer["incidents"][0]["run_id"]
    # When its diagnosis is too close to call (Prometheus is down here), the incident looks again after the
    # runbook's reinvestigate_after (30 s), and the resolve closes it at that look: longer than the default wait.
    await wait_status(http, api, "inventory.drill-rollback", lambda s: s["phase"] == "auto_resolved", timeout=120)


async def test_a_pagerduty_service_mapped_by_its_catalog_annotation_opens_on_the_entitys_runbook(
    api: ApiServer, http: httpx.AsyncClient
) -> None:
    # The demo catalog's checkout carries pagerduty.com/service-id P7CHKT2; its runbook (bad-deploy) has one
    # alert name. A real service name and an Events API title: neither says anything about labels.
    body = fresh_pagerduty("pagerduty_v3_incident_triggered.json", title="Checkout answers 5xx",
                           incident_key=uuid.uuid4().hex,
                           service={"id": "P7CHKT2", "summary": "Storefront Checkout", "type": "service_reference"})
    response = await http.post(f"{api.url}/v1/alerts/pagerduty", content=body, headers=pd_headers(body))
    assert response.status_code == 202, response.text
    assert response.json()["incident_ids"] == ["shop.checkout.error-rate"]
    assert response.json()["incidents"][0]["runbook"] == "bad-deploy"


async def test_a_pagerduty_incident_of_an_unmapped_service_is_recorded_unrouted_with_the_reason(
    temporal: WorkflowEnvironment, worker_settings: Settings, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    # The same real delivery, to an API that maps nothing.
    async with running_api(temporal.client, worker_settings, tmp_path, worker=False,
                           pagerduty_secrets=[ALDAVIVA_SECRET], pagerduty_max_age_s=MAX_AGE_S) as bare:
        body = (REAL / PD_TRIGGERED).read_bytes()
        response = await http.post(f"{bare.url}/v1/alerts/pagerduty", content=body,
                                   headers={"X-PagerDuty-Signature": PD_TRIGGERED_SIGNATURE})
        assert response.status_code == 202, response.text
        assert response.json()["incident_ids"] == []
        assert response.json()["counts"] == {"alerts": 1, "routed": 0, "unrouted": 1, "refused": 0}
        [record] = await records(http, bare, "unrouted")
        assert record["source"] == "pagerduty" and record["field"] == "event.data.service.id"
        assert "PagerDuty service 'PNE3JZM' ('Webhook Tester') is not mapped" in record["reason"]
        assert "pagerduty.com/service-id" in record["reason"]
        assert has_path(body, record["field"])


async def test_a_label_missing_from_a_pagerduty_incident_is_reported_at_a_path_in_the_body(
    api: ApiServer, http: httpx.AsyncClient
) -> None:
    # An Alertmanager-raised incident of an unmapped service: the drill needs a namespace no field gives.
    body = fresh_pagerduty("pagerduty_v3_incident_triggered.json", title="[FIRING:1] DrillDrain payments",
                           incident_key=uuid.uuid4().hex,
                           service={"id": "PUNMAPD", "summary": "payments", "type": "service_reference"})
    response = await http.post(f"{api.url}/v1/alerts/pagerduty", content=body, headers=pd_headers(body))
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "event.data.service.id"
    assert has_path(body, response.json()["field"])
    assert "namespace" in response.json()["error"]


def test_custom_details_are_kept_as_an_inert_annotation_never_as_labels() -> None:
    body = json.loads((REAL / PD_TRIGGERED).read_bytes())
    body["event"]["data"]["custom_details"] = {"namespace": "kube-system", "note": "<img src=x onerror=alert(1)>"}
    [source_alert] = parse_pagerduty(json.dumps(body).encode()).alerts
    alert = source_alert.alert
    assert "kube-system" not in alert.labels.values()
    kept = json.loads(alert.annotations["pagerduty_custom_details"])
    assert kept == {"namespace": "kube-system", "note": "<img src=x onerror=alert(1)>"}


# -- Opsgenie ------------------------------------------------------------------------------------


def opsgenie(name: str, alias: str, **details: str) -> bytes:
    """A real Opsgenie delivery for one alert of now: its details (as 'Add Alert Details to Payload' adds
    them), tags and alias, created now (milliseconds) and updated now (nanoseconds), as Opsgenie writes them."""
    body = json.loads((REAL / name).read_bytes())
    now = datetime.now(timezone.utc).timestamp()
    body["alert"] |= {"alias": alias, "details": details, "tags": ["env:prod", "team-payments"],
                      "createdAt": int(now * 1e3), "updatedAt": int(now * 1e9)}
    return json.dumps(body).encode()


async def test_an_opsgenie_create_opens_acknowledge_changes_nothing_and_close_resolves_one_incident(
    api: ApiServer, http: httpx.AsyncClient
) -> None:
    alias = f"payments-{uuid.uuid4().hex}"
    details = {"alertname": "DrillRollback", "namespace": "shop", "service": "payments"}
    url = f"{api.url}/v1/alerts/opsgenie"
    assert (await http.post(url, content=opsgenie("opsgenie_create.json", alias, **details))).status_code == 401

    created = await http.post(url, content=opsgenie("opsgenie_create.json", alias, **details), headers=bearer())
    assert created.status_code == 202, created.text
    assert created.json()["incident_ids"] == ["payments.drill-rollback"]
    run_id = created.json()["incidents"][0]["run_id"]
    before = await wait_status(http, api, "payments.drill-rollback", lambda s: s["phase"] == "awaiting_approval")

    acked = await http.post(url, content=opsgenie("opsgenie_acknowledge.json", alias, **details), headers=bearer())
    assert acked.status_code == 202, acked.text
    assert acked.json()["status"] == "recorded" and acked.json()["incident_ids"] == []
    [event] = [r for r in await records(http, api, "event") if r["alert"]["fingerprint"] == alias]
    assert event["source"] == "opsgenie" and "acknowledged" in event["reason"]
    after = await wait_status(http, api, "payments.drill-rollback", lambda s: True)
    assert after["phase"] == "awaiting_approval" and after["alerts_received"] == before["alerts_received"]

    closed = await http.post(url, content=opsgenie("opsgenie_close.json", alias, **details), headers=bearer())
    assert closed.status_code == 202, closed.text
    assert closed.json()["incidents"][0]["run_id"] == run_id
    final = await wait_status(http, api, "payments.drill-rollback", lambda s: s["phase"] == "auto_resolved")
    assert final["firing"] == []


async def test_an_opsgenie_alert_without_labels_is_recorded_unrouted_with_the_reason(
    api: ApiServer, http: httpx.AsyncClient
) -> None:
    body = (REAL / "opsgenie_create.json").read_bytes()  # as captured: tag "vip", no details
    response = await http.post(f"{api.url}/v1/alerts/opsgenie", content=body, headers=bearer())
    assert response.status_code == 202, response.text
    assert response.json()["counts"]["unrouted"] == 1
    [record] = [r for r in await records(http, api, "unrouted") if r["alert"]["fingerprint"] == "alert-alias"]
    assert record["field"] == "alert.details" and "details" in record["reason"]
    assert record["alert"]["labels"]["alertname"] == "OpsgenieAlert"
    assert record["alert"]["annotations"]["opsgenie_tags"] == "vip"


async def test_an_opsgenie_body_of_the_wrong_shape_names_the_field(api: ApiServer, http: httpx.AsyncClient) -> None:
    body = json.loads((REAL / "opsgenie_create.json").read_bytes())
    del body["alert"]["alertId"]
    response = await http.post(f"{api.url}/v1/alerts/opsgenie", content=json.dumps(body).encode(), headers=bearer())
    assert response.status_code == 400 and response.json()["field"] == "alert.alertId", response.text


# -- where the mapping comes from --------------------------------------------------------------------


def test_firebreak_ups_intake_config_maps_the_demo_catalogs_pagerduty_services(tmp_path: Path) -> None:
    from firebreak.api.app import intake_label_mapping
    from firebreak.api.settings import ApiSettings
    from firebreak.config import Settings as FirebreakSettings
    from firebreak.runbook import default_runbook_dir, load_runbooks
    from firebreak.stack import _write_intake_config

    _write_intake_config(tmp_path / "api")
    settings = ApiSettings.from_settings(FirebreakSettings(state_dir=tmp_path))
    mapping = intake_label_mapping(settings, load_runbooks(default_runbook_dir()))
    # bad-deploy (the entities' firebreak.dev/runbook) has one alert name: it is the mapped alertname.
    assert mapping.pagerduty_services["P7CHKT2"] == {"service": "checkout", "namespace": "shop",
                                                      "alertname": "HighErrorRate"}
    assert {labels["service"] for labels in mapping.pagerduty_services.values()} == {
        e["metadata"]["name"] for e in ENTITIES}


def test_configured_services_win_over_the_catalog_and_a_bad_config_stops_the_api(tmp_path: Path) -> None:
    from firebreak.api.app import intake_label_mapping
    from firebreak.api.settings import ApiSettings
    from firebreak.config import Settings as FirebreakSettings

    api_dir = tmp_path / "api"
    api_dir.mkdir()
    (api_dir / "catalog-info.yaml").write_text(
        "apiVersion: backstage.io/v1alpha1\nkind: Component\nmetadata:\n  name: artist-lookup\n"
        "  annotations: {pagerduty.com/service-id: PABC123, firebreak.dev/namespace: music}\n"
        "spec: {type: service, owner: team-a, lifecycle: production}\n---\n"
        "apiVersion: backstage.io/v1alpha1\nkind: Component\nmetadata: {name: no-pagerduty}\n", encoding="utf-8")
    (api_dir / "intake.yaml").write_text(
        "catalog_files: [catalog-info.yaml]\n"
        "pagerduty_services:\n  PXYZ789: {alertname: HighErrorRate, namespace: shop, service: payments}\n",
        encoding="utf-8")
    settings = ApiSettings.from_settings(FirebreakSettings(state_dir=tmp_path))
    assert intake_label_mapping(settings, []).pagerduty_services == {
        "PABC123": {"service": "artist-lookup", "namespace": "music"},
        "PXYZ789": {"alertname": "HighErrorRate", "namespace": "shop", "service": "payments"}}
    overridden = settings.model_copy(update={"label_mapping": settings.label_mapping.model_validate(
        {"pagerduty_services": {"PABC123": {"service": "other"}}})})
    assert intake_label_mapping(overridden, []).pagerduty_services["PABC123"] == {"service": "other"}

    (api_dir / "intake.yaml").write_text("pagerduty_service: {}\n", encoding="utf-8")  # a typo'd key
    with pytest.raises(ValueError, match="intake.yaml"):
        ApiSettings.from_settings(FirebreakSettings(state_dir=tmp_path))


def test_opsgenie_details_and_name_value_tags_become_labels_and_the_rest_inert_annotations() -> None:
    from firebreak.api.sources import parse_opsgenie

    body = json.loads((REAL / "opsgenie_create.json").read_bytes())
    body["alert"] |= {"message": "[FIRING:1] HighErrorRate checkout", "tags": ["service:cart", "env=prod", "vip"],
                      "details": {"service": "checkout", "namespace": "shop", "replicas": 3, "nested": {"a": 1},
                                  "note": "<script>alert(1)</script>"}}
    [source_alert] = parse_opsgenie(json.dumps(body).encode()).alerts
    alert = source_alert.alert
    assert alert.labels == {"service": "checkout", "namespace": "shop", "env": "prod", "replicas": "3",
                            "note": "<script>alert(1)</script>", "alertname": "HighErrorRate", "priority": "P3"}
    assert source_alert.field_for("labels.service") == "alert.details.service"  # details win over the tag
    assert source_alert.field_for("labels.env") == "alert.tags[1]"
    assert alert.annotations["opsgenie_tags"] == "vip"
    assert json.loads(alert.annotations["opsgenie_details"])["nested"] == {"a": 1}
    assert alert.fingerprint == "alert-alias" and alert.starts_at == datetime(2017, 8, 14, 11, 25, 56, 288000,
                                                                              tzinfo=timezone.utc)
