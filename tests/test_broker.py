"""The credential broker over real HTTP: what it issues, what it refuses, and the audit trail.

Every refusal here must carry a reason and leave a ``deny`` record in the audit log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from demo.catalog import add_routes as add_catalog_routes
from firebreak import signing
from firebreak.blast_radius import BlastRadius, Dependent
from firebreak.broker.audit import verify_chain
from firebreak.broker.client import BrokerClient, IssuedCredential, MintRefused
from firebreak.broker.server import BrokerServer
from firebreak.contracts import Approval, Hypothesis, Plan, Receipt
from firebreak.plan import build_plan
from firebreak.receipts import ensure_intake_key, intake_signer, person_signer
from firebreak.roster import entry_yaml
from firebreak.runbook import Runbook, default_runbook_dir, load_runbooks
from firebreak.serving import ThreadedServer
from firebreak.signing import TargetVerifier, TokenRejected

WF = "shop.checkout.error-rate"
PARAMS = {"namespace": "shop", "service": "checkout"}


def honest(plan: Plan | None) -> Plan:
    """The plan with the blast radius the demo catalog gives (nothing depends on checkout): bad-deploy walks
    the catalog, so the broker checks every write's impact against its own catalog read, and refuses none."""
    assert plan is not None
    return plan.model_copy(update={"impact": {s.id: BlastRadius(target="checkout") for s in plan.steps}})


@dataclass
class Env:
    server: BrokerServer
    state_dir: Path
    keys: dict[str, signing.Ed25519PrivateKey]
    runbook: Runbook
    plan: Plan

    @property
    def receipts(self) -> list[Receipt]:
        """An alert system raised it: signed by the intake's key, naming no person."""
        return [intake_signer(ensure_intake_key(self.state_dir))(WF)]

    def person_receipt(self, who: str) -> Receipt:
        return person_signer(who, self.keys[who])(WF)

    def plan_for(self, run_id: str = "run-1", requesters: list[str] | None = None) -> Plan:
        hypothesis = Hypothesis(id="bad_deploy", title="bad deploy", score=0.9, findings=[], actions=["rollback"])
        return honest(build_plan(self.runbook, PARAMS, hypothesis, incident_id=WF, run_id=run_id,
                                 requesters=requesters))

    @property
    def client(self) -> BrokerClient:
        return BrokerClient(self.server.url, self.server.agent_token)

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.server.audit_path.read_text().splitlines()]

    def last_deny(self) -> dict[str, Any]:
        return next(r for r in reversed(self.audit()) if r["event"] == "deny")

    def approve(self, who: str, plan: Plan | None = None, **kw: Any) -> Approval:
        plan = plan or self.plan
        fields: dict[str, Any] = dict(
            workflow_id=WF,
            plan_hash=plan.hash,
            decision="approve",
            nonce=uuid.uuid4().hex,
            expires_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat(),
            approver=who,
        )
        fields.update(kw)
        return signing.sign_approval(Approval(**fields), self.keys[who])


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    # The shipped bad-deploy runbook, alone in its own directory (other runbooks may be mid-edit).
    runbooks = tmp_path / "runbooks"
    runbooks.mkdir()
    shutil.copy(default_runbook_dir() / "bad-deploy.yaml", runbooks)
    runbook = load_runbooks(runbooks)[0]
    # Groups from the runbook's own policy for the rollback, so the test follows the runbook.
    groups = runbook.remediate.policy_for(runbook.remediate.actions["rollback"]).groups
    keys = {name: signing.generate_key() for name in ("alice", "bob", "mallory")}
    roster = tmp_path / "roster.yaml"
    roster.write_text(
        "people:\n"
        + entry_yaml("alice", [groups[0]], signing.public_pem(keys["alice"]))
        + entry_yaml("bob", [groups[-1]], signing.public_pem(keys["bob"]))
        + entry_yaml("mallory", ["marketing"], signing.public_pem(keys["mallory"]))
    )
    hypothesis = Hypothesis(id="bad_deploy", title="bad deploy", score=0.9, findings=[], actions=["rollback"])
    plan = honest(build_plan(runbook, PARAMS, hypothesis, incident_id=WF, run_id="run-1"))
    server = BrokerServer(tmp_path / "state", roster_path=roster, runbooks_dir=runbooks).start()
    verifier = signing.TargetVerifier.from_broker(server.url, "catalog")
    catalog_app = FastAPI()
    add_catalog_routes(catalog_app, verifier)
    try:
        with ThreadedServer(catalog_app, name="test-catalog") as catalog:
            server.use_catalog(catalog.url)  # the broker checks the plan's blast radius against it
            yield Env(server, tmp_path / "state", keys, runbook, plan)
    finally:
        verifier.close()
        server.stop()


