"""The demo fleet: metrics follow the faults, the managed API acts and is guarded.

Most tests drive the ASGI app in-process with a manual clock, so "ten seconds of
traffic" takes no time; one runs the real server over HTTP and one the CLI.
Tokens are real (firebreak.signing), never mocked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo.fleet import BUCKETS, Fleet, FleetServer, create_app, parse_rfc3339, rfc3339
from demo.prom import free_port
from firebreak.contracts import canonical_json
from firebreak.signing import generate_key, key_id, public_jwk

from fixtures_demo import Minter, chaos_token, fleet_server, minter  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]
Labels = frozenset[tuple[str, str]]
_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class ManualClock:
    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def parse_metrics(text: str) -> dict[tuple[str, Labels], float]:
    samples: dict[tuple[str, Labels], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        assert match, f"not exposition format: {line!r}"
        labels = frozenset(_LABEL.findall(match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def value(samples: dict[tuple[str, Labels], float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
    assert found, f"no sample {name}{labels}"
    return sum(found)


def error_ratio(before: dict, after: dict, service: str) -> float:
    def d(code: str) -> float:
        return value(after, "http_requests_total", service=service, code=code) - value(
            before, "http_requests_total", service=service, code=code)

    total = d("200") + d("500") + d("503")
    return (d("500") + d("503")) / total


def p99(before: dict, after: dict, service: str) -> float:
    """histogram_quantile(0.99, ...) over the increase between two scrapes, as Prometheus computes it."""
    les = [*BUCKETS, float("inf")]
    names = [*(repr(b) if b != int(b) else f"{b:.1f}" for b in BUCKETS), "+Inf"]
    counts = [value(after, "http_request_duration_seconds_bucket", service=service, le=n)
              - value(before, "http_request_duration_seconds_bucket", service=service, le=n) for n in names]
    rank = 0.99 * counts[-1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in zip(les, counts, strict=True):
        if count >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    raise AssertionError("unreachable")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sim(clock: ManualClock) -> Fleet:
    return Fleet(clock=clock)


@pytest.fixture
async def client(sim: Fleet, minter: Minter, chaos_token: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(verifier=minter.verifier(), chaos_token=chaos_token, fleet=sim)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fleet") as c:
        yield c


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, Labels], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(response.text)


async def fault(client: httpx.AsyncClient, token: str, service: str, kind: str) -> dict[str, Any]:
    response = await client.post("/demo/faults", json={"service": service, "kind": kind},
                                 headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return response.json()


# -- metrics --------------------------------------------------------------------------


async def test_metrics_exposition_is_well_formed_and_monotonic(client: httpx.AsyncClient, clock: ManualClock) -> None:
    clock.tick(10)
    first = await scrape(client)
    clock.tick(10)
    second = await scrape(client)
    for service in ("checkout", "payments", "inventory"):
        labels = {"namespace": "shop", "service": service}
        assert value(second, "fleet_service_replicas", **labels) == 3
        assert value(second, "fleet_service_serving", **labels) == 1
        assert value(second, "fleet_deploy_info", **labels) == 1
        assert 0.25 < value(second, "service_cpu_utilization", **labels) < 0.35
        # ~40 req/s, healthy ~0.5% 5xx
        served = value(second, "http_requests_total", **labels) - value(first, "http_requests_total", **labels)
        assert 395 <= served <= 405
        # buckets cumulative, +Inf equals _count
        buckets = [value(second, "http_request_duration_seconds_bucket", le=n, **labels)
                   for n in [*(repr(b) if b != int(b) else f"{b:.1f}" for b in BUCKETS), "+Inf"]]
        assert buckets == sorted(buckets)
        assert buckets[-1] == value(second, "http_request_duration_seconds_count", **labels)
        assert p99(first, second, service) < 0.3
    assert error_ratio(first, second, "checkout") == pytest.approx(0.005, abs=0.003)
    for key, v in first.items():
        if key[0] in ("http_requests_total", "http_request_duration_seconds_bucket"):
            assert second[key] >= v, key


async def test_bad_deploy_raises_5xx_and_rollback_restores(client: httpx.AsyncClient, clock: ManualClock,
                                                           minter: Minter, chaos_token: str) -> None:
    state = await fault(client, chaos_token, "checkout", "bad_deploy")
    assert state["version"] == "v42" and state["previous_version"] == "v41"
    before = await scrape(client)
    clock.tick(20)
    after = await scrape(client)
    assert error_ratio(before, after, "checkout") == pytest.approx(0.25, abs=0.01)
    assert error_ratio(before, after, "payments") < 0.01  # only the faulty service
    assert value(after, "fleet_deploy_info", service="checkout", version="v42") == 1
    assert not any(n == "fleet_deploy_info" and ("version", "v41") in ls and ("service", "checkout") in ls
                   for n, ls in after)

    changes = (await client.get("/services/checkout/changes",
                                headers=minter.headers("fleet.read", "service/checkout"))).json()["changes"]
    deploy = changes[-1]
    assert deploy["kind"] == "deploy" and deploy["author"] == "ci-bot"
    assert (deploy["version"], deploy["previous_version"]) == ("v42", "v41")

    response = await client.post("/services/checkout/rollback", **minter.write("fleet.rollback", "service/checkout"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["version"], body["previous_version"]) == ("v41", "v42")  # what an undo (deploy v42) needs
    assert body["change"]["kind"] == "rollback" and body["change"]["author"] == "firebreak-agent"
    before = await scrape(client)
    clock.tick(20)
    after = await scrape(client)
    assert error_ratio(before, after, "checkout") < 0.01

    # The undo of the rollback is a deploy of previous_version: the bad version comes back.
    response = await client.post("/services/checkout/deploy", **minter.write("fleet.deploy", "service/checkout", {"version": body["previous_version"]}))
    assert response.status_code == 200
    assert (response.json()["version"], response.json()["previous_version"]) == ("v42", "v41")
    before = await scrape(client)
    clock.tick(10)
    assert error_ratio(before, await scrape(client), "checkout") > 0.2


async def test_saturation_then_scale_out(client: httpx.AsyncClient, clock: ManualClock, minter: Minter,
                                         chaos_token: str) -> None:
    await fault(client, chaos_token, "payments", "saturation")
    before = await scrape(client)
    clock.tick(30)
    after = await scrape(client)
    assert value(after, "service_cpu_utilization", service="payments") == pytest.approx(0.95, abs=0.02)
    assert 1.5 <= p99(before, after, "payments") <= 3.0
    assert value(after, "service_cpu_utilization", service="checkout") < 0.4

    response = await client.post("/services/payments/scale", **minter.write("fleet.scale", "service/payments", {"replicas": 6}))
    assert response.status_code == 200, response.text
    assert (response.json()["previous_replicas"], response.json()["replicas"]) == (3, 6)
    before = await scrape(client)
    clock.tick(30)
    after = await scrape(client)
    assert value(after, "fleet_service_replicas", service="payments") == 6
    assert value(after, "service_cpu_utilization", service="payments") < 0.6
    assert p99(before, after, "payments") < 0.5
    assert error_ratio(before, after, "payments") < 0.01


async def test_stuck_until_restart(client: httpx.AsyncClient, clock: ManualClock, minter: Minter,
                                   chaos_token: str) -> None:
    await fault(client, chaos_token, "inventory", "stuck")
    before = await scrape(client)
    clock.tick(30)
    after = await scrape(client)
    assert value(after, "fleet_service_serving", service="inventory") == 0
    assert value(after, "http_requests_total", service="inventory") == value(before, "http_requests_total",
                                                                              service="inventory")
    assert value(after, "fleet_service_replicas", service="inventory") == 3
    state = (await client.get("/services/inventory", headers=minter.headers("fleet.read", "service/inventory"))).json()
    assert state["serving"] is False and state["state"] == "stuck"

    response = await client.post("/services/inventory/restart", **minter.write("fleet.restart", "service/inventory"))
    assert response.status_code == 200, response.text
    assert response.json()["change"]["kind"] == "restart"
    before = await scrape(client)
    clock.tick(10)
    after = await scrape(client)
    assert value(after, "fleet_service_serving", service="inventory") == 1
    assert value(after, "http_requests_total", service="inventory") - value(
        before, "http_requests_total", service="inventory") >= 395


async def test_clear_resets_faults(client: httpx.AsyncClient, chaos_token: str) -> None:
    await fault(client, chaos_token, "checkout", "bad_deploy")
    await fault(client, chaos_token, "checkout", "saturation")
    state = await fault(client, chaos_token, "checkout", "clear")
    assert state["faults"] == {"bad_version": False, "saturation": False, "stuck": False}
    assert state["error_ratio"] == pytest.approx(0.005)


# -- change log -------------------------------------------------------------------------------


async def test_change_log_records_every_change_and_filters_by_since(client: httpx.AsyncClient, clock: ManualClock,
                                                                    minter: Minter, chaos_token: str) -> None:
    read = lambda: minter.headers("fleet.read", "service/checkout")  # noqa: E731 - a fresh token per request
    initial = (await client.get("/services/checkout/changes", headers=read())).json()["changes"]
    assert [c["kind"] for c in initial] == ["deploy"]
    assert clock.now - parse_rfc3339(initial[0]["at"]) > 86400  # deployed long before the demo
    clock.tick(5)
    since = rfc3339(clock.now)

    await fault(client, chaos_token, "checkout", "bad_deploy")
    clock.tick(1)
    for path, verb, body in [("rollback", "fleet.rollback", None), ("restart", "fleet.restart", None),
                             ("scale", "fleet.scale", {"replicas": 4}), ("deploy", "fleet.deploy", {"version": "v43"})]:
        response = await client.post(f"/services/checkout/{path}", **minter.write(verb, "service/checkout", body))
        assert response.status_code == 200, response.text
        clock.tick(1)

    response = await client.get("/services/checkout/changes", params={"since": since}, headers=read())
    assert response.status_code == 200
    changes = response.json()["changes"]
    assert [c["kind"] for c in changes] == ["deploy", "rollback", "restart", "scale", "deploy"]
    assert [c["author"] for c in changes] == ["ci-bot"] + ["firebreak-agent"] * 4
    for c in changes:
        assert set(c) == {"id", "service", "kind", "at", "version", "previous_version", "author", "description"}
        assert c["at"].endswith("Z") and parse_rfc3339(c["at"]) >= parse_rfc3339(since)
        assert c["service"] == "checkout"
    assert len({c["id"] for c in changes}) == 5
    assert "workflow_id=shop.checkout.error-rate" in changes[1]["description"]
    assert (changes[-1]["version"], changes[-1]["previous_version"]) == ("v43", "v41")

    bad = await client.get("/services/checkout/changes", params={"since": "yesterday"}, headers=read())
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_request"


async def test_noop_writes_do_not_record_changes(client: httpx.AsyncClient, minter: Minter) -> None:
    response = await client.post("/services/payments/scale", **minter.write("fleet.scale", "service/payments", {"replicas": 3}))
    assert response.json() == {"service": "payments", "changed": False, "replicas": 3, "previous_replicas": 3,
                               "change": None}
    response = await client.post("/services/payments/deploy", **minter.write("fleet.deploy", "service/payments", {"version": "v17"}))
    assert response.json()["changed"] is False
    response = await client.post("/services/payments/rollback", **minter.write("fleet.rollback", "service/payments"))
    assert response.status_code == 409 and response.json()["error"] == "conflict"  # nothing to roll back to
    changes = (await client.get("/services/payments/changes",
                                headers=minter.headers("fleet.read", "service/payments"))).json()["changes"]
    assert len(changes) == 1


# -- idempotency ---------------------------------------------------------------------------------


async def test_idempotency_key_replays_without_acting_twice(client: httpx.AsyncClient, sim: Fleet, minter: Minter,
                                                            chaos_token: str) -> None:
    await fault(client, chaos_token, "checkout", "bad_deploy")
    key = {"Idempotency-Key": "shop.checkout.error-rate/run-1/rollback"}
    # Each attempt carries a fresh token (tokens are single use); the key makes it one action.
    first = await client.post("/services/checkout/rollback",
                              **minter.write("fleet.rollback", "service/checkout", key=key["Idempotency-Key"]))
    second = await client.post("/services/checkout/rollback",
                               **minter.write("fleet.rollback", "service/checkout", key=key["Idempotency-Key"]))
    assert first.status_code == second.status_code == 200
    assert second.json() == first.json()
    assert second.headers.get("idempotent-replayed") == "true"
    assert sim.service_state("checkout")["version"] == "v41"  # a second rollback would have swapped back to v42
    kinds = [c["kind"] for c in sim.changes("checkout")]
    assert kinds.count("rollback") == 1

    # The same key for another request is refused, not replayed.
    other = await client.post("/services/checkout/scale", **minter.write("fleet.scale", "service/checkout", {"replicas": 5}, key=key["Idempotency-Key"]))
    assert other.status_code == 422 and other.json()["error"] == "idempotency_key_reused"

    # Scale: replay returns the stored previous_replicas even though the state moved on.
    skey = {"Idempotency-Key": "scale-1"}
    a = await client.post("/services/checkout/scale", **minter.write("fleet.scale", "service/checkout", {"replicas": 6}, key=skey["Idempotency-Key"]))
    b = await client.post("/services/checkout/scale", **minter.write("fleet.scale", "service/checkout", {"replicas": 6}, key=skey["Idempotency-Key"]))
    assert a.json() == b.json() and a.json()["previous_replicas"] == 3
    assert [c["kind"] for c in sim.changes("checkout")].count("scale") == 1


async def test_idempotent_replay_still_needs_a_valid_token(client: httpx.AsyncClient, minter: Minter) -> None:
    key = {"Idempotency-Key": "restart-1"}
    ok = await client.post("/services/checkout/restart", **minter.write("fleet.restart", "service/checkout", key=key["Idempotency-Key"]))
    assert ok.status_code == 200
    denied = await client.post("/services/checkout/restart", headers=key)
    assert denied.status_code == 401
    wrong = await client.post("/services/checkout/restart",
                              **minter.write("fleet.restart", "service/payments", key=key["Idempotency-Key"]))
    assert wrong.status_code == 403


async def test_a_write_token_is_good_for_its_exact_request_only(client: httpx.AsyncClient, sim: Fleet,
                                                                minter: Minter) -> None:
    """The token binds the Idempotency-Key and the SHA-256 of the body: a tampered body or key is 403."""
    write = minter.write("fleet.scale", "service/checkout", {"replicas": 4}, key="k-scale")
    tampered = await client.post("/services/checkout/scale", content=canonical_json({"replicas": 30}),
                                 headers=write["headers"])
    assert tampered.status_code == 403 and "body differs" in tampered.json()["reason"]
    write = minter.write("fleet.scale", "service/checkout", {"replicas": 4}, key="k-scale")
    other_key = await client.post("/services/checkout/scale", content=write["content"],
                                  headers=write["headers"] | {"Idempotency-Key": "k-other"})
    assert other_key.status_code == 403 and "Idempotency-Key differs" in other_key.json()["reason"]
    unbound = await client.post("/services/checkout/scale", json={"replicas": 4},
                                headers=minter.headers("fleet.scale", "service/checkout"))
    assert unbound.status_code == 403 and "does not bind its request" in unbound.json()["reason"]
    assert sim.service_state("checkout")["replicas"] == 3  # none of them acted


async def test_an_undo_token_takes_its_values_from_the_recorded_write(client: httpx.AsyncClient, sim: Fleet,
                                                                     minter: Minter, chaos_token: str) -> None:
    """Finding 3: an undo before its step ran, or with values other than the ones recorded, is refused."""
    await fault(client, chaos_token, "checkout", "bad_deploy")  # v42 is running, v41 before it

    def undo(version: str) -> dict[str, Any]:
        req = {"idempotency_key": "wf/run/s1/undo", "undo_of": "wf/run/s1/do",
               "undo_body": {"version": "{result.previous_version}"}}
        token = minter.mint("fleet.deploy", "service/checkout", req=req)[0]
        return {"content": canonical_json({"version": version}),
                "headers": {"Authorization": f"Bearer {token}", "Idempotency-Key": "wf/run/s1/undo"}}

    early = await client.post("/services/checkout/deploy", **undo("v42"))
    assert early.status_code == 403 and "has not run here" in early.json()["reason"]
    done = await client.post("/services/checkout/rollback", **minter.write("fleet.rollback", "service/checkout",
                                                                           key="wf/run/s1/do"))
    assert done.status_code == 200 and done.json()["previous_version"] == "v42"
    pwned = await client.post("/services/checkout/deploy", **undo("pwned"))
    assert pwned.status_code == 403 and "differs from the state recorded" in pwned.json()["reason"]
    assert sim.service_state("checkout")["version"] == "v41"
    restored = await client.post("/services/checkout/deploy", **undo("v42"))
    assert restored.status_code == 200 and sim.service_state("checkout")["version"] == "v42"


# -- auth -------------------------------------------------------------------------------------------


async def test_auth_failures(client: httpx.AsyncClient, minter: Minter) -> None:
    async def status(method: str, path: str, headers: dict[str, str], **kw: Any) -> tuple[int, dict[str, Any]]:
        response = await client.request(method, path, headers=headers, **kw)
        body = response.json()
        assert set(body) == {"error", "reason"}, body
        return response.status_code, body

    other = generate_key()
    stranger = Minter(other, key_id(other))
    cases: list[tuple[str, str, dict[str, str], int]] = [
        ("GET", "/services/checkout", {}, 401),
        ("GET", "/services/checkout", {"Authorization": "Basic dXNlcjpwYXNz"}, 401),
        ("GET", "/services/checkout", {"Authorization": "Bearer not-a-jwt"}, 401),
        ("GET", "/services/checkout", stranger.headers("fleet.read", "service/checkout"), 401),  # unknown key
        ("GET", "/services/checkout", minter.headers("fleet.read", "service/checkout", audience="prometheus"), 403),
        ("GET", "/services/checkout", minter.headers("fleet.read", "service/payments"), 403),
        ("GET", "/services/checkout/changes", minter.headers("fleet.rollback", "service/checkout"), 403),
        ("POST", "/services/checkout/rollback", minter.headers("fleet.read", "service/checkout"), 403),
        ("POST", "/services/checkout/rollback", minter.headers("fleet.restart", "service/checkout"), 403),
        ("POST", "/services/checkout/rollback", minter.headers("fleet.rollback", "service/payments"), 403),
        ("POST", "/services/checkout/scale", minter.headers("fleet.deploy", "service/checkout"), 403),
        ("POST", "/services/checkout/deploy", {}, 401),
    ]
    for method, path, headers, expected in cases:
        code, body = await status(method, path, headers, json={"replicas": 4} if path.endswith("scale") else None)
        assert code == expected, (method, path, body)
        assert body["error"] == ("unauthorized" if expected == 401 else "forbidden")
        assert "Bearer ey" not in body["reason"]

    # A token is single use: presenting it again is a replay.
    headers = minter.headers("fleet.read", "service/checkout")
    assert (await client.get("/services/checkout", headers=headers)).status_code == 200
    code, body = await status("GET", "/services/checkout", headers)
    assert code == 401 and "replay" in body["reason"]


async def test_unknown_service_and_bad_bodies(client: httpx.AsyncClient, minter: Minter) -> None:
    response = await client.get("/services/nosuch", headers=minter.headers("fleet.read", "service/nosuch"))
    assert response.status_code == 404 and response.json()["error"] == "not_found"
    response = await client.post("/services/nosuch/rollback", **minter.write("fleet.rollback", "service/nosuch"))
    assert response.status_code == 404 and response.json()["error"] == "not_found"
    # Auth comes before the body: an unauthenticated bad body is 401, not 422.
    assert (await client.post("/services/checkout/scale", json={"replicas": "many"})).status_code == 401
    for body in [{"replicas": 0}, {"replicas": 31}, {"replicas": "many"}, {"replicas": 4, "extra": 1}, {}]:
        response = await client.post("/services/checkout/scale", **minter.write("fleet.scale", "service/checkout", body))
        assert response.status_code == 422, body
        assert response.json()["error"] == "invalid_request"
    response = await client.post("/services/checkout/deploy", **minter.write("fleet.deploy", "service/checkout", {"version": "../etc"}))
    assert response.status_code == 422
    response = await client.post("/services/checkout/deploy", **minter.write("fleet.deploy", "service/checkout", raw=b"{not json"))
    assert response.status_code == 400
    response = await client.get("/no/such/route")
    assert response.status_code == 404 and set(response.json()) == {"error", "reason"}


# -- demo control ------------------------------------------------------------------------------------


async def test_demo_control_needs_the_chaos_token(client: httpx.AsyncClient, chaos_token: str,
                                                  minter: Minter) -> None:
    body = {"service": "checkout", "kind": "stuck"}
    assert (await client.post("/demo/faults", json=body)).status_code == 401
    assert (await client.post("/demo/faults", json=body, headers={"Authorization": "Bearer wrong"})).status_code == 401
    # A fleet write token is not a chaos token.
    agent = minter.headers("fleet.restart", "service/checkout")
    assert (await client.post("/demo/faults", json=body, headers=agent)).status_code == 401
    auth = {"Authorization": f"Bearer {chaos_token}"}
    bad_kind = await client.post("/demo/faults", json={"service": "checkout", "kind": "meteor"}, headers=auth)
    assert bad_kind.status_code == 422
    missing = await client.post("/demo/faults", json={"service": "nosuch", "kind": "stuck"}, headers=auth)
    assert missing.status_code == 404
    state = (await client.get("/demo/state")).json()
    assert not state["services"]["checkout"]["faults"]["stuck"]
    assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_chaos_disabled_without_token(sim: Fleet, minter: Minter) -> None:
    app = create_app(verifier=minter.verifier(), chaos_token=None, fleet=sim)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fleet") as c:
        response = await c.post("/demo/faults", json={"service": "checkout", "kind": "stuck"},
                                headers={"Authorization": "Bearer "})
        assert response.status_code == 403


# -- over real HTTP ---------------------------------------------------------------------------------


def test_fleet_server_over_http(fleet_server: FleetServer, minter: Minter, chaos_token: str) -> None:
    with httpx.Client(base_url=fleet_server.url, timeout=5) as c:
        assert c.get("/healthz").status_code == 200
        assert "http_requests_total" in c.get("/metrics").text
        r = c.post("/demo/faults", json={"service": "checkout", "kind": "bad_deploy"},
                   headers={"Authorization": f"Bearer {chaos_token}"})
        assert r.status_code == 200
        r = c.post("/services/checkout/rollback", **minter.write("fleet.rollback", "service/checkout"))
        assert r.status_code == 200 and r.json()["version"] == "v41"
    port = fleet_server.port
    fleet_server.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


class BrokerKeys:
    """The two broker endpoints a target reads, JWKS and revocation list, served from a test key.

    The CLI's verifier (the real TargetVerifier.from_broker) fetches and polls them
    over HTTP exactly as it does from the broker.
    """

    def __init__(self, minter: Minter) -> None:
        self.jwks = json.dumps({"keys": [public_jwk(minter.key, minter.kid)]}).encode()
        self.revoked: list[str] = []
        self.url = ""


@pytest.fixture
def broker_keys(minter: Minter) -> Iterator[BrokerKeys]:
    keys = BrokerKeys(minter)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            revoked = json.dumps({"revoked": list(keys.revoked)}).encode()
            body = {"/.well-known/jwks.json": keys.jwks, "/v1/revoked": revoked}.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    keys.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield keys
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_cli_runs_with_the_broker_verifier(broker_keys: BrokerKeys, minter: Minter, chaos_token: str) -> None:
    port = free_port()
    env = {**os.environ, "FIREBREAK_CHAOS_TOKEN": chaos_token}  # env, not argv: argv is visible in ps
    process = subprocess.Popen(
        [sys.executable, "-m", "demo.fleet", "--port", str(port), "--broker-url", broker_keys.url,
         "--log-level", "warning"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=2) as c:
            for _ in range(200):
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
                threading.Event().wait(0.05)
            r = c.get("/services/checkout", headers=minter.headers("fleet.read", "service/checkout"))
            assert r.status_code == 200 and r.json()["version"] == "v41"
            r = c.post("/demo/faults", json={"service": "checkout", "kind": "stuck"},
                       headers={"Authorization": f"Bearer {chaos_token}"})
            assert r.status_code == 200
            # A revoked grant is refused once the fleet's poll (every second) has seen it.
            token, claims = minter.mint("fleet.restart", "service/checkout")
            broker_keys.revoked.append(claims["jti"])
            time.sleep(2.0)
            r = c.post("/services/checkout/restart", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401 and r.json()["reason"] == "token revoked"
            r = c.post("/services/checkout/restart", **minter.write("fleet.restart", "service/checkout"))
            assert r.status_code == 200
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    output = process.stdout.read().decode() if process.stdout else ""
    assert chaos_token not in output and "eyJ" not in output  # no secret in the logs
