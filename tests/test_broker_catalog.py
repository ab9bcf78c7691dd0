"""The broker checks a plan's dependency and blast radius against its own read of the catalog.

A real broker and the real demo fleet's catalog (checkout -> payments, checkout -> inventory,
orders -> payments), no mocks: a forged dependency name that passes the pattern is refused, a plan whose
blast radius omits orders is refused naming it, the honest plan is issued, an understated impact cannot
slip under ``max_dependents``, and a catalog the broker cannot reach refuses the write (503, retryable).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from demo.fleet import FleetServer
from firebreak import signing
from firebreak.blast_radius import BlastRadius, Dependent
from firebreak.broker.client import BrokerClient, BrokerError, MintRefused
from firebreak.broker.server import BrokerServer
from firebreak.contracts import Approval, Hypothesis, Plan
from firebreak.plan import build_plan
from firebreak.receipts import ensure_intake_key, intake_signer
from firebreak.roster import entry_yaml
from firebreak.runbook import Runbook, default_runbook_dir, load_runbooks

WF = "shop.checkout.error-rate"
PARAMS = {"namespace": "shop", "service": "checkout"}
CLOSED_PORT_URL = "http://127.0.0.1:9"  # discard port: nothing listens


@dataclass
class Env:
    broker: BrokerServer
    fleet: FleetServer
    state_dir: Path
    key: signing.Ed25519PrivateKey
    runbook: Runbook

    def plan(self, dependency: str, dependents: list[str], run_id: str | None = None) -> Plan:
        hypothesis = Hypothesis(id="dependency_failure", title=f"failing dependency: {dependency}", score=0.9,
                                findings=[], actions=["rollback_dependency"], params={"dependency": dependency})
        plan = build_plan(self.runbook, PARAMS, hypothesis, incident_id=WF, run_id=run_id or uuid.uuid4().hex)
        assert plan is not None
        impact = BlastRadius(target=dependency, dependents=[Dependent(name=n) for n in dependents])
        return plan.model_copy(update={"impact": {"s1": impact}})

    def write(self, plan: Plan) -> dict[str, Any]:
        step = plan.steps[0]
        approval = signing.sign_approval(Approval(
            workflow_id=WF, plan_hash=plan.hash, decision="approve", nonce=uuid.uuid4().hex,
            expires_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat(), approver="alice"), self.key)
        return dict(audience=step.target, verb=step.verb, resource=step.resource, ttl_s=60, workflow_id=WF,
                    run_id=plan.run_id, activity_id="9", step_id=step.id, runbook="bad-deploy",
                    params=plan.params, plan=plan, approvals=[approval],
                    receipts=[intake_signer(ensure_intake_key(self.state_dir))(WF)])

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.broker.audit_path.read_text().splitlines()]

    async def refused(self, fields: dict[str, Any], expect: str) -> str:
        async with BrokerClient(self.broker.url, self.broker.agent_token) as client:
            with pytest.raises(MintRefused) as info:
                await client.mint(**fields)
        assert expect in info.value.reason, info.value.reason
        deny = next(r for r in reversed(self.audit()) if r["event"] == "deny")
        assert deny["reason"] == info.value.reason
        return info.value.reason


def _env(tmp_path: Path, cap: int | None = None) -> Iterator[Env]:
    runbooks = tmp_path / "runbooks"
    runbooks.mkdir()
    text = (default_runbook_dir() / "bad-deploy.yaml").read_text()
    if cap is not None:
        text = text.replace("\nremediate:\n", f"\nremediate:\n  caps: {{max_dependents: {cap}}}\n", 1)
    (runbooks / "bad-deploy.yaml").write_text(text)
    runbook = load_runbooks(runbooks)[0]
    groups = runbook.remediate.policy_for(runbook.remediate.actions["rollback_dependency"]).groups
    key = signing.generate_key()
    roster = tmp_path / "roster.yaml"
    roster.write_text("people:\n" + entry_yaml("alice", [groups[0]], signing.public_pem(key)))
    with BrokerServer(tmp_path / "state", roster_path=roster, runbooks_dir=runbooks) as broker:
        verifier = signing.TargetVerifier.from_broker(broker.url, "fleet")
        catalog = signing.TargetVerifier.from_broker(broker.url, "catalog")
        with FleetServer(verifier=verifier, chaos_token="test-chaos", close_verifier=True,
                         catalog_verifier=catalog) as fleet:
            broker.use_catalog(fleet.url)
            yield Env(broker, fleet, tmp_path / "state", key, runbook)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from _env(tmp_path)


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[Env]:
    yield from _env(tmp_path, cap=1)


async def test_the_honest_plan_is_issued_and_the_broker_read_the_catalog_itself(env: Env) -> None:
    plan = env.plan("payments", ["checkout", "orders"])
    async with BrokerClient(env.broker.url, env.broker.agent_token) as client:
        credential = await client.mint(**env.write(plan))
    assert credential.scope == {"verb": "fleet.rollback", "resource": "service/payments"}
    # Its own reads, each a token naming the entity, are in its audit log.
    reads = [r for r in env.audit() if r["event"] == "catalog_read"]
    resources = {r["scope"]["resource"] for r in reads}
    assert {"component/checkout", "component/payments", "component/orders"} <= resources
    assert all(r["subject"] == "firebreak-broker" and r["audience"] == "catalog" for r in reads)
    assert all("HTTP 200" in r["reason"] for r in reads)


async def test_a_forged_dependency_that_passes_the_pattern_is_refused(env: Env) -> None:
    await env.refused(env.write(env.plan("payments-x", [])),
                      "payments-x is not a dependency of checkout in the catalog")
    # orders is in the catalog, but checkout does not depend on it: no write, and no read of its changes.
    await env.refused(env.write(env.plan("orders", [])), "orders is not a dependency of checkout in the catalog")
    await env.refused(dict(audience="fleet", verb="fleet.read", resource="service/orders", ttl_s=30,
                           workflow_id=WF, run_id="r", activity_id="1", step_id="dep_changes:orders",
                           runbook="bad-deploy", params={**PARAMS, "dependency": "orders"}),
                      "orders is not a dependency of checkout in the catalog")
    async with BrokerClient(env.broker.url, env.broker.agent_token) as client:
        read = await client.mint(audience="fleet", verb="fleet.read", resource="service/payments", ttl_s=30,
                                 workflow_id=WF, run_id="r", activity_id="2", step_id="dep_changes:payments",
                                 runbook="bad-deploy", params={**PARAMS, "dependency": "payments"})
    assert read.scope["resource"] == "service/payments"


async def test_a_blast_radius_that_omits_a_dependent_is_refused_naming_it(env: Env) -> None:
    reason = await env.refused(env.write(env.plan("payments", ["checkout"])), "omits orders")
    assert "dependent of payments in the catalog" in reason


async def test_an_understated_impact_cannot_slip_under_the_cap(capped: Env) -> None:
    # Honest: payments has two dependents, over the cap of 1 (the plan's own impact says so).
    await capped.refused(capped.write(capped.plan("payments", ["checkout", "orders"])), "max_dependents")
    # Lying: one dependent claimed; the broker's own count refuses it.
    await capped.refused(capped.write(capped.plan("payments", ["checkout"])),
                         "the catalog says step s1 on payments reaches 2 dependents")


async def test_reads_are_cached_and_an_unreachable_catalog_refuses_retryably(env: Env) -> None:
    plan = env.plan("payments", ["checkout"])  # would be refused: only the catalog's reach matters here
    await env.refused(env.write(plan), "omits orders")
    before = len(env.fleet.app.state.catalog_requests)
    await env.refused(env.write(plan), "omits orders")
    assert len(env.fleet.app.state.catalog_requests) == before  # within 30 s: from the cache
    env.broker.use_catalog(CLOSED_PORT_URL)
    async with BrokerClient(env.broker.url, env.broker.agent_token) as client:
        with pytest.raises(BrokerError) as info:
            await client.mint(**env.write(env.plan("payments", ["checkout", "orders"])))
    assert not isinstance(info.value, MintRefused) and info.value.status == 503
    assert "unreachable" in str(info.value)
    deny = next(r for r in reversed(env.audit()) if r["event"] == "deny")
    assert "cannot check against the catalog" in deny["reason"]
