"""The service catalog (Backstage format): the walk refuses hostile entries, and every read holds its own grant.

* the walk, pure: a dependsOn name off the pattern, a cycle and an unknown entity are refused with a
  reason, and the catalog is never asked for a name that did not pass validation;
* the activity against a real broker and a catalog served with the demo's Backstage API subset:
  one ``catalog.read`` grant per read, each naming its entity; the broker refuses a catalog read
  that no runbook declares;
* the demo fleet's dependency fault: payments fails, checkout's errors rise through its calls to it.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from temporalio.testing import ActivityEnvironment

from activities.deps import ActivityDeps
from activities.investigate import InvestigateActivities
from demo import catalog as demo_catalog
from demo.fleet import Fleet
from firebreak import signing
from firebreak.blast_radius import compute
from firebreak.broker.client import BrokerClient, MintRefused
from firebreak.catalog import Entity, walk
from firebreak.contracts import InvestigateRequest
from firebreak.runbook import load_runbook
from firebreak.serving import ThreadedServer


def component(name: str, depends_on: list[str], owner: str = "team-x", lifecycle: str = "production") -> dict:
    return {"apiVersion": "backstage.io/v1alpha1", "kind": "Component",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "service", "owner": owner, "lifecycle": lifecycle, "dependsOn": depends_on}}


HOSTILE = [
    component("checkout", ["component:default/payments", "component:default/Bad;Name/../x",
                           "component:default/ghost", "component:default/loop-a", "resource:default/db"]),
    component("payments", [], owner="team-payments"),
    component("loop-a", ["component:default/loop-b"]),
    component("loop-b", ["component:default/loop-a", "component:default/checkout"]),
    component("orders", ["component:default/payments"], owner="team-fulfilment", lifecycle="experimental"),
]


async def test_the_walk_refuses_hostile_entries_with_reasons_and_never_asks_for_an_invalid_name() -> None:
    by_name = {e["metadata"]["name"]: Entity.model_validate(e) for e in HOSTILE}
    asked: list[str] = []

    async def fetch(name: str) -> Entity | None:
        asked.append(name)
        return by_name.get(name)

    result = await walk("checkout", fetch, max_depth=3)
    refused = "\n".join(result.refused)
    assert "'Bad;Name/../x'" in refused or "Bad;Name" in refused
    assert "does not match" in refused
    assert "'ghost': unknown entity" in refused
    assert "a cycle (checkout -> loop-a -> loop-b -> loop-a)" in refused
    assert "a cycle (checkout -> loop-a -> loop-b -> checkout)" in refused
    assert "kind 'resource' is not a Component" in refused
    assert asked == ["checkout", "payments", "ghost", "loop-a", "loop-b"]  # never the invalid names
    assert result.dependencies == ["payments", "loop-a"]
    # A root that fails the pattern is never asked for at all.
    asked.clear()
    bad = await walk("Checkout;drop", fetch)
    assert asked == [] and bad.refused and "does not match" in bad.refused[0]


@pytest.fixture
def hostile_catalog(broker):
    verifier = signing.TargetVerifier.from_broker(broker.url, "catalog")
    app = FastAPI()
    demo_catalog.add_routes(app, verifier, entities=HOSTILE)
    with ThreadedServer(app, name="catalog") as server:
        yield server
    verifier.close()


async def test_each_catalog_read_holds_its_own_grant_and_invalid_names_never_reach_the_catalog(
    settings, broker, hostile_catalog
) -> None:
    book = load_runbook(Path(settings.runbooks_dir) / "bad-deploy.yaml")
    spec = next(s for s in book.investigate if s.kind == "catalog")
    deps = ActivityDeps.from_settings(settings.model_copy(update={
        "targets": {**settings.targets, "catalog": hostile_catalog.url}}))
    request = InvestigateRequest(
        incident_id="shop.checkout.error-rate", runbook="bad-deploy", spec=spec,
        params={"namespace": "shop", "service": "checkout"}, alert_started_at=datetime.now(timezone.utc),
        name_pattern=book.params["dependency"].pattern)
    try:
        evidence = await ActivityEnvironment().run(InvestigateActivities(deps).investigate, request)
    finally:
        await deps.http.aclose()
    assert evidence.ok and evidence.catalog is not None
    walked = evidence.catalog
    assert walked.dependencies == ["payments", "loop-a"]
    assert any("unknown entity" in r for r in walked.refused) and any("a cycle" in r for r in walked.refused)
    assert any("does not match" in r for r in walked.refused)
    # Every request the catalog saw names a validated entity: none carries the hostile name.
    seen = hostile_catalog.app.state.catalog_requests
    assert seen and not any("Bad" in path or ".." in path or "db" in path for path in seen), seen
    # One grant per read, each for exactly one named entity, none a wildcard.
    scopes = [g.scope for g in evidence.grants]
    assert len(evidence.grants) == len(seen) and len({g.grant_id for g in evidence.grants}) == len(seen)
    assert "catalog.read:component/checkout" in scopes and "catalog.read:component/payments" in scopes
    assert all(g.audience.startswith("catalog") and "*" not in g.scope for g in evidence.grants)
    # Who depends on payments, transitively, for the blast radius.
    radius = compute("payments", walked)
    assert {d.name for d in radius.dependents} >= {"checkout", "orders"}
    assert {d.name: d.owner for d in radius.dependents}["orders"] == "team-fulfilment"


async def test_the_broker_refuses_a_catalog_read_no_runbook_declares(broker) -> None:
    client = BrokerClient(broker.url, broker.agent_token)
    common = dict(audience="catalog", verb="catalog.read", ttl_s=30, workflow_id="inventory.saturation",
                  run_id=str(uuid.uuid4()), activity_id="1", step_id="catalog")
    # drill-pair declares no catalog walk: refused.
    with pytest.raises(MintRefused, match="declares no read 'catalog.read'"):
        async with client.credential(resource="component/inventory", runbook="drill-pair",
                                     params={"service": "inventory"}, **common):
            pass
    # bad-deploy declares one: a named entity is issued; a name off the pattern is refused.
    async with client.credential(resource="component/payments", runbook="bad-deploy",
                                 params={"namespace": "shop", "service": "checkout", "dependency": "payments"},
                                 **common) as credential:
        assert credential.grant.scope == "catalog.read:component/payments"
    with pytest.raises(MintRefused, match="dependency"):
        async with client.credential(resource="component/Pay..ments", runbook="bad-deploy",
                                     params={"namespace": "shop", "service": "checkout", "dependency": "Pay..ments"},
                                     **common):
            pass


def test_a_failing_dependency_raises_its_callers_errors_through_the_mesh() -> None:
    now = [1_000_000.0]
    fleet = Fleet(clock=lambda: now[0])
    fleet.inject("payments", "dependency")
    now[0] += 60
    state = fleet.demo_state()["services"]
    assert state["payments"]["error_ratio"] > 0.2 and state["checkout"]["error_ratio"] > 0.2
    assert state["inventory"]["error_ratio"] < 0.01
    lines = fleet.metrics_text().splitlines()

    def counter(source: str, destination: str, code: str) -> int:
        prefix = f'mesh_client_requests_total{{namespace="shop",source="{source}",destination="{destination}",code="{code}"}}'
        return int(next(line for line in lines if line.startswith(prefix)).split()[-1])

    assert counter("checkout", "payments", "500") > 10 * counter("checkout", "inventory", "500")
    assert counter("orders", "payments", "200") > 0
    # A plain bad deploy on payments: its callers absorb its errors (the mesh still sees them).
    other = Fleet(clock=lambda: now[0])
    other.inject("payments", "bad_deploy")
    now[0] += 60
    assert other.demo_state()["services"]["checkout"]["error_ratio"] < 0.01


def test_the_demo_serves_the_backstage_api_subset_only_with_a_catalog_token(fleet) -> None:
    entity = httpx.get(f"{fleet.url}/api/catalog/entities/by-name/component/default/checkout")
    assert entity.status_code == 401
    listing = httpx.get(f"{fleet.url}/api/catalog/entities", params={"filter": "kind=component"})
    assert listing.status_code in (401, 403)