def read_fields(**kw: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        audience="prometheus",
        verb="metrics.read",
        resource="namespace/shop",
        ttl_s=60,
        workflow_id=WF,
        run_id="run-1",
        activity_id="3",
        step_id="error_rate",
        runbook="bad-deploy",
        params=PARAMS,
    )
    fields.update(kw)
    return fields


def write_fields(env: Env, approvals: list[Approval], **kw: Any) -> dict[str, Any]:
    step = env.plan.steps[0]
    fields: dict[str, Any] = dict(
        audience=step.target,
        verb=step.verb,
        resource=step.resource,
        ttl_s=60,
        workflow_id=WF,
        run_id="run-1",
        activity_id="9",
        step_id=step.id,
        runbook="bad-deploy",
        params=PARAMS,
        plan=env.plan,
        approvals=approvals,
        receipts=env.receipts,
    )
    fields.update(kw)
    return fields


async def refused(env: Env, fields: dict[str, Any], expect: str, status: int = 403) -> str:
    """Mint must be refused with a reason containing ``expect``, and audited as a deny."""
    before = len(env.audit())
    async with env.client as client:
        with pytest.raises(MintRefused) as info:
            await client.mint(**fields)
    reason = info.value.reason
    assert expect in reason, reason
    assert info.value.status == status
    deny = env.last_deny()
    assert deny["seq"] > before and deny["reason"] == reason and deny["decision"] == "denied"
    assert deny["audience"] == fields["audience"] and deny["step_id"] == fields["step_id"]
    return reason


def assert_no_token_in_audit(env: Env, *tokens: str) -> None:
    text = env.server.audit_path.read_text()
    for token in tokens:
        assert token not in text
        assert token.split(".")[2] not in text  # not even the signature part


# -- reads ------------------------------------------------------------------------------


async def test_declared_read_is_issued_and_works_once_at_the_target(env: Env) -> None:
    async with env.client as client:
        cred = await client.mint(**read_fields())
    assert cred.audience == "prometheus" and cred.scope == {"verb": "metrics.read", "resource": "namespace/shop"}
    assert cred.grant.scope == "metrics.read:namespace/shop"
    assert cred.expires_at <= datetime.now(UTC) + timedelta(seconds=61)

    verifier = TargetVerifier.from_broker(env.server.url, "prometheus")
    try:
        claims = verifier.verify(cred.token, verb="metrics.read", resource="namespace/shop", expect_step="error_rate")
        assert claims["sub"] == "firebreak-agent" and claims["plan_hash"] == ""
        with pytest.raises(TokenRejected, match="replayed") as info:
            verifier.verify(cred.token, verb="metrics.read", resource="namespace/shop")
        assert info.value.status == 401
    finally:
        verifier.close()

    mint = env.audit()[-1]
    assert mint["event"] == "mint" and mint["grant_id"] == cred.grant_id and mint["decision"] == "issued"
    assert_no_token_in_audit(env, cred.token)


async def test_change_log_read_on_fleet_is_issued(env: Env) -> None:
    async with env.client as client:
        cred = await client.mint(**read_fields(audience="fleet", verb="fleet.read", resource="service/checkout"))
    assert cred.grant.audience == "fleet"


async def test_undeclared_read_refused(env: Env) -> None:
    await refused(env, read_fields(resource="namespace/payments"), "declares no read")
    await refused(env, read_fields(audience="fleet", resource="namespace/shop"), "declares no read")
    await refused(env, read_fields(verb="logs.read"), "declares no read")


async def test_read_with_param_failing_its_pattern_refused(env: Env) -> None:
    hostile = {"namespace": 'shop"} or vector(1) #', "service": "checkout"}
    await refused(env, read_fields(params=hostile), "does not match")
    await refused(env, read_fields(params={**PARAMS, "extra": "x"}), "not declared")


async def test_unknown_runbook_refused(env: Env) -> None:
    await refused(env, read_fields(runbook="no-such-book"), "unknown runbook")


async def test_ttl_capped_at_900s(env: Env) -> None:
    async with env.client as client:
        cred = await client.mint(**read_fields(ttl_s=36000))
    assert cred.expires_at <= datetime.now(UTC) + timedelta(seconds=901)


# -- writes -------------------------------------------------------------------------------


async def test_write_with_valid_approval_is_issued(env: Env) -> None:
    approval = env.approve("alice")
    async with env.client as client:
        cred = await client.mint(**write_fields(env, [approval]))
        # The same approval again (a retry of the same activity, or the step's undo) is fine.
        await client.mint(**write_fields(env, [approval]))
        undo = await client.mint(**write_fields(env, [approval], verb="fleet.deploy", undo=True, activity_id="10"))
    step = env.plan.steps[0]
    verifier = TargetVerifier.from_broker(env.server.url, "fleet")
    try:
        claims = verifier.verify(cred.token, verb=step.verb, resource=step.resource, expect_step=step.id)
        assert claims["plan_hash"] == env.plan.hash and claims["workflow_id"] == WF
        # A write token is good for its own verb only.
        with pytest.raises(TokenRejected) as info:
            verifier.verify(undo.token, verb=step.verb, resource=step.resource)
        assert info.value.status == 403
    finally:
        verifier.close()
    mint = env.audit()[-3]
    assert mint["event"] == "mint" and mint["approvers"] == ["alice"]
    # Each write token binds its exact request: the step's body hash, or the write it undoes.
    key = f"{WF}/run-1/s1"
    assert claims["req"] == {"idempotency_key": f"{key}/do", "body_sha256": hashlib.sha256(b"{}").hexdigest()}
    # A write credential lives no longer than the step may run.
    assert cred.expires_at <= datetime.now(UTC) + timedelta(seconds=step.timeout_s + 1)
    assert_no_token_in_audit(env, cred.token, undo.token)


