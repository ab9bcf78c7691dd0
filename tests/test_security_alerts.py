"""Misuse monitoring of the agent identity, in the same pipeline as the demo's alerts.

Each rule of firebreak/security_rules.yml is evaluated by Prometheus's own rule tester (promtool), the
routing by Alertmanager's (amtool), and end to end on the real embedded stack: a forged mint attempt
and a write mint with no approvals raise the broker's denial metrics, Prometheus fires the misuse
alerts, Alertmanager delivers them to the security receiver, which files tickets, and no remediation
incident is opened. Skipped (with the reason) where Debian's prometheus/alertmanager are missing,
except in CI, where they must be there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import httpx
import yaml

from demo.prom import SECURITY_RULES, AlertmanagerProcess, PrometheusProcess, free_port

from conftest import needs, run_rule_tests

needs_prometheus = needs("prometheus")
needs_alertmanager = needs("alertmanager")
needs_both = needs("prometheus", "alertmanager")
JOB_LABELS = {"job": "firebreak-broker", "instance": "b:1"}


def rules() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in yaml.safe_load(SECURITY_RULES.read_text())["groups"][0]["rules"]}


def test_every_security_rule_is_labelled_for_the_security_receiver() -> None:
    found = rules()
    assert set(found) == {"FirebreakBrokerDenial", "FirebreakWriteWithoutApprovedIncident", "FirebreakMintBurst",
                          "FirebreakPrivilegeOutsideBaseline", "FirebreakCredentialTooOld", "FirebreakBrokerUnwatched",
                          "FirebreakBrokerStorageError", "FirebreakBrokerDependencyUnavailable",
                          "FirebreakSecurityAlertsDropped", "FirebreakSecuritySilenced", "FirebreakSilenceWatchFailing"}
    for name, rule in found.items():
        assert rule["labels"]["firebreak_security"] == "true", name
        # No runbook keys incidents on these: they carry neither a namespace nor a service.
        assert "namespace" not in rule["labels"] and "service" not in rule["labels"], name
    assert 'reason!~"no_approval|frozen"' in found["FirebreakBrokerDenial"]["expr"]


@pytest.mark.e2e
@needs_prometheus
def test_promtool_fires_each_rule_on_its_signal_and_not_on_normal_traffic(tmp_path: Path) -> None:
    """Prometheus's own rule unit tests: synthetic series, the alerts that must (and must not) fire."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package"
    # Annotations are texts for people; promtool would compare them too, so the copy under test drops them.
    shipped = yaml.safe_load(SECURITY_RULES.read_text())
    for rule in shipped["groups"][0]["rules"]:
        rule.pop("annotations", None)
    (tmp_path / "security_rules.yml").write_text(yaml.safe_dump(shipped))
    job = 'job="firebreak-broker",instance="b:1"'
    tests = {
        "rule_files": ["security_rules.yml"],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": [
                # a forged bearer at 1m; a missing approval (never a misuse alert on its own) at 1m
                {"series": f'firebreak_broker_denials_total{{{job},reason="unauthenticated"}}', "values": "0 0 0 0 1 1 1 1"},
                {"series": f'firebreak_broker_denials_total{{{job},reason="no_approval"}}', "values": "0 0 0 0 1 1 1 1"},
                {"series": f'firebreak_broker_denials_total{{{job},reason="frozen"}}', "values": "0 0 0 0 5 9 9 9"},
                {"series": f"firebreak_broker_unapproved_write_attempts_total{{{job}}}", "values": "0 0 0 0 1 1 1 1"},
                {"series": f"firebreak_broker_mints_outside_baseline_total{{{job}}}", "values": "0 0 0 0 0 0 1 1"},
                # 100 mints every 15 s: 400 a minute, for long enough
                {"series": f'firebreak_broker_mints_total{{{job},audience="fleet",verb="fleet.read",kind="read",runbook="x"}}',
                 "values": "0+100x20"},
                {"series": f"firebreak_agent_credential_age_seconds{{{job}}}", "values": "100+15x20"},
                {"series": f"firebreak_agent_credential_max_age_seconds{{{job}}}", "values": "150x20"},
                {"series": f"up{{{job}}}", "values": "1 1 1 1 0 0 0 0 0 0 0 0"},
            ],
            "alert_rule_test": [
                {"eval_time": "30s", "alertname": "FirebreakBrokerDenial", "exp_alerts": []},
                {"eval_time": "1m15s", "alertname": "FirebreakBrokerDenial", "exp_alerts": [
                    {"exp_labels": {"reason": "unauthenticated", "severity": "critical", "category": "misuse",
                                    "firebreak_security": "true"}}]},
                {"eval_time": "1m15s", "alertname": "FirebreakWriteWithoutApprovedIncident", "exp_alerts": [
                    {"exp_labels": {**JOB_LABELS,
                                    "severity": "critical", "category": "misuse", "firebreak_security": "true"}}]},
                {"eval_time": "1m15s", "alertname": "FirebreakPrivilegeOutsideBaseline", "exp_alerts": []},
                {"eval_time": "1m45s", "alertname": "FirebreakPrivilegeOutsideBaseline", "exp_alerts": [
                    {"exp_labels": {**JOB_LABELS,
                                    "severity": "critical", "category": "misuse", "firebreak_security": "true"}}]},
                {"eval_time": "30s", "alertname": "FirebreakMintBurst", "exp_alerts": []},
                {"eval_time": "3m", "alertname": "FirebreakMintBurst", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "category": "misuse", "firebreak_security": "true"}}]},
                {"eval_time": "30s", "alertname": "FirebreakCredentialTooOld", "exp_alerts": []},
                {"eval_time": "3m", "alertname": "FirebreakCredentialTooOld", "exp_alerts": [
                    {"exp_labels": {**JOB_LABELS,
                                    "severity": "warning", "category": "lifecycle", "firebreak_security": "true"}}]},
                {"eval_time": "2m30s", "alertname": "FirebreakBrokerUnwatched", "exp_alerts": [
                    {"exp_labels": {**JOB_LABELS,
                                    "severity": "warning", "category": "misuse", "firebreak_security": "true"}}]},
            ],
        }],
    }
    run_rule_tests(promtool, tmp_path, tests)


