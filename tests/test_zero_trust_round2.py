"""Zero trust, round two (issue 24): the broker's authorization, each attack replayed on the real stack.

The attacker holds the worker's bootstrap credential and reads everything history shows: plans, approvals,
receipts, activity ids. Each attack must be refused with its reason, leave a ``deny`` record in the audit log,
and make no write at the fleet; the legitimate flow next to it still resolves.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from demo.fleet import Fleet, FleetServer
from firebreak import signing
from firebreak.broker.client import BrokerClient, MintRefused, StepAlreadyWritten
from firebreak.broker.server import BrokerServer
from firebreak.config import AGENT
from firebreak.contracts import Approval, Hypothesis, Phase, Plan, canonical_json
from firebreak.plan import build_plan
from firebreak.runbook import load_runbooks
from incidents import inject, make_alert, open_incident, receipt_signer, report_of, submit, wait_for_phase
from worker import build_worker


def agent_writes(fleet: Fleet) -> int:
    """Writes the fleet itself recorded as made by the agent."""
    return sum(1 for name in ("checkout", "payments", "inventory")
               for change in fleet.changes(name) if change["author"] == AGENT)


def audit(broker: BrokerServer) -> list[dict[str, Any]]:
    return [json.loads(line) for line in broker.audit_path.read_text().splitlines()]


async def attack(broker: BrokerServer, expect: str, **fields: Any) -> str:
    """Mint as the holder of the bootstrap credential: refused, and audited, with ``expect`` in the reason."""
    async with BrokerClient(broker.url, broker.agent_token) as client:
        with pytest.raises(MintRefused) as refused:
            await client.mint(**fields)
    # 403: refused by a rule; 400: refused by the request's own schema, naming the field.
    assert refused.value.status in (400, 403), refused.value.reason
    assert expect in refused.value.reason, refused.value.reason
    last = next(r for r in reversed(audit(broker)) if r["event"] == "deny")
    assert last["reason"] in (refused.value.reason, f"/v1/mint: {refused.value.reason}")
    return refused.value.reason


def mint_fields(plan: Plan, step_id: str, approvals: list[Approval], receipts: list, *, undo: bool = False,
                activity_id: str = "attacker-1", **kw: Any) -> dict[str, Any]:
    step = plan.step(step_id)
    assert step is not None
    verb = step.undo.verb if undo and step.undo else step.verb
    return dict(audience=step.target, verb=verb, resource=step.resource, ttl_s=60, workflow_id=plan.incident_id,
                run_id=plan.run_id, activity_id=activity_id, step_id=step_id, runbook=plan.runbook,
                params=plan.params or {}, plan=plan, approvals=approvals, receipts=receipts, undo=undo) | kw


def made_up_plan(runbooks_dir: Path, name: str, action: str, *, impact: bool = True) -> Plan:
    """A plan the broker derives field for field, for a fresh incident id (the attacker can build any)."""
    book = {b.name: b for b in load_runbooks(runbooks_dir)}[name]
    incident = f"checkout.{name}-{uuid.uuid4().hex[:6]}"
    plan = build_plan(book, {"namespace": "shop", "service": "checkout"},
                      Hypothesis(id="bad_deploy", title="t", score=1, findings=[], actions=[action]),
                      incident_id=incident, run_id=uuid.uuid4().hex, requesters=[])
    assert plan is not None
    if impact:  # the demo catalog's honest blast radius: nothing depends on checkout
        from firebreak.blast_radius import BlastRadius
        plan = plan.model_copy(update={"impact": {s.id: BlastRadius(target="checkout") for s in plan.steps}})
    return plan


def with_fields(plan: Plan, **fields: Any) -> Plan:
    """The plan with fields replaced, validated anew (a model_copy would keep the old plan's cached hash)."""
    return Plan.model_validate(plan.model_dump(mode="json") | fields)


def execute_activity_ids(history: Any) -> list[str]:
    return [e.activity_task_scheduled_event_attributes.activity_id for e in history.events
            if e.HasField("activity_task_scheduled_event_attributes")
            and e.activity_task_scheduled_event_attributes.activity_type.name == "execute_step"]


# -- 1 and 2: after its run closed, neither the undo nor the step mints again --------------------------


async def test_after_resolution_no_undo_and_no_re_mint_under_the_original_activity_id(
    time_env: WorkflowEnvironment, settings, fleet, broker: BrokerServer, approvers
):
    inject(fleet.url, "checkout", "bad_deploy")
    before = agent_writes(fleet.fleet)
    async with build_worker(time_env.client, settings):
        handle = await open_incident(time_env.client, settings, make_alert("DrillResolve"))
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        plan = waiting.plan
        assert plan is not None
        approval = approvers.approval("alice", handle.id, waiting.plan_hash)
        receipts = [receipt_signer(settings.state_dir, None)(handle.id)]
        assert (await submit(handle, approval)).decided
        report = await report_of(handle)
    assert report.phase == Phase.resolved, report.outcome
    assert agent_writes(fleet.fleet) == before + 1
    history = await handle.fetch_history()
    names = [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events
             if e.HasField("activity_task_scheduled_event_attributes")]
    assert names[-1] == "report_run_closed"  # the workflow told the broker its run closed
    # The authorization lived for the step's budget, not the runbook's hour.
    assert broker.broker is not None
    authorization = next(a for a in broker.broker.state.plans.values() if a.workflow_id == handle.id)
    assert authorization.expires_at - authorization.created_at < 600
    assert authorization.wrote == ["s1/do"]  # the worker said the target took the write

    # The undo after resolution: with no approvals and no receipts, and with everything history shows.
    await attack(broker, "nothing more is minted", **mint_fields(plan, "s1", [], [], undo=True))
    await attack(broker, "nothing more is minted", **mint_fields(plan, "s1", [approval], receipts, undo=True))
    # The step again, under its original activity id, as a later attempt or the same one.
    (original,) = execute_activity_ids(history)
    for attempt in (1, 2, 7):
        await attack(broker, "already wrote at the target",
                     **mint_fields(plan, "s1", [approval], receipts, activity_id=original, attempt=attempt))
    await attack(broker, "already minted for this run", **mint_fields(plan, "s1", [approval], receipts))
    assert agent_writes(fleet.fleet) == before + 1


# -- 1: an undo carries the plan's approvals and receipts, like the first write -----------------------


async def test_an_undo_with_no_approvals_or_no_receipts_is_refused(broker: BrokerServer, runbooks_dir: Path,
                                                                   settings, approvers):
    plan = made_up_plan(runbooks_dir, "drill-rollback", "rollback", impact=False)
    approval = approvers.approval("alice", plan.incident_id, plan.hash)
    receipts = [receipt_signer(settings.state_dir, None)(plan.incident_id)]
    async with BrokerClient(broker.url, broker.agent_token) as client:
        await client.mint(**mint_fields(plan, "s1", [approval], receipts, activity_id="a-1"))
    await attack(broker, "carries no approvals", **mint_fields(plan, "s1", [], receipts, undo=True))
    await attack(broker, "carries no genuine receipt", **mint_fields(plan, "s1", [approval], [], undo=True))
    await attack(broker, "carries no genuine receipt", **mint_fields(plan, "s1", [], [], undo=True))
    # With them, the undo mints (its step's window is open): the rollback path still works.
    async with BrokerClient(broker.url, broker.agent_token) as client:
        await client.mint(**mint_fields(plan, "s1", [approval], receipts, undo=True, activity_id="a-2"))


# -- 2: a re-mint under the original activity id, including after a fleet restart ---------------------


async def test_a_re_mint_after_a_fleet_restart_writes_nothing_and_a_reported_write_is_never_re_minted(
    broker: BrokerServer, runbooks_dir: Path, settings, approvers, tmp_path: Path
):
    plan = made_up_plan(runbooks_dir, "drill-rollback", "rollback", impact=False)
    step = plan.steps[0]
    approval = approvers.approval("alice", plan.incident_id, plan.hash)
    receipts = [receipt_signer(settings.state_dir, None)(plan.incident_id)]
    fleet = Fleet()
    fleet.inject("checkout", "bad_deploy")
    keys = tmp_path / "fleet" / "idempotency.jsonl"
    key = f"{plan.incident_id}/{plan.run_id}/{step.id}/do"

    def fleet_server() -> FleetServer:
        return FleetServer(verifier=signing.TargetVerifier.from_broker(broker.url, "fleet"), fleet=fleet,
                           close_verifier=True, idempotency_path=keys)

    async def write(client: BrokerClient, server: FleetServer, attempt: int) -> httpx.Response:
        cred = await client.mint(**mint_fields(plan, "s1", [approval], receipts, activity_id="7", attempt=attempt))
        response = httpx.post(f"{server.url}/services/checkout/rollback", content=canonical_json(step.params),
                              headers={"Authorization": cred.authorization, "Idempotency-Key": key,
                                       "Content-Type": "application/json"}, timeout=10)
        return response

    before = agent_writes(fleet)
    async with BrokerClient(broker.url, broker.agent_token) as client:
        with fleet_server() as server:
            first = await write(client, server, 1)
        assert first.status_code == 200, first.text
        assert agent_writes(fleet) == before + 1
        # The worker died before it could tell the broker: a later attempt of the same activity mints again.
        # The fleet restarted meanwhile; its keys are on disk, so the same request is answered, not repeated.
        with fleet_server() as server:
            again = await write(client, server, 2)
        assert again.status_code == 200 and again.headers.get("Idempotent-Replayed") == "true"
        assert again.json() == first.json()
        assert agent_writes(fleet) == before + 1
        # Once a grant of the step reports its write, no attempt of any activity mints the step again.
        grant = next(g for g in broker.broker.state.live_grants() if g.workflow_id == plan.incident_id)
        answered = {"previous_version": first.json()["previous_version"]}  # what the step's undo needs
        client.mark_wrote(signing_free_credential(grant.grant_id), answered)
        assert await client.revoke(grant.grant_id)
    await attack(broker, "already wrote at the target",
                 **mint_fields(plan, "s1", [approval], receipts, activity_id="7", attempt=3))
    await attack(broker, "already minted for this run",
                 **mint_fields(plan, "s1", [approval], receipts, activity_id="8"))
    # An earlier attempt never takes the slot back.
    assert agent_writes(fleet) == before + 1
    # A later attempt of the step's own activity (its first answer lost, e.g. the broker restarted as it
    # answered the revoke) is refused too, and gets back what the write answered: it carries on, writing nothing.
    async with BrokerClient(broker.url, broker.agent_token) as client:
        with pytest.raises(StepAlreadyWritten) as refused:
            await client.mint(**mint_fields(plan, "s1", [approval], receipts, activity_id="7", attempt=4))
    assert refused.value.result == answered
    assert agent_writes(fleet) == before + 1


def signing_free_credential(grant_id: str) -> Any:
    """What BrokerClient.mark_wrote reads of a credential: its grant id."""
    from datetime import UTC, datetime

    from firebreak.broker.models import IssuedCredential
    return IssuedCredential(grant_id=grant_id, token="x", audience="fleet", scope={"verb": "v", "resource": "r"},
                            expires_at=datetime.now(UTC))


# -- 5: impact left out, and a re-spelt signature ------------------------------------------------------


@pytest.mark.parametrize("impact", [None, {}], ids=["left-out", "empty"])
async def test_a_plan_without_impact_is_refused_not_waved_through(
    broker: BrokerServer, runbooks_dir: Path, settings, approvers, impact: dict | None
):
    plan = with_fields(made_up_plan(runbooks_dir, "bad-deploy", "rollback"), impact=impact)
    approval = approvers.approval("alice", plan.incident_id, plan.hash)
    receipts = [receipt_signer(settings.state_dir, None)(plan.incident_id)]
    await attack(broker, "impact: the plan states no blast radius for step s1",
                 **mint_fields(plan, "s1", [approval], receipts))


def respell(signature: str) -> str:
    """The same bytes in another base64 spelling: the last character's unused low bits set."""
    raw = base64.b64decode(signature, validate=True)
    last = signature.rstrip("=")[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    other = alphabet[alphabet.index(last) ^ 1]  # 64 bytes: the last character carries 2 unused bits
    spelt = signature.rstrip("=")[:-1] + other + "=" * (len(signature) - len(signature.rstrip("=")))
    assert spelt != signature and base64.b64decode(spelt, validate=True) == raw
    return spelt


async def test_a_re_spelt_signature_is_the_same_approval_judged_once(broker: BrokerServer, approvers):
    import asyncio

    approval = approvers.approval("alice", f"checkout.respelt-{uuid.uuid4().hex[:6]}", "0" * 64)
    respelt = approval.model_copy(update={"signature": respell(approval.signature)})
    async with BrokerClient(broker.url, broker.agent_token) as client:
        first = await client.check_approval(approval)
        await asyncio.sleep(1.1)  # a new arrival would have a later received_at
        second = await client.check_approval(respelt)
    assert first.valid and second.valid
    assert second.received_at == first.received_at  # received once: its window is not restarted
    assert broker.broker is not None
    seen = [a for a in broker.broker.state.approvals.values() if a.workflow_id == approval.workflow_id]
    assert len(seen) == 1


# -- 7: unauthenticated malformed mints spend no audit space --------------------------------------------


def test_a_hundred_unauthenticated_malformed_mints_grow_no_audit_and_are_counted(broker: BrokerServer):
    def unauthenticated() -> float:
        text = httpx.get(f"{broker.url}/metrics", timeout=10).text
        line = next((ln for ln in text.splitlines()
                     if ln.startswith('firebreak_broker_unauthenticated_requests_total{path="/v1/mint"}')), None)
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    records, counted = len(audit(broker)), unauthenticated()
    with httpx.Client(timeout=10) as http:
        for n in range(100):
            body = b"{not json" if n % 2 else json.dumps({"audience": n}).encode()
            headers = {"Content-Type": "application/json"} | ({"Authorization": "Bearer nope"} if n % 3 else {})
            assert http.post(f"{broker.url}/v1/mint", content=body, headers=headers).status_code == 401
        assert len(audit(broker)) == records
        assert unauthenticated() == counted + 100
        # The agent's own malformed request is still on the record, naming the field.
        response = http.post(f"{broker.url}/v1/mint", content=b"{not json",
                             headers={"Authorization": f"Bearer {broker.agent_token}",
                                      "Content-Type": "application/json"})
    assert response.status_code == 400
    assert len(audit(broker)) == records + 1 and audit(broker)[-1]["decision"] == "bad_request"


# -- 4 (deliverable): every check in the broker's rules refuses a missing or empty field -----------------


def _no_plan(f: dict[str, Any]) -> dict[str, Any]:
    return f | {"plan": None}


def _field(name: str, value: Any) -> Any:
    return lambda f: f | {name: value}


def _plan_field(name: str, value: Any) -> Any:
    """The plan itself changed: the approval is signed for the changed plan, so only the check can refuse it."""
    change = {name: value}
    return change


def _unsigned(kind: str) -> Any:
    return lambda f: f | {kind: [x.model_copy(update={"signature": ""}) for x in f[kind]]}


# (check, runbook, how the field is emptied, what the refusal says)
CHECKS = [
    ("plan", "drill-rollback", _no_plan, "needs a plan"),
    ("step", "drill-rollback", _field("step_id", ""), "step '' is not in the plan"),
    ("plan fits the runbook", "drill-rollback", _plan_field("params", {}), "does not fit runbook"),
    ("plan steps", "drill-rollback", _plan_field("steps", []), "plan.steps: List should have at least 1 item"),
    ("receipts", "drill-rollback", _field("receipts", []), "carries no genuine receipt"),
    ("receipt signature", "drill-rollback", _unsigned("receipts"), "receipt is not signed"),
    ("approvals", "drill-rollback", _field("approvals", []), "carries no approvals"),
    ("approval signature", "drill-rollback", _unsigned("approvals"), "unsigned approval"),
    ("impact", "bad-deploy", _plan_field("impact", None), "impact: the plan states no blast radius"),
    ("impact entries", "bad-deploy", _plan_field("impact", {}), "impact: the plan states no blast radius"),
    ("read params", "drill-rollback", lambda f: {k: v for k, v in f.items() if k not in {"plan", "approvals", "receipts", "undo"}}
     | {"audience": "fleet", "verb": "fleet.read", "resource": "service/checkout", "params": {}}, "declares no read"),
]


@pytest.mark.parametrize("check,runbook_name,empty,expect", CHECKS, ids=[c[0] for c in CHECKS])
async def test_every_check_refuses_a_missing_or_empty_field(
    broker: BrokerServer, runbooks_dir: Path, settings, approvers, check: str, runbook_name: str, empty: Any,
    expect: str,
):
    plan = made_up_plan(runbooks_dir, runbook_name, "rollback", impact=runbook_name == "bad-deploy")
    fields = mint_fields(plan, "s1", [], [])
    if isinstance(empty, dict):  # a plan field: sign what is sent (a plan with no steps cannot be validated)
        plan = plan.model_copy(update=empty) if "steps" in empty else with_fields(plan, **empty)
        fields["plan"] = plan
    approval = approvers.approval("alice", plan.incident_id, plan.hash)
    receipts = [receipt_signer(settings.state_dir, None)(plan.incident_id)]
    fields |= {"approvals": [approval], "receipts": receipts}
    await attack(broker, expect, **(fields if isinstance(empty, dict) else empty(fields)))


# -- 1: an authorization lives for its step's budget, not the runbook's hour; a freeze does not spend it ----


async def test_an_undo_after_its_steps_window_is_refused_and_a_freeze_gives_the_time_back(
    broker: BrokerServer, runbooks_dir: Path, settings, approvers
):
    from firebreak.broker.rules import step_budget_s

    plan = made_up_plan(runbooks_dir, "drill-rollback", "rollback", impact=False)
    step = plan.steps[0]
    approval = approvers.approval("alice", plan.incident_id, plan.hash)
    receipts = [receipt_signer(settings.state_dir, None)(plan.incident_id)]
    async with BrokerClient(broker.url, broker.agent_token) as client:
        await client.mint(**mint_fields(plan, "s1", [approval], receipts, activity_id="w-1"))
    assert broker.broker is not None
    state = broker.broker.state
    authorization = next(a for a in state.plans.values() if a.workflow_id == plan.incident_id)
    budget = step_budget_s(plan, step)  # timeout 30 s + verification 3 s (+180 s) + undo 30 s + margin
    assert budget == 30 + 183 + 30 + 120
    assert authorization.expires_at - authorization.created_at == budget
    # A freeze of 100 s while the step ran: a thaw gives that time back.
    with broker.broker.lock:
        state.extend_plans(since=authorization.created_at, by=100)
    assert authorization.expires_at - authorization.created_at == budget + 100
    # Past the step's window (as if it had been minted that long ago), its undo is refused.
    with broker.broker.lock:
        authorization.minted_at["s1/do"] -= budget + 101
    await attack(broker, "its window (timeout, verification, rollback) closed",
                 **mint_fields(plan, "s1", [approval], receipts, undo=True, activity_id="w-2"))