async def test_write_without_approvals_refused(env: Env) -> None:
    await refused(env, write_fields(env, []), "carries no approvals")
    await refused(env, write_fields(env, [], plan=None), "needs a plan and signed approvals")


async def test_write_with_approvals_for_another_plan_hash_refused(env: Env) -> None:
    other = env.plan.model_copy(update={"run_id": "run-0"})  # any change is a new hash
    assert other.hash != env.plan.hash
    reason = await refused(env, write_fields(env, [env.approve("alice", plan=other)]), "not approved")
    assert "signed for plan" in reason


async def test_plan_edited_after_approval_refused(env: Env) -> None:
    approval = env.approve("alice")
    # A plan edited by hand no longer fits the runbook (the broker re-derives each step)...
    step = env.plan.steps[0].model_copy(update={"resource": "service/payments"})
    edited = env.plan.model_copy(update={"steps": [step]})
    await refused(env, write_fields(env, [approval], plan=edited, resource="service/payments"),
                  "step s1: resource differs")
    # ...and one re-derived consistently for other params is another plan, with another hash.
    hypothesis = Hypothesis(id="bad_deploy", title="bad deploy", score=0.9, findings=[], actions=["rollback"])
    other = build_plan(env.runbook, {**PARAMS, "service": "payments"}, hypothesis, incident_id=WF, run_id="run-1")
    assert other is not None
    other = other.model_copy(update={"impact": {"s1": BlastRadius(
        target="payments", dependents=[Dependent(name="checkout"), Dependent(name="orders")])}})
    await refused(env, write_fields(env, [approval], plan=other, resource="service/payments"), "signed for plan")


async def test_plan_outside_the_runbook_catalog_refused(env: Env) -> None:
    step = env.plan.steps[0].model_copy(update={"verb": "fleet.delete"})
    rogue = env.plan.model_copy(update={"steps": [step]})
    approval = env.approve("alice", plan=rogue)
    await refused(env, write_fields(env, [approval], plan=rogue, verb="fleet.delete"), "does not fit runbook")


async def test_scope_other_than_the_steps_refused(env: Env) -> None:
    approval = env.approve("alice")
    await refused(env, write_fields(env, [approval], resource="service/payments"), "allows 'fleet.rollback'")
    await refused(env, write_fields(env, [approval], verb="fleet.restart"), "allows 'fleet.rollback'")
    await refused(env, write_fields(env, [approval], audience="prometheus"), "allows 'fleet.rollback'")
    await refused(env, write_fields(env, [approval], step_id="s9"), "not in the plan")


async def test_forged_unsigned_and_unknown_approvers_refused(env: Env) -> None:
    forged = signing.sign_approval(
        Approval(**{**env.approve("alice").model_dump(), "signature": ""}), signing.generate_key()
    )
    assert "forged" in await refused(env, write_fields(env, [forged]), "not approved")
    unsigned = env.approve("alice").model_copy(update={"signature": ""})
    assert "unsigned" in await refused(env, write_fields(env, [unsigned]), "not approved")
    stranger_key = signing.generate_key()
    stranger = signing.sign_approval(
        Approval(**{**env.approve("alice").model_dump(), "approver": "eve", "signature": ""}), stranger_key
    )
    assert "not in the roster" in await refused(env, write_fields(env, [stranger]), "not approved")


async def test_approver_outside_the_groups_refused(env: Env) -> None:
    await refused(env, write_fields(env, [env.approve("mallory")]), "mallory is not in")


async def test_requester_cannot_approve_own_incident(env: Env) -> None:
    plan = env.plan_for(requesters=["alice"])
    fields = write_fields(env, [env.approve("alice", plan=plan)], plan=plan, receipts=[env.person_receipt("alice")])
    await refused(env, fields, "alice requested this incident and cannot approve it")