@pytest.mark.e2e
@needs_alertmanager
def test_security_alerts_route_to_the_security_receiver_and_never_to_the_intake(tmp_path: Path) -> None:
    amtool = shutil.which("amtool")
    assert amtool, "amtool comes with Debian's prometheus-alertmanager package"
    am = AlertmanagerProcess(tmp_path / "am", 1, "http://127.0.0.1:8340/v1/alerts/alertmanager", "intake",
                             security_webhook_url="http://127.0.0.1:8370/v1/security/alerts",
                             security_bearer_token="sec-token")
    config = am.render()

    def route(*labels: str) -> str:
        out = subprocess.run([amtool, "config", "routes", "test", f"--config.file={config}", *labels],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.strip()

    for name, rule in rules().items():
        # Availability alerts (a dependency down) go to their own receiver, never to the security pager's.
        want = "availability" if rule["labels"]["category"] == "availability" else "security"
        assert route(f"alertname={name}", *(f"{k}={v}" for k, v in rule["labels"].items())) == want, name
    assert route("alertname=HighErrorRate", "namespace=shop", "service=checkout", "severity=critical") == "firebreak"
    body = yaml.safe_load(config.read_text())
    hooks = {r["name"]: r.get("webhook_configs", []) for r in body["receivers"]}
    assert hooks["security"][0]["http_config"]["authorization"]["credentials"] == "sec-token"
    assert [h["url"] for h in hooks["firebreak"]] == ["http://127.0.0.1:8340/v1/alerts/alertmanager"]
    # Without a security webhook, security alerts are dropped, still never sent to the intake.
    bare = AlertmanagerProcess(tmp_path / "bare", 1, "http://127.0.0.1:8340/v1/alerts/alertmanager", "intake")
    config = bare.render()
    assert route("alertname=FirebreakBrokerDenial", "firebreak_security=true") == "security"
    assert "webhook_configs" not in next(r for r in yaml.safe_load(config.read_text())["receivers"]
                                         if r["name"] == "security")


def test_prometheus_scrapes_the_broker_only_when_given(tmp_path: Path) -> None:
    with_broker = yaml.safe_load(PrometheusProcess(tmp_path / "a", 1, "127.0.0.1:9300", None,
                                                   broker_target="127.0.0.1:8350").render().read_text())
    jobs = {c["job_name"]: c["static_configs"][0]["targets"] for c in with_broker["scrape_configs"]}
    assert jobs == {"fleet": ["127.0.0.1:9300"], "firebreak-broker": ["127.0.0.1:8350"]}
    assert Path(with_broker["rule_files"][1]).read_text() == SECURITY_RULES.read_text()
    alone = yaml.safe_load(PrometheusProcess(tmp_path / "b", 1, "127.0.0.1:9300", None).render().read_text())
    assert [c["job_name"] for c in alone["scrape_configs"]] == ["fleet"] and len(alone["rule_files"]) == 1


# -- end to end on the real stack ------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.mark.e2e
@needs_both
def test_forged_and_unapproved_mints_reach_the_security_webhook_and_open_no_incident(tmp_path: Path) -> None:
    from firebreak.stack import Ports, down, up

    state = tmp_path / "state"
    ports = Ports(**{name: free_port() for name in vars(Ports())})
    try:
        info = up(state, ports)
        broker = info["components"]["broker"]
        prometheus = info["components"]["prometheus"]
        tickets = Path(info["demo"]["security_tickets"])
        assert info["components"]["alertmanager"] and info["components"]["security_receiver"]
        # Prometheus scrapes the broker before anything happens (so the counters' rise is seen).
        wait_for(lambda: httpx.get(f"{prometheus}/api/v1/query", params={
            "query": 'firebreak_broker_denials_total{reason="unauthenticated"}'}).json()["data"]["result"],
            30, "Prometheus to scrape the broker")
        agent_token = (state / "broker" / "agent-token").read_text().strip()
        read = {"audience": "fleet", "verb": "fleet.read", "resource": "service/checkout", "ttl_s": 60,
                "workflow_id": "shop.checkout.error-rate", "run_id": "r1", "activity_id": "1", "step_id": "changes",
                "runbook": "bad-deploy", "params": {"namespace": "shop", "service": "checkout"}}
        started = time.monotonic()
        # A forged mint attempt: someone without the bootstrap credential.
        forged = httpx.post(f"{broker}/v1/mint", json=read, headers={"Authorization": "Bearer forged"})
        assert forged.status_code == 401
        # A write mint with no approvals, with the real bootstrap credential: the worker acting on its own.
        write = {**read, "verb": "fleet.rollback", "activity_id": "2", "step_id": "s1"}
        unapproved = httpx.post(f"{broker}/v1/mint", json=write, headers={"Authorization": f"Bearer {agent_token}"})
        assert unapproved.status_code == 403 and "needs a plan and signed approvals" in unapproved.json()["reason"]
        metrics = httpx.get(f"{broker}/metrics").text
        assert 'firebreak_broker_denials_total{reason="unauthenticated"} 1' in metrics
        assert "firebreak_broker_unapproved_write_attempts_total 1" in metrics

        def filed() -> dict[str, str]:
            found = {p.name: p.read_text() for p in tickets.glob("SEC-*.md")} if tickets.exists() else {}
            titles = {text.splitlines()[0] for text in found.values()}
            want = {"# [firing] FirebreakBrokerDenial (unauthenticated)", "# [firing] FirebreakWriteWithoutApprovedIncident"}
            return found if want <= titles else {}

        found = wait_for(filed, 45, "the security tickets")
        took = time.monotonic() - started
        rule_for = {name: float(r["for"].removesuffix("s")) for name, r in rules().items()
                    if name in ("FirebreakBrokerDenial", "FirebreakWriteWithoutApprovedIncident")}
        # The rule's `for` plus the stack's pipeline: a 1 s scrape and evaluation, Alertmanager's 1 s group_wait.
        assert took <= max(rule_for.values()) + 15, f"delivered after {took:.1f}s"
        print(f"security tickets filed {took:.1f}s after the mints: {sorted(found)}")
        ticket = next(t for t in found.values() if "FirebreakBrokerDenial" in t.splitlines()[0])
        assert "Firebreak does not remediate itself" in ticket and "firebreak_security: true" in ticket
        assert agent_token not in "".join(found.values())
        notifications = (state / "security" / "notifications.jsonl").read_text().splitlines()
        assert all(json.loads(n)["notification"]["receiver"] == "security" for n in notifications)
        # No remediation incident: the intake never saw these alerts, and no workflow was started.
        api = info["settings"]["api_url"]
        auth = {"Authorization": f"Bearer {info['demo']['intake_token']}"}
        unrouted = httpx.get(f"{api}/v1/unrouted", headers=auth)
        assert unrouted.status_code == 200 and unrouted.json()["count"] == 0, unrouted.text
        incidents = httpx.get(f"{api}/v1/incidents", headers=auth)
        assert incidents.status_code == 200 and incidents.json()["incidents"] == [], incidents.text
        alertmanager = info["components"]["alertmanager"]
        am_auth = info["demo"]["alertmanager_auth"]
        assert httpx.get(f"{alertmanager}/api/v2/alerts").status_code == 401  # its API requires credentials
        delivered = httpx.get(f"{alertmanager}/api/v2/alerts", auth=(
            am_auth["username"], Path(am_auth["password_file"]).read_text().strip())).json()
        assert {a["labels"]["alertname"] for a in delivered} >= {"FirebreakBrokerDenial",
                                                                 "FirebreakWriteWithoutApprovedIncident"}
        assert all(r["name"] == "security" for a in delivered for r in a["receivers"])
    finally:
        down(state)

