"""Bounded history and payloads: what alerts bring is capped, and a long wait continues as new.

Stated bounds, checked here: an alert's annotations are capped at intake (2 KiB a value, 32 values),
so a delivery adds a few KiB to an incident's history whatever its size; and 100 deliveries of about
1 MB each leave an open incident's history under 2 MiB, its approvals intact.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
from temporalio.testing import WorkflowEnvironment

from api_harness import alertmanager_body, bearer, labels, running_api, wait_status
from conftest import CONVERTER, INTERCEPTORS, temporal_bin
from firebreak.config import AGENT
from firebreak.contracts import AlertSignal, ApprovalOutcome, IncidentReport, Phase
from firebreak.temporal import SEARCH_ATTRIBUTES
from incidents import inject, make_alert, open_incident, report_of, submit, wait_for_phase
from worker import build_worker

HISTORY_BOUND = 2 * 1024 * 1024


def big_delivery(fingerprint: str, service: str, size: int = 1_000_000) -> bytes:
    body = json.loads(alertmanager_body([{"labels": labels("DrillHigh", service), "fingerprint": fingerprint}]))
    body["alerts"][0]["annotations"] = {"description": "x" * size}
    return json.dumps(body).encode()


async def test_a_hundred_1mb_deliveries_leave_the_incident_open_with_its_approvals(
    dev_env: WorkflowEnvironment, settings, fleet, approvers, state_dir: Path
):
    service = "inventory"
    inject(fleet.url, service, "bad_deploy")
    fingerprint = uuid.uuid4().hex[:16]
    incident = f"{service}.drill-high"
    async with running_api(dev_env.client, settings, state_dir) as api, httpx.AsyncClient(timeout=30) as http:
        url = f"{api.url}/v1/alerts/alertmanager"
        first = await http.post(url, content=big_delivery(fingerprint, service), headers=bearer())
        assert first.status_code == 202, first.text
        waiting = await wait_status(http, api, incident, lambda s: s["phase"] == "awaiting_approval")
        handle = dev_env.client.get_workflow_handle(incident, result_type=IncidentReport)
        alice = await submit(handle, approvers.approval("alice", incident, waiting["plan_hash"]))
        assert alice.counted and not alice.decided
        for _ in range(99):
            response = await http.post(url, content=big_delivery(fingerprint, service), headers=bearer())
            assert response.status_code == 202, response.text
        still = await wait_status(http, api, incident, lambda s: s["alerts_received"] == 100)
        assert still["phase"] == "awaiting_approval"
        assert [(a["approver"], a["counted"]) for a in still["approvals"]] == [("alice", True)]
        history = await handle.fetch_history()
        size = sum(event.ByteSize() for event in history.events)
        assert size < HISTORY_BOUND, size
        bob = await submit(handle, approvers.approval("bob", incident, waiting["plan_hash"]))
        assert bob.counted and bob.decided
        report = await report_of(handle)
    assert report.phase == Phase.resolved, report.outcome


async def test_one_over_long_label_refuses_that_alert_only(
    dev_env: WorkflowEnvironment, settings, fleet, state_dir: Path
):
    inject(fleet.url, "payments", "bad_deploy")
    good = {"labels": labels("DrillPair", "payments"), "fingerprint": uuid.uuid4().hex[:16]}
    bad = {"labels": labels("DrillPair", "payments", note="y" * 5000), "fingerprint": uuid.uuid4().hex[:16]}
    async with running_api(dev_env.client, settings, state_dir) as api, httpx.AsyncClient(timeout=30) as http:
        response = await http.post(f"{api.url}/v1/alerts/alertmanager", content=alertmanager_body([bad, good]),
                                   headers=bearer())
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["counts"] == {"alerts": 2, "routed": 1, "unrouted": 0, "refused": 1}
        [refused] = body["refused"]
        assert refused["field"] == "alerts[0].labels.note" and "1024" in refused["reason"]
        # The good alert of the same delivery opened its incident.
        assert body["incident_ids"] == ["payments.drill-pair"]
        opened = await wait_status(http, api, "payments.drill-pair", lambda s: s["phase"] == "awaiting_approval")
        assert opened["alerts_received"] == 1
        recorded = (await http.get(f"{api.url}/v1/unrouted", params={"kind": "refused"}, headers=bearer())).json()
        assert any(i["alert"]["fingerprint"] == bad["fingerprint"] for i in recorded["items"])
        await dev_env.client.get_workflow_handle("payments.drill-pair").terminate("test over")


async def test_a_long_wait_continues_as_new_carrying_the_plan_and_its_approvals(
    tmp_path: Path, settings, fleet, approvers
):
    """A dev server told to suggest continue-as-new early: the incident hands over, alice's approval counts."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_bin(), data_converter=CONVERTER, interceptors=INTERCEPTORS,
        search_attributes=SEARCH_ATTRIBUTES,
        dev_server_database_filename=str(tmp_path / "temporal.db"), ui=False,
        dev_server_extra_args=["--dynamic-config-value", "limit.historyCount.suggestContinueAsNew=60"],
    )
    try:
        inject(fleet.url, "checkout", "bad_deploy")
        alert = make_alert("DrillHigh")
        async with build_worker(env.client, settings):
            handle = await open_incident(env.client, settings, alert)
            waiting = await wait_for_phase(handle, Phase.awaiting_approval)
            first_run = (await handle.describe()).run_id
            alice = await submit(handle, approvers.approval("alice", handle.id, waiting.plan_hash))
            assert alice.counted and not alice.decided
            for _ in range(40):  # the same alert, again and again: the history grows, the state does not
                await handle.signal("alert", AlertSignal(alerts=[alert], received_at=alert.starts_at))
            latest = env.client.get_workflow_handle(handle.id, result_type=IncidentReport)
            for _ in range(100):
                if (await latest.describe()).run_id != first_run:
                    break
                await asyncio.sleep(0.2)
            carried = await wait_for_phase(latest, Phase.awaiting_approval)
            assert (await latest.describe()).run_id != first_run
            assert carried.plan_hash == waiting.plan_hash and carried.plan.run_id == first_run
            assert [(a.approver, a.counted) for a in carried.approvals] == [("alice", True)]
            bob = await latest.execute_update(
                "submit_approval", approvers.approval("bob", handle.id, waiting.plan_hash),
                result_type=ApprovalOutcome)
            assert bob.counted and bob.decided
            report = await report_of(latest)
        assert report.phase == Phase.resolved, report.outcome
        rollbacks = [c for c in fleet.fleet.changes("checkout") if c["author"] == AGENT and c["kind"] == "rollback"]
        assert len(rollbacks) == 1
    finally:
        await env.shutdown()