async def test_requester_comes_from_signed_receipts_never_from_the_worker(env: Env) -> None:
    """Finding 5: leaving the requester out of the mint request no longer lets their approval count."""
    # No receipt at all: refused, whatever else the request says.
    await refused(env, write_fields(env, [env.approve("alice")], receipts=[]), "no genuine receipt")
    # A receipt the worker forged (signed with a key that is not the intake's): refused.
    forged = signing.sign_receipt(env.receipts[0].model_copy(update={"signature": ""}), signing.generate_key())
    await refused(env, write_fields(env, [env.approve("alice")], receipts=[forged]), "does not verify")
    # alice raised it (signed receipt); a plan that leaves her out is refused, naming the field...
    receipts = [env.person_receipt("alice"), *env.receipts]
    await refused(env, write_fields(env, [env.approve("alice")], receipts=receipts), "requesters: the plan names []")
    # ...and one that names her cannot use her approval.
    plan = env.plan_for(requesters=["alice"])
    fields = write_fields(env, [env.approve("alice", plan=plan)], plan=plan, receipts=receipts)
    await refused(env, fields, "alice requested this incident")
    # bob cannot sign a receipt naming alice (a person signs only for themselves).
    fake = signing.sign_receipt(Receipt(incident_id=WF, requested_by="alice", signer="bob",
                                        issued_at=datetime.now(UTC).isoformat()), env.keys["bob"])
    await refused(env, write_fields(env, [env.approve("alice")], receipts=[fake]), "signs only for themselves")


async def test_a_plan_with_fields_the_runbook_does_not_derive_is_refused_naming_the_field(env: Env) -> None:
    """Finding 2: undo params, verification and timeout are re-derived by the broker, not trusted."""
    step = env.plan.steps[0]
    assert step.undo is not None and step.verify is not None
    for changed, field in (
        ({"undo": step.undo.model_copy(update={"params": {"version": "pwned"}})}, "undo.params.version"),
        ({"verify": step.verify.model_copy(update={"threshold": 1e9})}, "verify.threshold"),
        ({"timeout_s": 900.0}, "timeout_s"),
        ({"description": "scale inventory"}, "description"),
    ):
        crafted = env.plan.model_copy(update={"steps": [step.model_copy(update=changed)]})
        reason = await refused(env, write_fields(env, [env.approve("alice", plan=crafted)], plan=crafted),
                               "does not fit runbook")
        assert f"step s1: {field} differs" in reason


async def test_approvals_are_spent_once_per_step_and_undo_only_after_its_step(env: Env) -> None:
    """Findings 3 and 4: no undo before its step; the same approvals cannot mint the step again."""
    approval = env.approve("alice")
    await refused(env, write_fields(env, [approval], verb="fleet.deploy", undo=True, activity_id="7"),
                  "undo of step s1 before its step's write was issued")
    async with env.client as client:
        await client.mint(**write_fields(env, [approval], activity_id="9"))
        await client.mint(**write_fields(env, [approval], activity_id="9"))  # a retry of that activity: fine
    reason = await refused(env, write_fields(env, [approval], activity_id="12"), "already minted for this run")
    assert "approvals are not reusable" in reason
    # The undo, once, and with the plan's approvals like any write: a second activity cannot mint it again.
    await refused(env, write_fields(env, [], verb="fleet.deploy", undo=True, activity_id="13"), "carries no approvals")
    async with env.client as client:
        await client.mint(**write_fields(env, [approval], verb="fleet.deploy", undo=True, activity_id="13"))
    await refused(env, write_fields(env, [approval], verb="fleet.deploy", undo=True, activity_id="14"),
                  "step s1/undo of plan")
    # A restart keeps all of it.
    env.server.stop()
    env.server.start()
    await refused(env, write_fields(env, [approval], activity_id="15"), "already minted for this run")


async def test_an_approval_valid_for_longer_than_the_policy_allows_is_refused(env: Env) -> None:
    ten_years = (datetime.now(UTC) + timedelta(days=3650)).isoformat()
    reason = await refused(env, write_fields(env, [env.approve("alice", expires_at=ten_years)]), "not approved")
    assert "longer than the policy's maximum" in reason


async def test_approvals_are_judged_when_they_arrive_not_at_mint_time(env: Env) -> None:
    """Finding 7: an approval checked on arrival still counts after its signature expired."""
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    approval = env.approve("alice", expires_at=soon)
    async with env.client as client:
        check = await client.check_approval(approval)
        assert check.valid and check.received_at is not None
        await asyncio.sleep(2.5)  # the signature has expired now
        again = await client.check_approval(approval)
        assert again.received_at == check.received_at  # judged once: the first arrival stands
        await client.mint(**write_fields(env, [approval]))
    # An approval nobody checked on arrival is judged at the mint: expired, refused.
    late = env.approve("alice", expires_at=soon, plan=env.plan_for("run-2"))
    await asyncio.sleep(2.5)
    await refused(env, write_fields(env, [late], plan=env.plan_for("run-2"), run_id="run-2"), "expired")


async def test_expired_approval_refused(env: Env) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    await refused(env, write_fields(env, [env.approve("alice", expires_at=past)]), "expired")


async def test_approval_for_another_workflow_refused(env: Env) -> None:
    await refused(env, write_fields(env, [env.approve("alice", workflow_id="other")]), "signed for workflow")


