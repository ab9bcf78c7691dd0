"""The watchers cannot be silenced, flooded or fooled by an outage.

- Alertmanager's API requires credentials: a silence without them is refused (401); a silence with them
  that would mute the security alerts is itself a security ticket (the receiver reads the silences).
- The security receiver keeps one ticket per alert (fingerprint recomputed from the labels) and only
  appends to it: a "resolved" notification never overwrites the firing.
- 2,000 alerts in one notification file at most the cap; the excess is counted and alerted.
- A catalog outage during a write mint is counted and alerted as availability (warning, its own route),
  never as a denial: no misuse alert.

Rules with promtool, routes with amtool, end to end on the real Prometheus, Alertmanager, broker and
receiver. Skipped (with the reason) where Debian's prometheus/alertmanager are missing, except in CI.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from demo.prom import SECURITY_RULES, AlertmanagerProcess, PrometheusProcess, free_port
from firebreak.broker.client import BrokerClient, BrokerError, MintRefused
from firebreak.security_receiver import (
    MAX_PER_MINUTE, MAX_PER_NOTIFICATION, alert_fingerprint, create_app, muted_rules, watched_label_sets)
from firebreak.serving import ThreadedServer

from conftest import needs, run_rule_tests
from test_broker_catalog import CLOSED_PORT_URL, Env, _env

needs_prometheus = needs("prometheus")
needs_alertmanager = needs("alertmanager")
needs_both = needs("prometheus", "alertmanager")
TOKEN = "sec-token"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def titles(tickets: Path) -> dict[str, str]:
    return {p.name: p.read_text().splitlines()[0] for p in tickets.glob("SEC-*.md")} if tickets.exists() else {}


def scrape(url: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in httpx.get(f"{url}/metrics").text.splitlines() if line and not line.startswith("#")}


# -- rules and routes ------------------------------------------------------------------------------------------


@pytest.mark.e2e
@needs_prometheus
def test_promtool_availability_is_not_misuse_and_the_watchers_rules_fire(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package"
    shipped = yaml.safe_load(SECURITY_RULES.read_text())
    for rule in shipped["groups"][0]["rules"]:
        rule.pop("annotations", None)
    (tmp_path / "security_rules.yml").write_text(yaml.safe_dump(shipped))
    job = 'job="firebreak-broker",instance="b:1"'
    receiver = 'job="firebreak-security-receiver",instance="r:1"'
    security = {"firebreak_security": "true"}
    tests = {
        "rule_files": ["security_rules.yml"],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": [
                # The catalog down at 1m: 5 refused mints, all availability; no policy denial at all.
                {"series": f'firebreak_broker_unavailable_total{{{job},dependency="catalog"}}', "values": "0 0 0 0 5 5 5 5"},
                {"series": f'firebreak_broker_unavailable_total{{{job},dependency="roster"}}', "values": "0x8"},
                *({"series": f'firebreak_broker_denials_total{{{job},reason="{c}"}}', "values": "0x8"}
                  for c in ("other", "scope", "unauthenticated")),
                {"series": f"firebreak_broker_unapproved_write_attempts_total{{{job}}}", "values": "0x8"},
                {"series": f'firebreak_security_alerts_dropped_total{{{receiver},cap="notification"}}',
                 "values": "0 0 0 0 1950 1950 1950 1950"},
                {"series": f'firebreak_security_alerts_dropped_total{{{receiver},cap="minute"}}', "values": "0x8"},
                {"series": f"firebreak_security_silences_muting{{{receiver}}}", "values": "0 0 0 0 0 0 1 1"},
                {"series": f"firebreak_security_silence_watch_up{{{receiver}}}", "values": "1 1 0 0 0 0 0 0 0 0"},
            ],
            "alert_rule_test": [
                {"eval_time": "30s", "alertname": "FirebreakBrokerDependencyUnavailable", "exp_alerts": []},
                {"eval_time": "1m15s", "alertname": "FirebreakBrokerDependencyUnavailable", "exp_alerts": [
                    {"exp_labels": {"dependency": "catalog", "severity": "warning", "category": "availability",
                                    **security}}]},
                # Misuse rules fire only on policy denials: the outage raises none of them.
                {"eval_time": "1m45s", "alertname": "FirebreakBrokerDenial", "exp_alerts": []},
                {"eval_time": "1m45s", "alertname": "FirebreakWriteWithoutApprovedIncident", "exp_alerts": []},
                {"eval_time": "30s", "alertname": "FirebreakSecurityAlertsDropped", "exp_alerts": []},
                {"eval_time": "1m15s", "alertname": "FirebreakSecurityAlertsDropped", "exp_alerts": [
                    {"exp_labels": {"cap": "notification", "severity": "critical", "category": "misuse", **security}}]},
                {"eval_time": "1m15s", "alertname": "FirebreakSecuritySilenced", "exp_alerts": []},
                {"eval_time": "1m45s", "alertname": "FirebreakSecuritySilenced", "exp_alerts": [
                    {"exp_labels": {"job": "firebreak-security-receiver", "instance": "r:1", "severity": "critical",
                                    "category": "misuse", **security}}]},
                {"eval_time": "1m45s", "alertname": "FirebreakSilenceWatchFailing", "exp_alerts": [
                    {"exp_labels": {"job": "firebreak-security-receiver", "instance": "r:1", "severity": "warning",
                                    "category": "misuse", **security}}]},
            ],
        }],
    }
    run_rule_tests(promtool, tmp_path, tests)


@pytest.mark.e2e
@needs_alertmanager
def test_amtool_routes_availability_apart_and_the_api_config_is_private(tmp_path: Path) -> None:
    amtool = shutil.which("amtool")
    assert amtool, "amtool comes with Debian's prometheus-alertmanager package"
    am = AlertmanagerProcess(tmp_path / "am", 1, "http://127.0.0.1:8340/v1/alerts/alertmanager", "intake",
                             security_webhook_url="http://127.0.0.1:8370/v1/security/alerts",
                             security_bearer_token=TOKEN)
    config = am.render()

    def route(*labels: str) -> str:
        out = subprocess.run([amtool, "config", "routes", "test", f"--config.file={config}", *labels],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.strip()

    assert route("alertname=FirebreakBrokerDependencyUnavailable", "dependency=catalog", "severity=warning",
                 "category=availability", "firebreak_security=true") == "availability"
    for name in ("FirebreakBrokerDenial", "FirebreakSecurityAlertsDropped", "FirebreakSecuritySilenced"):
        assert route(f"alertname={name}", "severity=critical", "category=misuse", "firebreak_security=true") == "security"
    # The web config holds a bcrypt hash, never the password; both files are the owner's only.
    web = yaml.safe_load(am.web_config_path.read_text())
    password = am.web_auth.password_file.read_text().strip()
    assert web["basic_auth_users"][am.web_auth.username].startswith("$2") and password not in am.web_config_path.read_text()
    for path in (am.web_config_path, am.web_auth.password_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert f"--web.config.file={am.web_config_path}" in am.command()
    # The same state dir keeps its credentials; another gets its own.
    assert AlertmanagerProcess(tmp_path / "am", 1, "http://x/", "t").web_auth.password_file.read_text() == \
        am.web_auth.password_file.read_text()
    assert AlertmanagerProcess(tmp_path / "other", 1, "http://x/", "t").web_auth.password_file.read_text() != \
        am.web_auth.password_file.read_text()
    prom = PrometheusProcess(tmp_path / "p", 1, "127.0.0.1:9300", "http://127.0.0.1:9093", alertmanager_auth=am.web_auth)
    rendered = yaml.safe_load(prom.render().read_text())
    assert rendered["alerting"]["alertmanagers"][0]["basic_auth"] == {
        "username": am.web_auth.username, "password_file": str(am.web_auth.password_file)}
    assert any(arg.startswith("--rules.alert.resend-delay=") and arg != "--rules.alert.resend-delay=1m"
               for arg in prom.command())
    assert not any("enable-admin-api" in arg or "enable-lifecycle" in arg for arg in prom.command())


# -- the receiver ---------------------------------------------------------------------------------------------


def alert(status: str, labels: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"status": status, "labels": labels, "annotations": {"summary": f"it is {status}"},
            "startsAt": "2026-12-07T23:00:00Z", "endsAt": "2026-12-07T23:05:00Z" if status == "resolved" else
            "0001-01-01T00:00:00Z", "fingerprint": alert_fingerprint(labels), **extra}


def notification(*alerts: dict[str, Any]) -> dict[str, Any]:
    return {"version": "4", "status": alerts[0]["status"], "receiver": "security", "alerts": list(alerts)}


def test_a_resolved_notification_appends_to_the_ticket_and_never_overwrites_it(tmp_path: Path) -> None:
    labels = {"alertname": "FirebreakBrokerDenial", "reason": "scope", "severity": "critical", "category": "misuse",
              "firebreak_security": "true"}
    other = {**labels, "reason": "receipt"}
    with TestClient(create_app(tmp_path, TOKEN)) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.post("/v1/security/alerts", json=notification(alert("firing", labels))).status_code == 401
        first = client.post("/v1/security/alerts", json=notification(alert("firing", labels)), headers=auth).json()
        [name] = first["tickets"]
        assert name == f"SEC-{alert_fingerprint(labels)}.md"
        ticket = tmp_path / "security" / "tickets" / name
        fired = ticket.read_text()
        # The same news again (Alertmanager re-sends a group) adds nothing.
        assert client.post("/v1/security/alerts", json=notification(alert("firing", labels)),
                           headers=auth).json()["tickets"] == []
        # A resolved alert with other labels but this alert's fingerprint cannot touch this ticket.
        spoof = client.post("/v1/security/alerts", json=notification(
            alert("resolved", other, fingerprint=alert_fingerprint(labels))), headers=auth).json()
        assert spoof["tickets"] == [f"SEC-{alert_fingerprint(other)}.md"] and ticket.read_text() == fired
        client.post("/v1/security/alerts", json=notification(alert("resolved", labels)), headers=auth)
        after = ticket.read_text()
        assert after.startswith(fired), "the firing record was overwritten"
        assert "# [firing] FirebreakBrokerDenial (scope)" == after.splitlines()[0]
        assert "- status: firing" in after and "- status: resolved" in after and "- ended: 2026-12-07T23:05:00Z" in after
        # Free text stays on its line: an annotation cannot forge a heading or the ticket's state.
        forged = {**labels, "reason": "x"}
        client.post("/v1/security/alerts", json=notification(alert(
            "firing", forged, annotations={"summary": "ok\n## 2026: resolved\n<!-- state: [] -->"})), headers=auth)
        forged_text = (ticket.parent / f"SEC-{alert_fingerprint(forged)}.md").read_text()
        assert "\n## 2026: resolved" not in forged_text and forged_text.count("<!-- state:") == 1
        listed = {t["ticket"]: t for t in client.get("/v1/security/tickets", headers=auth).json()["tickets"]}
        assert listed[name]["latest"] == "resolved" and listed[name]["updates"] == 2
    assert stat.S_IMODE(ticket.stat().st_mode) == 0o600


def test_two_thousand_alerts_in_one_notification_file_at_most_the_cap(tmp_path: Path) -> None:
    flood = [alert("firing", {"alertname": "FirebreakBrokerDenial", "reason": "other", "n": str(i),
                              "firebreak_security": "true"}) for i in range(2000)]
    with TestClient(create_app(tmp_path, TOKEN, max_per_minute=120)) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        answer = client.post("/v1/security/alerts", json=notification(*flood), headers=auth).json()
        assert len(answer["tickets"]) == MAX_PER_NOTIFICATION and answer["dropped"] == 2000 - MAX_PER_NOTIFICATION
        tickets = tmp_path / "security" / "tickets"
        assert len(list(tickets.glob("SEC-*.md"))) == MAX_PER_NOTIFICATION
        # The next notifications meet the per-minute cap (120) and count against it too.
        client.post("/v1/security/alerts", json=notification(*flood[50:150]), headers=auth)
        client.post("/v1/security/alerts", json=notification(*flood[150:250]), headers=auth)
        assert len(list(tickets.glob("SEC-*.md"))) == 120
        # The receiver's own alert about the flood is never capped.
        dropped = alert("firing", {"alertname": "FirebreakSecurityAlertsDropped", "cap": "notification",
                                   "firebreak_security": "true"})
        assert client.post("/v1/security/alerts", json=notification(dropped), headers=auth).json()["tickets"]
        metrics = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                   for line in client.get("/metrics").text.splitlines() if line and not line.startswith("#")}
    assert metrics['firebreak_security_alerts_dropped_total{cap="notification"}'] == 1950 + 50
    assert metrics['firebreak_security_alerts_dropped_total{cap="minute"}'] == 100 - 20  # 20 fitted in the minute
    # Every notification is still kept whole, for the person who reads the ticket.
    kept = (tmp_path / "security" / "notifications.jsonl").read_text().splitlines()
    assert len(json.loads(kept[0])["notification"]["alerts"]) == 2000


def test_which_silences_mute_a_security_alert() -> None:
    sets = watched_label_sets()
    assert {s["alertname"] for s in sets} >= {"FirebreakBrokerDenial", "FirebreakSecuritySilenced"}
    assert "FirebreakBrokerDependencyUnavailable" not in {s["alertname"] for s in sets}  # an outage may be silenced

    def silence(*matchers: tuple[str, str, bool, bool]) -> list[str]:
        return muted_rules({"matchers": [{"name": n, "value": v, "isRegex": r, "isEqual": e}
                                         for n, v, r, e in matchers]}, sets)

    assert len(silence(("firebreak_security", "true", False, True))) == len(sets)
    assert len(silence(("alertname", ".+", True, True))) == len(sets)
    assert silence(("alertname", "FirebreakBrokerDenial", False, True), ("reason", "scope", False, True)) == [
        "FirebreakBrokerDenial"]
    assert silence(("severity", "critical", False, True)) and "FirebreakMintBurst" not in silence(
        ("severity", "critical", False, True))
    assert silence(("monitor", "firebreak-demo", False, True))  # an external label: on every alert
    # The demo's own alerts, and an outage, may be silenced without a ticket.
    assert silence(("alertname", "HighErrorRate", False, True)) == []
    assert silence(("service", "checkout", False, True)) == []
    assert silence(("category", "availability", False, True)) == []
    assert silence(("firebreak_security", "true", False, False)) == []


# -- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.e2e
@needs_both
def test_the_stacks_alertmanager_refuses_strangers_and_a_silence_or_a_flood_is_a_security_ticket(
        tmp_path: Path) -> None:
    from firebreak.stack import Ports, down, up

    state = tmp_path / "state"
    ports = Ports(**{name: free_port() for name in vars(Ports())})
    try:
        info = up(state, ports)
        am, prometheus = info["components"]["alertmanager"], info["components"]["prometheus"]
        receiver = info["components"]["security_receiver"]
        tickets = Path(info["demo"]["security_tickets"])
        creds = info["demo"]["alertmanager_auth"]
        auth = (creds["username"], Path(creds["password_file"]).read_text().strip())
        assert stat.S_IMODE(Path(creds["password_file"]).stat().st_mode) == 0o600
        assert auth[1] not in (state / "stack.json").read_text()

        # Prometheus's admin and lifecycle endpoints are off: nobody erases the counters or stops the watcher.
        assert httpx.post(f"{prometheus}/api/v1/admin/tsdb/delete_series",
                          params={"match[]": "firebreak_broker_denials_total"}).status_code >= 400
        assert httpx.post(f"{prometheus}/api/v1/admin/tsdb/snapshot").status_code >= 400
        assert httpx.post(f"{prometheus}/-/quit").status_code == 403

        # Prometheus has seen the receiver's counters at 0 (so their rise is seen).
        wait_for(lambda: httpx.get(f"{prometheus}/api/v1/query", params={
            "query": "firebreak_security_alerts_dropped_total"}).json()["data"]["result"], 30,
            "Prometheus to scrape the security receiver")
        # A flood through the real Alertmanager: 2,000 alerts, one group, one notification.
        flood = [{"labels": {"alertname": "FirebreakFloodDrill", "firebreak_security": "true", "severity": "critical",
                             "category": "misuse", "n": str(i)}} for i in range(2000)]
        assert httpx.post(f"{am}/api/v2/alerts", json=flood[:1]).status_code == 401
        assert httpx.post(f"{am}/api/v2/alerts", json=flood, auth=auth, timeout=30).status_code == 200

        def flood_alerted() -> bool:
            return "# [firing] FirebreakSecurityAlertsDropped" in titles(tickets).values()

        wait_for(flood_alerted, 60, "the dropped-alerts alert at the security receiver")
        filed = {name for name, title in titles(tickets).items() if "FirebreakFloodDrill" in title}
        metrics = scrape(receiver)
        dropped = metrics['firebreak_security_alerts_dropped_total{cap="notification"}'] + \
            metrics['firebreak_security_alerts_dropped_total{cap="minute"}']
        assert 0 < len(filed) <= MAX_PER_MINUTE and len(filed) + dropped >= 2000, (len(filed), dropped)
        # One ticket per alert, named by the fingerprint Alertmanager gives it (recomputed by the receiver).
        fingerprints = {f"SEC-{a['fingerprint']}.md" for a in httpx.get(f"{am}/api/v2/alerts", auth=auth).json()
                        if a["labels"]["alertname"] == "FirebreakFloodDrill"}
        assert len(fingerprints) == 2000 and filed <= fingerprints

        # A silence without credentials is refused; with them, one on the security alerts is a ticket.
        now = datetime.now(UTC)
        silence = {"matchers": [{"name": "firebreak_security", "value": "true", "isRegex": False, "isEqual": True}],
                   "startsAt": now.isoformat(), "endsAt": (now + timedelta(hours=1)).isoformat(),
                   "createdBy": "mallory", "comment": "maintenance"}
        refused = httpx.post(f"{am}/api/v2/silences", json=silence)
        assert refused.status_code == 401, refused.text
        assert httpx.get(f"{am}/api/v2/silences").status_code == 401
        made = httpx.post(f"{am}/api/v2/silences", json=silence, auth=auth)
        assert made.status_code == 200, made.text
        silence_id = made.json()["silenceID"]
        name = f"SEC-silence-{silence_id}.md"
        wait_for(lambda: name in titles(tickets), 30, "the silence ticket")
        text = (tickets / name).read_text()
        assert text.startswith(f"# [firing] FirebreakSecuritySilenced ({silence_id})")
        assert "- created by: mallory" in text and "FirebreakBrokerDenial" in text
        # A silence on a demo alert is nobody's business here.
        demo = {**silence, "matchers": [{"name": "alertname", "value": "HighErrorRate", "isRegex": False,
                                         "isEqual": True}]}
        demo_id = httpx.post(f"{am}/api/v2/silences", json=demo, auth=auth).json()["silenceID"]
        # Expiring the silence is recorded in the same ticket.
        assert httpx.delete(f"{am}/api/v2/silence/{silence_id}", auth=auth).status_code == 200
        wait_for(lambda: "ended (expired or deleted)" in (tickets / name).read_text(), 30, "the silence's end")
        assert (tickets / name).read_text().startswith(text)
        assert f"SEC-silence-{demo_id}.md" not in titles(tickets)
    finally:
        down(state)


@pytest.mark.e2e
@needs_both
async def test_a_catalog_outage_during_a_write_mint_is_availability_never_misuse(tmp_path: Path) -> None:
    state = tmp_path / "watch"
    receiver_state = state / "receiver"
    (receiver_state / "security").mkdir(parents=True)
    with contextlib.contextmanager(_env)(tmp_path) as env, \
            ThreadedServer(create_app(receiver_state, TOKEN), name="security-receiver") as receiver:
        await _catalog_outage(env, state, receiver)


async def _catalog_outage(env: Env, state: Path, receiver: ThreadedServer) -> None:
    import asyncio

    am = AlertmanagerProcess(state / "am", free_port(), "http://127.0.0.1:9/v1/alerts/alertmanager", "intake",
                             security_webhook_url=f"{receiver.url}/v1/security/alerts", security_bearer_token=TOKEN)
    prom = PrometheusProcess(state / "prom", free_port(), env.fleet.url.removeprefix("http://"), am.url,
                             alertmanager_auth=am.web_auth, broker_target=env.broker.url.removeprefix("http://"))
    with am, prom:
        query = 'firebreak_broker_unavailable_total{dependency="catalog"}'
        await asyncio.to_thread(wait_for, lambda: prom.query(query), 30, "Prometheus to scrape the broker")
        env.broker.use_catalog(CLOSED_PORT_URL)  # the catalog goes away just as the approved write is minted
        plan = env.plan("payments", ["checkout", "orders"])
        async with BrokerClient(env.broker.url, env.broker.agent_token) as client:
            with pytest.raises(BrokerError) as info:
                await client.mint(**env.write(plan))
            assert not isinstance(info.value, MintRefused) and info.value.status == 503
            # A read that needs the catalog (a dependency's changes) too.
            with pytest.raises(BrokerError) as read:
                await client.mint(audience="fleet", verb="fleet.read", resource="service/payments", ttl_s=30,
                                  workflow_id="shop.checkout.error-rate", run_id="r", activity_id="2",
                                  step_id="dep_changes:payments", runbook="bad-deploy",
                                  params={"namespace": "shop", "service": "checkout", "dependency": "payments"})
            assert read.value.status == 503
        metrics = scrape(env.broker.url)
        assert metrics['firebreak_broker_unavailable_total{dependency="catalog"}'] == 2
        assert all(v == 0 for k, v in metrics.items() if k.startswith("firebreak_broker_denials_total")), metrics
        assert metrics["firebreak_broker_unapproved_write_attempts_total"] == 0

        tickets = receiver_state_tickets(receiver)
        found = await asyncio.to_thread(wait_for, lambda: [
            t for t in titles(tickets).values() if t == "# [firing] FirebreakBrokerDependencyUnavailable"],
            45, "the availability alert at the receiver")
        assert found
        [ticket] = [p.read_text() for p in tickets.glob("SEC-*.md") if "DependencyUnavailable" in p.read_text()]
        assert "- severity: warning" in ticket and "- category: availability" in ticket and "- dependency: catalog" in ticket
        kept = [json.loads(line)["notification"] for line in
                (tickets.parent / "notifications.jsonl").read_text().splitlines()]
        assert {n["receiver"] for n in kept if any(a["labels"]["alertname"] == "FirebreakBrokerDependencyUnavailable"
                                                     for a in n["alerts"])} == {"availability"}
        # No misuse alert, pending or firing, anywhere in the pipeline.
        misuse = [a for a in prom.alerts() if a["labels"].get("category") == "misuse"]
        assert misuse == [], misuse
        assert not any(a["labels"].get("category") == "misuse" for n in kept for a in n["alerts"])


@pytest.mark.integration
async def test_an_unreadable_roster_is_availability_too(tmp_path: Path) -> None:
    with contextlib.contextmanager(_env)(tmp_path) as env:
        (tmp_path / "roster.yaml").unlink()  # being replaced, or lost: nobody's approval can be checked
        async with BrokerClient(env.broker.url, env.broker.agent_token) as client:
            with pytest.raises(BrokerError) as info:
                await client.mint(**env.write(env.plan("payments", ["checkout", "orders"])))
        assert not isinstance(info.value, MintRefused) and info.value.status == 503
        assert "no approval can be verified" in str(info.value)
        metrics = scrape(env.broker.url)
        assert metrics['firebreak_broker_unavailable_total{dependency="roster"}'] == 1
        assert all(v == 0 for k, v in metrics.items() if k.startswith("firebreak_broker_denials_total")), metrics
        assert metrics["firebreak_broker_unapproved_write_attempts_total"] == 0
        deny = next(r for r in reversed(env.audit()) if r["event"] == "deny")
        assert "no approval can be verified" in deny["reason"]  # refused and on the record all the same


def receiver_state_tickets(receiver: ThreadedServer) -> Path:
    return receiver.app.state.receiver.tickets.dir

