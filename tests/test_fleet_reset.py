"""The demo fleet's reset: a service as the demo started it, for benchmarks that reuse a service."""

from __future__ import annotations

import time

from demo.fleet import INITIAL_REPLICAS, INITIAL_VERSIONS, Fleet


def test_reset_gives_the_service_a_fresh_start_and_leaves_the_others_alone() -> None:
    now = [1_750_000_000.0]
    fleet = Fleet(clock=lambda: now[0])
    fleet.inject("checkout", "bad_deploy")
    fleet.scale("checkout", 6, author="firebreak-agent")
    fleet.inject("checkout", "stuck")
    fleet.inject("payments", "saturation")
    now[0] += 60
    before = fleet.metrics_text()

    state = fleet.inject("checkout", "reset")

    assert state["version"] == INITIAL_VERSIONS["checkout"] and state["previous_version"] is None
    assert state["replicas"] == INITIAL_REPLICAS and state["serving"]
    assert state["faults"] == {"bad_version": False, "saturation": False, "stuck": False}
    # The next trial's lookback finds nothing of the last one: only the original deploy, days ago.
    [origin] = fleet.changes("checkout")
    assert origin["author"] == "ci-bot" and origin["version"] == INITIAL_VERSIONS["checkout"]
    assert fleet.changes("checkout", since=now[0] - 30 * 60) == []
    # Another service's fault and history are untouched.
    assert fleet.demo_state()["services"]["payments"]["faults"]["saturation"]
    assert fleet.changes("payments")
    # Counters never fall: Prometheus would read a drop as a counter reset.
    now[0] += 1
    after = fleet.metrics_text()
    requests = [line for line in before.splitlines() if line.startswith('http_requests_total{namespace="shop",service="checkout",code="200"}')]
    again = [line for line in after.splitlines() if line.startswith('http_requests_total{namespace="shop",service="checkout",code="200"}')]
    assert float(again[0].split()[-1]) >= float(requests[0].split()[-1])


def test_a_bad_deploy_after_a_reset_is_a_new_deploy_in_the_change_log() -> None:
    fleet = Fleet(clock=time.time)
    fleet.inject("inventory", "bad_deploy")
    fleet.inject("inventory", "reset")
    state = fleet.inject("inventory", "bad_deploy")
    assert state["faults"]["bad_version"]
    assert [c["kind"] for c in fleet.changes("inventory")] == ["deploy", "deploy"]