async def test_rejection_refuses_the_write(env: Env) -> None:
    approvals = [env.approve("alice"), env.approve("bob", decision="reject")]
    await refused(env, write_fields(env, approvals), "rejected by bob")


async def test_nonce_reused_by_a_different_approval_refused(env: Env) -> None:
    first = env.approve("alice")
    async with env.client as client:
        await client.mint(**write_fields(env, [first]))
    # bob signs a different approval (for another run's plan) that happens to carry alice's nonce
    plan = env.plan_for("run-2")
    second = env.approve("bob", nonce=first.nonce, plan=plan)
    await refused(env, write_fields(env, [second], plan=plan, run_id="run-2"), "reuses a nonce")


async def test_nonces_survive_a_broker_restart(env: Env) -> None:
    first = env.approve("alice")
    async with env.client as client:
        await client.mint(**write_fields(env, [first]))
    env.server.stop()
    env.server.start()
    plan = env.plan_for("run-2")
    await refused(env, write_fields(env, [env.approve("bob", nonce=first.nonce, plan=plan)], plan=plan,
                                    run_id="run-2"), "reuses a nonce")


async def test_concurrent_mints_and_revokes_are_all_on_disk_when_answered(env: Env) -> None:
    """The broker writes its state for many requests at once (group commit): each answer still waits for its
    own change, so the files hold every grant and revocation answered, and a restart keeps them."""

    async def read_then_maybe_revoke(i: int) -> tuple[str, bool]:
        credential = await client.mint(**read_fields(activity_id=f"a{i}"))
        if i % 2:
            assert await client.revoke(credential.grant.grant_id)
        return credential.grant.grant_id, bool(i % 2)

    async with env.client as client:
        results = await asyncio.gather(*(read_then_maybe_revoke(i) for i in range(40)))
    # Read while the broker still runs: what it answered is already on disk, not just at shutdown.
    on_disk: dict[str, bool] = {}
    for line in (env.state_dir / "broker" / "state.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "grant" in entry:
            on_disk[entry["grant"]["grant_id"]] = entry["grant"]["revoked"]
        elif "revoked" in entry:
            on_disk[entry["revoked"]] = True
    assert {g: on_disk.get(g) for g, _ in results} == dict(results)
    records = env.audit()
    assert {r["grant_id"] for r in records if r["event"] == "mint"} >= {g for g, _ in results}
    assert {r["grant_id"] for r in records if r["event"] == "revoke"} == {g for g, revoked in results if revoked}
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    env.server.stop()
    env.server.start()
    listed = httpx.get(f"{env.server.url}/v1/revoked").json()["revoked"]
    assert set(listed) == {g for g, revoked in results if revoked}
    ok, _, message = verify_chain(env.server.audit_path)
    assert ok, message


async def test_write_for_a_different_workflow_id_than_approvals_refused(env: Env) -> None:
    await refused(env, write_fields(env, [env.approve("alice")], workflow_id="other.incident"),
                  "not the requesting workflow's run")


# -- bootstrap credential, freeze ---------------------------------------------------------


async def test_bad_agent_credential_refused_and_audited(env: Env) -> None:
    async with BrokerClient(env.server.url, "not-the-token") as client:
        with pytest.raises(MintRefused) as info:
            await client.mint(**read_fields())
    assert info.value.status == 401 and "agent bearer credential" in info.value.reason
    # Counted, not appended: nothing reaches the audit log before its caller is authenticated.
    assert all(r.get("decision") != "unauthenticated" for r in env.audit())
    assert "not-the-token" not in env.server.audit_path.read_text()
    response = httpx.post(f"{env.server.url}/v1/mint", json=read_fields())
    assert response.status_code == 401
    metrics = httpx.get(f"{env.server.url}/metrics").text
    assert 'firebreak_broker_unauthenticated_requests_total{path="/v1/mint"} 2' in metrics


async def test_freeze_refuses_every_mint_revokes_live_grants_and_survives_restart(env: Env) -> None:
    async with env.client as client:
        live = await client.mint(**read_fields())
    verifier = TargetVerifier.from_broker(env.server.url, "prometheus")
    try:
        # The agent's credential cannot pull the kill switch's lever (nor release it).
        agent_try = httpx.post(
            f"{env.server.url}/v1/freeze", headers={"Authorization": f"Bearer {env.server.agent_token}"}
        )
        assert agent_try.status_code == 401

        admin = {"Authorization": f"Bearer {env.server.admin_token}"}
        response = httpx.post(f"{env.server.url}/v1/freeze", json={"reason": "drill"}, headers=admin)
        assert response.status_code == 200 and response.json()["revoked"] == 1
        assert live.grant_id in httpx.get(f"{env.server.url}/v1/revoked").json()["revoked"]

        # 423: held, not refused for good; the reason says who froze it and why.
        reason = await refused(env, read_fields(), "credentials frozen by someone at ", status=423)
        assert reason.endswith(": drill")
        await refused(env, write_fields(env, [env.approve("alice")]), "frozen", status=423)

        # The target hears of the revocation within a poll or two.
        deadline = time.monotonic() + 5
        while live.grant_id not in verifier._revoked() and time.monotonic() < deadline:  # type: ignore[misc]
            await asyncio.sleep(0.2)
        with pytest.raises(TokenRejected, match="revoked"):
            verifier.verify(live.token, verb="metrics.read", resource="namespace/shop")
    finally:
        verifier.close()

    env.server.stop()
    env.server.start()
    assert httpx.get(f"{env.server.url}/healthz").json()["frozen"] is True
    await refused(env, read_fields(), "frozen", status=423)

    admin = {"Authorization": f"Bearer {env.server.admin_token}"}
    assert httpx.post(f"{env.server.url}/v1/thaw", headers=admin).status_code == 200
    async with env.client as client:
        await client.mint(**read_fields())
    events = [r["event"] for r in env.audit()]
    assert "freeze" in events and "thaw" in events and "revoke" in events


async def test_cli_creds_freeze_and_thaw(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from firebreak.broker import cli

    monkeypatch.setenv("FIREBREAK_BROKER_URL", env.server.url)
    freeze = ["creds", "freeze", "--state-dir", str(env.state_dir), "--reason", "suspicious mints", "--as", "carol"]
    assert await asyncio.to_thread(cli.main, freeze) == 0
    assert "frozen" in capsys.readouterr().out
    await refused(env, read_fields(), "credentials frozen by carol at ", status=423)
    thaw = ["creds", "thaw", "--state-dir", str(env.state_dir), "--reason", "all clear", "--as", "dana"]
    assert await asyncio.to_thread(cli.main, thaw) == 0
    async with env.client as client:
        await client.mint(**read_fields())
    # The audit log records who did it and why.
    freeze_record = next(r for r in env.audit() if r["event"] == "freeze")
    thaw_record = next(r for r in env.audit() if r["event"] == "thaw")
    assert freeze_record["subject"] == "carol" and freeze_record["reason"].startswith("suspicious mints")
    assert (thaw_record["subject"], thaw_record["reason"]) == ("dana", "all clear")
    # Freezing needs a reason.
    with pytest.raises(SystemExit):
        cli.main(["creds", "freeze", "--state-dir", str(env.state_dir)])


# -- revocation and the client's context manager -------------------------------------------


async def test_revoked_grant_refused_at_the_target(env: Env) -> None:
    verifier = TargetVerifier.from_broker(env.server.url, "prometheus")
    try:
        async with env.client as client:
            cred = await client.mint(**read_fields())
            assert await client.revoke(cred.grant_id) is True
            assert await client.revoke("no-such-grant") is False
        # The target polls the broker's revocation list about every second.
        started = time.monotonic()
        while cred.grant_id not in verifier._revoked() and time.monotonic() - started < 5:  # type: ignore[misc]
            await asyncio.sleep(0.1)
        assert time.monotonic() - started < 3, "revocation took too long to reach the target"
        with pytest.raises(TokenRejected, match="revoked") as info:
            verifier.verify(cred.token, verb="metrics.read", resource="namespace/shop")
        assert info.value.status == 401
    finally:
        verifier.close()


async def test_credential_context_revokes_on_success_error_and_cancellation(env: Env) -> None:
    def revoked() -> list[str]:
        return list(httpx.get(f"{env.server.url}/v1/revoked").json()["revoked"])

    async with env.client as client:
        async with client.credential(**read_fields()) as cred:
            assert cred.grant_id not in revoked()
        assert cred.grant_id in revoked()

        with pytest.raises(RuntimeError):
            async with client.credential(**read_fields()) as cred2:
                raise RuntimeError("the call failed")
        assert cred2.grant_id in revoked()

        entered = asyncio.Event()
        holder: list[IssuedCredential] = []

        async def activity() -> None:
            async with client.credential(**read_fields()) as cred3:
                holder.append(cred3)
                entered.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(activity())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert holder[0].grant_id in revoked()


async def test_issued_credential_never_shows_its_token(env: Env) -> None:
    async with env.client as client:
        cred = await client.mint(**read_fields())
    assert cred.token and cred.token.count(".") == 2
    for text in (repr(cred), str(cred), f"{cred}", cred.model_dump_json(), json.dumps(cred.model_dump(mode="json"))):
        assert cred.token not in text
    assert "redacted" in repr(cred)
    assert cred.authorization == f"Bearer {cred.token}"


async def test_audit_chain_intact_after_a_busy_session(env: Env) -> None:
    async with env.client as client:
        tokens = [(await client.mint(**read_fields())).token for _ in range(3)]
        with pytest.raises(MintRefused):
            await client.mint(**write_fields(env, []))
        await client.mint(**write_fields(env, [env.approve("alice")]))
    ok, _, message = verify_chain(env.server.audit_path)
    assert ok, message
    assert_no_token_in_audit(env, *tokens)


async def test_malformed_request_refused_with_reason(env: Env) -> None:
    response = httpx.post(
        f"{env.server.url}/v1/mint",
        json={**read_fields(), "aud": ["a", "b"]},
        headers={"Authorization": f"Bearer {env.server.agent_token}"},
    )
    assert response.status_code == 400 and "aud" in response.json()["reason"]
    assert env.last_deny()["decision"] == "bad_request"


async def test_jwks_and_state_files(env: Env) -> None:
    jwks = httpx.get(f"{env.server.url}/.well-known/jwks.json").json()
    assert [k["kty"] for k in jwks["keys"]] == ["OKP"] and jwks["keys"][0]["crv"] == "Ed25519"
    broker = env.state_dir / "broker"
    for name in ("signing-key.pem", "agent-token", "admin-token"):
        assert (broker / name).stat().st_mode & 0o777 == 0o600, name


@pytest.mark.integration
def test_python_m_firebreak_broker_serves(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    runbooks = tmp_path / "runbooks"
    runbooks.mkdir()
    shutil.copy(default_runbook_dir() / "bad-deploy.yaml", runbooks)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "firebreak.broker", "--host", "127.0.0.1", "--port", str(port),
         "--state-dir", str(tmp_path), "--runbooks-dir", str(runbooks)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, "broker did not start"
                time.sleep(0.2)
        assert health["ok"] is True and health["frozen"] is False
        token = (tmp_path / "broker" / "agent-token").read_text().strip()
        assert (tmp_path / "broker" / "agent-token").stat().st_mode & 0o777 == 0o600
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/mint", json=read_fields(), headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 200
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0].decode()
    assert token not in output and response.json()["token"] not in output


async def test_metrics_count_mints_and_denials_by_class_for_misuse_alerts(env: Env) -> None:
    def scrape() -> dict[str, float]:
        text = httpx.get(f"{env.server.url}/metrics", timeout=5).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    async with env.client as client:
        await client.mint(**read_fields())
        await client.mint(**write_fields(env, [env.approve("alice")]))
    await refused(env, write_fields(env, [], plan=env.plan_for("run-2"), run_id="run-2"), "carries no approvals")
    await refused(env, read_fields(resource="namespace/other"), "declares no read")
    httpx.post(f"{env.server.url}/v1/mint", json=read_fields(), headers={"Authorization": "Bearer forged"})
    metrics = scrape()
    assert metrics['firebreak_broker_mints_total{audience="prometheus",verb="metrics.read",kind="read",runbook="bad-deploy"}'] == 1
    assert metrics['firebreak_broker_mints_total{audience="fleet",verb="fleet.rollback",kind="write",runbook="bad-deploy"}'] == 1
    assert metrics['firebreak_broker_denials_total{reason="no_approval"}'] == 1
    assert metrics['firebreak_broker_denials_total{reason="scope"}'] == 1
    assert metrics['firebreak_broker_denials_total{reason="unauthenticated"}'] == 1
    assert metrics["firebreak_broker_mints_outside_baseline_total"] == 0  # the shipped runbook is the baseline
    assert metrics["firebreak_broker_frozen"] == 0 and metrics["firebreak_broker_live_grants"] >= 1
    assert 0 <= metrics["firebreak_agent_credential_age_seconds"] < 600


def _grant(gid: str, exp: float) -> Any:
    from firebreak.broker.state import GrantRecord

    return GrantRecord(grant_id=gid, exp=exp, audience="fleet", verb="fleet.read", resource="service/x",
                       workflow_id=WF, run_id="r", step_id="s", subject="firebreak-agent", approvers=[])


def _plan(key: str, keep_until: float, minted: dict[str, str]) -> Any:
    from firebreak.broker.state import PlanAuthorization

    return PlanAuthorization(workflow_id=WF, run_id="r", plan_hash=key, created_at=0.0, expires_at=keep_until,
                             keep_until=keep_until, approved_steps=["s1"], approvers={"s1": ["alice"]},
                             digests=["d"], requesters=["mallory"], minted=minted)


def test_grants_survive_a_restart_from_the_journal_and_from_the_earlier_files(tmp_path: Path) -> None:
    """state.jsonl is replayed at start (a line cut short by a crash is skipped, never answered); a state
    directory from before it (grants.json, grants.jsonl) is read once and carried over."""
    from firebreak.broker.state import DurableState

    directory = tmp_path / "broker"
    later = time.time() + 600
    state = DurableState(directory)
    for gid in ("a", "b", "c"):
        state.add_grant(_grant(gid, later))
    state.revoke("b")
    state.sync()
    with (directory / "state.jsonl").open("a") as journal:
        journal.write('{"revoked": "c"')  # torn: the broker never answered this revocation
    again = DurableState(directory)
    assert {g: r.revoked for g, r in again.grants.items()} == {"a": False, "b": True, "c": False}
    assert again.revoked_jtis() == ["b"]

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "grants.json").write_text(json.dumps({"old": {**vars(_grant("old", later)), "revoked": True}}))
    (legacy / "grants.jsonl").write_text(json.dumps({"grant": vars(_grant("newer", later))}) + "\n"
                                         + json.dumps({"revoked": "newer"}) + "\n")
    carried = DurableState(legacy)
    assert carried.revoked_jtis() == ["newer", "old"]
    assert not (legacy / "grants.json").exists() and not (legacy / "grants.jsonl").exists()
    assert DurableState(legacy).revoked_jtis() == ["newer", "old"]  # and kept in the journal from then on


def test_nonces_approvals_and_plans_survive_a_restart_from_the_journal_and_from_the_earlier_files(
        tmp_path: Path) -> None:
    """Each change is a line of the one journal; the last line of a plan stands; the first judgement of an
    approval stands; the files of the version before the journal are read once and carried over."""
    from firebreak.broker.state import ApprovalSeen, DurableState

    later = time.time() + 600
    seen = ApprovalSeen(received_at=1.0, workflow_id=WF, valid=True, reason="", groups=["oncall"],
                        keep_until=later)
    directory = tmp_path / "broker"
    state = DurableState(directory)
    state.remember_nonces([("n1", "d1", later)])
    state.remember_approval("d1", seen)
    state.remember_approval("d1", ApprovalSeen(**{**vars(seen), "valid": False}))  # judged once: ignored
    state.save_plan(_plan("p", later, {}))
    state.save_plan(_plan("p", later, {"s1/do": "activity-7"}))
    state.sync()
    lines = [json.loads(line) for line in (directory / "state.jsonl").read_text().splitlines()]
    assert [next(iter(k for k in ("nonce", "approval", "plan") if k in e)) for e in lines] == [
        "nonce", "approval", "plan", "plan"]  # appended, one line per change: nothing rewritten
    again = DurableState(directory)
    assert again.nonce_conflict("n1", "other") and not again.nonce_conflict("n1", "d1")
    assert again.approval_seen("d1") == seen
    assert again.plan(f"{WF}/r/p").minted == {"s1/do": "activity-7"}

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "nonces.json").write_text(json.dumps({"n2": {"digest": "d2", "expires_at": later}}))
    (legacy / "approvals.json").write_text(json.dumps({"d2": vars(seen)}))
    (legacy / "plans.json").write_text(json.dumps({f"{WF}/r/q": vars(_plan("q", later, {"s1/do": "a"}))}))
    carried = DurableState(legacy)
    assert carried.nonce_conflict("n2", "other") and carried.approval_seen("d2") == seen
    assert carried.plan(f"{WF}/r/q").minted == {"s1/do": "a"}
    assert not any((legacy / name).exists() for name in ("nonces.json", "approvals.json", "plans.json"))
    restarted = DurableState(legacy)  # and kept in the journal from then on
    assert restarted.nonce_conflict("n2", "other") and restarted.plan(f"{WF}/r/q") is not None


