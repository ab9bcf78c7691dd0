"""The demo's real Prometheus and Alertmanager, scraping the real fleet.

Skipped (with the reason) when the binaries are not installed. Everything runs
on free ports under tmp_path, and every process is stopped in a finally.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from demo.fleet import FleetServer
from demo.prom import ALERT_RULES, AlertmanagerProcess, PrometheusProcess, find_binary, free_port

from conftest import needs
from fixtures_demo import (  # noqa: F401 - fixtures
    Minter, WebhookReceiver, chaos_token, fleet_server, minter, webhook_receiver)

needs_prometheus = needs("prometheus")
needs_alertmanager = needs("alertmanager")

# The runbooks' query (runbooks/bad-deploy.yaml), and the same over a short window
# to see the recovery without waiting for a minute of history to age out.
RATIO = ('sum(rate(http_requests_total{{namespace="shop",service="checkout",code=~"5.."}}[{w}]))'
         ' / sum(rate(http_requests_total{{namespace="shop",service="checkout"}}[{w}]))')
RUNBOOK_RATIO = RATIO.format(w="1m")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> float:
    """Poll until ``predicate()``; returns the seconds it took."""
    start = time.monotonic()
    while True:
        if predicate():
            print(f"{what}: {time.monotonic() - start:.1f}s")
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- configs -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_alert_rules_keep_the_incident_labels() -> None:
    rules = yaml.safe_load(ALERT_RULES.read_text())["groups"][0]["rules"]
    by_name = {r["alert"]: r for r in rules}
    assert set(by_name) == {"HighErrorRate", "HighLatencyP99", "HighCPUSaturation", "ServiceStuck"}
    assert by_name["HighErrorRate"]["labels"]["severity"] == "critical"
    assert by_name["HighLatencyP99"]["labels"]["severity"] == "warning"
    assert by_name["HighCPUSaturation"]["labels"]["severity"] == "warning"
    for rule in rules:
        assert "by (namespace, service" in rule["expr"], rule["alert"]
        assert rule["for"] == "5s"
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "rules", str(ALERT_RULES)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.e2e
def test_configs_render_structurally(tmp_path: Path) -> None:
    token = 'tok"en: {with} yaml\n- specials'
    am = AlertmanagerProcess(tmp_path / "am", 1, "http://127.0.0.1:8080/v1/alerts/alertmanager", token)
    config = yaml.safe_load(am.render().read_text())
    hook = config["receivers"][0]["webhook_configs"][0]
    assert hook["http_config"]["authorization"] == {"type": "Bearer", "credentials": token}
    assert hook["send_resolved"] is True and hook["url"].endswith("/v1/alerts/alertmanager")
    assert (config["route"]["group_wait"], config["route"]["group_interval"], config["route"]["repeat_interval"]) == (
        "1s", "5s", "1h")
    assert stat.S_IMODE(am.config_path.stat().st_mode) == 0o600  # it holds the webhook credential
    assert token not in repr(am)

    prom = PrometheusProcess(tmp_path / "p", 1, "127.0.0.1:9300", "http://127.0.0.1:9093")
    config = yaml.safe_load(prom.render().read_text())
    assert config["global"]["scrape_interval"] == config["global"]["evaluation_interval"] == "1s"
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9300"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]
    assert Path(config["rule_files"][0]).read_text() == ALERT_RULES.read_text()
    alone = PrometheusProcess(tmp_path / "q", 1, "127.0.0.1:9300", None)
    assert "alerting" not in yaml.safe_load(alone.render().read_text())
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "config", str(prom.config_path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.e2e
def test_missing_binary_is_reported_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIREBREAK_PROMETHEUS_BIN", str(tmp_path / "nope"))
    assert find_binary("prometheus") is None
    with pytest.raises(FileNotFoundError, match="prometheus is not installed"):
        PrometheusProcess(tmp_path, free_port(), "127.0.0.1:1").start()


# -- the real thing ----------------------------------------------------------------------------


@pytest.fixture
def alertmanager(tmp_path: Path, webhook_receiver: WebhookReceiver) -> Iterator[AlertmanagerProcess]:
    process = AlertmanagerProcess(tmp_path / "alertmanager", free_port(), webhook_receiver.url, "intake-secret-1")
    try:
        process.start()
        process.wait_ready(30)
        yield process
    finally:
        process.stop()


@pytest.fixture
def prometheus(tmp_path: Path, fleet_server: FleetServer, alertmanager: AlertmanagerProcess) -> Iterator[PrometheusProcess]:
    process = PrometheusProcess(tmp_path / "prometheus", free_port(), fleet_server.target, alertmanager.url,
                                alertmanager_auth=alertmanager.web_auth)
    try:
        process.start()
        process.wait_ready(30)
        yield process
    finally:
        process.stop()


@needs_prometheus
@needs_alertmanager
def test_bad_deploy_seen_by_prometheus_alerted_and_rolled_back(
    prometheus: PrometheusProcess, fleet_server: FleetServer, webhook_receiver: WebhookReceiver,
    minter: Minter, chaos_token: str,
) -> None:
    # Healthy first: the runbook query answers ~0.5%.
    wait_for(lambda: (v := prometheus.query_value(RUNBOOK_RATIO)) is not None and v < 0.02, 15, "a healthy ratio")

    with httpx.Client(base_url=fleet_server.url, timeout=5) as fleet:
        # The other two faults run alongside, so the other rules meet real data in the same time.
        for service, kind in [("checkout", "bad_deploy"), ("payments", "saturation"), ("inventory", "stuck")]:
            r = fleet.post("/demo/faults", json={"service": service, "kind": kind},
                           headers={"Authorization": f"Bearer {chaos_token}"})
            assert r.status_code == 200
        took = wait_for(lambda: (prometheus.query_value(RUNBOOK_RATIO) or 0) > 0.05, 15, "5xx ratio > 5%")
        assert took < 15
        assert prometheus.query_value('fleet_deploy_info{service="checkout",version="v42"}') == 1

        # Prometheus -> Alertmanager -> webhook, with the bearer credential and the incident labels.
        def alert_delivered() -> bool:
            return any(a["labels"].get("alertname") == "HighErrorRate" and a["status"] == "firing"
                       for got in webhook_receiver.snapshot() if isinstance(got.body, dict)
                       for a in got.body.get("alerts", []))

        wait_for(alert_delivered, 20, "HighErrorRate at the webhook")
        delivery = next(got for got in webhook_receiver.snapshot()
                        if any(a["labels"].get("alertname") == "HighErrorRate" for a in got.body.get("alerts", [])))
        assert delivery.headers["authorization"] == "Bearer intake-secret-1"
        alert = next(a for a in delivery.body["alerts"] if a["labels"]["alertname"] == "HighErrorRate")
        assert {k: alert["labels"][k] for k in ("namespace", "service", "severity")} == {
            "namespace": "shop", "service": "checkout", "severity": "critical"}
        assert delivery.body["groupLabels"] == {"alertname": "HighErrorRate", "namespace": "shop",
                                                "service": "checkout"}

        peak = prometheus.query_value(RUNBOOK_RATIO)
        assert peak is not None
        r = fleet.post("/services/checkout/rollback", **minter.write("fleet.rollback", "service/checkout"))
        assert r.status_code == 200 and r.json()["version"] == "v41"

    # Over a 5s window the ratio is back to healthy within seconds; the runbook's
    # 1m window is on its way down.
    wait_for(lambda: (v := prometheus.query_value(RATIO.format(w="5s"))) is not None and v < 0.02, 20,
             "5xx ratio back under 2%")
    assert prometheus.query_value('fleet_deploy_info{service="checkout",version="v41"}') == 1
    now = prometheus.query_value(RUNBOOK_RATIO)
    assert now is not None and now < peak

    # Saturation and stuck raised their own alerts, each with the incident labels and no others.
    expected = {("HighCPUSaturation", "payments", "warning"), ("HighLatencyP99", "payments", "warning"),
                ("ServiceStuck", "inventory", "critical")}
    allowed = expected | {("HighErrorRate", "checkout", "critical")}  # may or may not have resolved yet

    def raised() -> set[tuple[str, str, str]]:
        return {(a["labels"]["alertname"], a["labels"]["service"], a["labels"]["severity"])
                for a in prometheus.alerts() if a["state"] in ("pending", "firing")}

    wait_for(lambda: expected <= raised(), 15, f"alerts {sorted(expected)}")
    assert raised() <= allowed  # nothing else: a stuck service's 0/0 ratio is no error alert
    for a in prometheus.alerts():
        assert set(a["labels"]) == {"alertname", "namespace", "service", "severity"}, a["labels"]