def test_the_journal_is_rewritten_with_the_live_records_once_it_has_grown(tmp_path: Path) -> None:
    from firebreak.broker.state import DurableState

    directory = tmp_path / "broker"
    state = DurableState(directory)
    gone = time.time() - 3600  # expired long ago: pruned, never to be listed again
    for i in range(1100):
        state.add_grant(_grant(f"old-{i}", gone))
    state.sync()
    journal = directory / "state.jsonl"
    assert len(journal.read_text().splitlines()) == 1100  # appended
    time.sleep(1.1)  # the next flush prunes
    state.add_grant(_grant("live", time.time() + 600))
    state.sync()
    assert [json.loads(line)["grant"]["grant_id"] for line in journal.read_text().splitlines()] == ["live"]
    assert list(DurableState(directory).grants) == ["live"]


def test_a_failed_append_is_not_lost_the_next_flush_rewrites_the_journal(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk error fails the requests waiting on that flush (none is answered as if on disk); the next
    flush writes the journal whole from memory, the change that failed included."""
    from firebreak.broker import state as state_module
    from firebreak.broker.state import DurableState

    directory = tmp_path / "broker"
    state = DurableState(directory)
    later = time.time() + 600
    real_append = state_module._append

    def full_disk(path: Path, text: str) -> None:
        real_append(path, text[: len(text) // 2])  # torn on its way down
        raise OSError("disk full")

    monkeypatch.setattr(state_module, "_append", full_disk)
    state.add_grant(_grant("lost?", later))
    with pytest.raises(OSError, match="disk full"):
        state.sync()
    monkeypatch.setattr(state_module, "_append", real_append)
    state.add_grant(_grant("next", later))
    state.sync()
    assert sorted(DurableState(directory).grants) == ["lost?", "next"]
