"""An authenticated payload counts only in its place: its workflow, its run, its message or activity.

The attacker copies payloads from history, MAC and all, and sends them without the payload key
(``unauthenticated_client``) somewhere else: a start under a new id, an alert signal to another
incident, under another name or into another run, an ``execute_step`` input scheduled by their own
workflow (under another id, or under the closed incident's own id and activity id). On the real dev
server, with the real worker, broker and demo fleet. The codec's own rules are checked first, without
a server.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import unauthenticated_client
from incidents import (
    inject,
    make_alert,
    open_incident,
    receipt_signer,
    report_of,
    submit,
    wait_for_phase,
)
from temporalio import workflow
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.common import RawValue, RetryPolicy
from temporalio.converter import (
    ActivitySerializationContext,
    WorkflowSerializationContext,
)
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker
from test_payload_auth import CountingVerifier, until

from demo.fleet import FleetServer
from firebreak import signing
from firebreak.codec import (
    BIND_METADATA,
    BIND_REQUEST,
    MAC_METADATA,
    Binding,
    BoundPayloadConverter,
    DecryptionError,
    EncryptionCodec,
    MessageBinding,
    PayloadAuthCodec,
    bind_request,
    misplaced,
    unauthenticated_reason,
    unbind,
)
from firebreak.config import Settings
from firebreak.contracts import AlertSignal, Phase
from firebreak.intake import deliver_routed, route_alerts
from firebreak.runbook import load_runbooks
from firebreak.temporal import DATA_CONVERTER
from worker import build_worker


@pytest.fixture
def watched(settings: Settings, broker: Any) -> Iterator[tuple[Settings, FleetServer, CountingVerifier]]:
    """This test's fleet, counting every request that reaches it (reads and writes)."""
    verifier = CountingVerifier(signing.TargetVerifier.from_broker(broker.url, "fleet"))
    with FleetServer(verifier=verifier, chaos_token="test-chaos", close_verifier=True) as server:
        settings.targets["fleet"] = server.url
        yield settings, server, verifier

# -- the codec's rules, without a server ------------------------------------------------------------------

KEY = PayloadAuthCodec.generate_key_b64()


def payload(value: Any) -> Payload:
    return DATA_CONVERTER.payload_converter.to_payloads([value])[0]


def in_workflow(workflow_id: str) -> WorkflowSerializationContext:
    return WorkflowSerializationContext(namespace="default", workflow_id=workflow_id)


def in_activity(workflow_id: str, activity_type: str = "execute_step", activity_id: str = "7") -> ActivitySerializationContext:
    return ActivitySerializationContext(namespace="default", workflow_id=workflow_id, workflow_type="IncidentWorkflow",
                                        activity_type=activity_type, activity_id=activity_id,
                                        activity_task_queue="firebreak", is_local=False)


def value_of(decoded: Payload, type_hint: Any = Any) -> Any:
    return BoundPayloadConverter().from_payloads([decoded], [type_hint])[0]


@pytest.mark.parametrize("codec", [PayloadAuthCodec.from_b64(KEY), EncryptionCodec.from_b64(KEY)], ids=["mac", "aes"])
async def test_a_message_is_bound_to_its_workflow_and_reaches_the_workflow_with_its_binding(codec) -> None:
    alert = {"alerts": [{"fingerprint": "f1"}]}
    [sent] = await codec.with_context(in_workflow("wf-a")).encode([bind_request(payload(alert), "signal:alert", "run-1")])
    assert BIND_REQUEST not in sent.metadata, "a request is consumed, never written"
    [there] = await codec.with_context(in_workflow("wf-a")).decode([sent])
    assert unbind(value_of(there)) == (alert, MessageBinding("signal:alert", "run-1"))
    # A handler typed Any gets the envelope and checks it; one with a type gets the value alone.
    assert value_of(there, dict[str, list[dict[str, str]]]) == alert
    # Moved to another workflow: the marker, with where it was made for and where it arrived.
    [elsewhere] = await codec.with_context(in_workflow("wf-b")).decode([sent])
    assert unauthenticated_reason(value_of(elsewhere)) == "misplaced payload: made for workflow 'wf-a', not 'wf-b'"


async def test_the_binding_is_under_the_mac() -> None:
    codec = PayloadAuthCodec.from_b64(KEY)
    [sent] = await codec.with_context(in_workflow("wf-a")).encode([bind_request(payload({"x": 1}), "signal:alert")])
    assert Binding.decode(sent.metadata[BIND_METADATA]) == Binding("wf-a", "signal:alert")
    for forged in (Binding("wf-b", "signal:alert"), Binding("wf-a", "signal:resolve"), Binding("wf-a", "signal:alert", "r")):
        moved = Payload()
        moved.CopyFrom(sent)
        moved.metadata[BIND_METADATA] = forged.encode()
        [marker] = await codec.with_context(in_workflow(forged.workflow_id)).decode([moved])
        assert unauthenticated_reason(value_of(marker)).startswith("unauthenticated payload: bad MAC"), forged
    stripped = Payload()
    stripped.CopyFrom(sent)
    del stripped.metadata[BIND_METADATA]
    with pytest.raises(DecryptionError, match="bad MAC"):
        await codec.decode([stripped])


async def test_an_activity_input_runs_only_for_its_workflow_and_activity_type() -> None:
    from temporalio.api.enums.v1 import CommandType
    from temporalio.worker._command_aware_visitor import current_command

    codec = PayloadAuthCodec.from_b64(KEY)
    with current_command(CommandType.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK, 1):  # the workflow scheduling it
        [scheduled] = await codec.with_context(in_activity("wf-a")).encode(
            [bind_request(payload({"step_id": "s1"}), "activity:execute_step", "run-1")])
    assert Binding.decode(scheduled.metadata[BIND_METADATA]) == Binding("wf-a", "activity:execute_step", "run-1", "7")
    assert await codec.with_context(in_activity("wf-a")).decode([scheduled]) == [payload({"step_id": "s1"})]
    refusals = {
        "another workflow": (in_activity("attack-1"), "made for workflow 'wf-a', not 'attack-1'"),
        "another activity type": (in_activity("wf-a", "notify"), "made for activity:execute_step, not activity:notify"),
        "another activity id": (in_activity("wf-a", activity_id="8"), "made for activity id '7', not '8'"),
    }
    for what, (context, reason) in refusals.items():
        with pytest.raises(DecryptionError) as refused:
            await codec.with_context(context).decode([scheduled])
        assert str(refused.value) == f"misplaced payload: {reason}; refusing to run the activity", what
    # Signed but bound nowhere (a codec called without a context, or a payload from before bindings): refused.
    [unbound] = await codec.encode([payload({"step_id": "s1"})])
    with pytest.raises(DecryptionError, match="^misplaced payload: not bound to a workflow and activity"):
        await codec.with_context(in_activity("wf-a")).decode([unbound])


async def test_payloads_from_before_bindings_are_read_as_recorded() -> None:
    """tests/histories/ hold payloads without a binding: a workflow reads them as they were written."""
    codec = PayloadAuthCodec.from_b64(KEY)
    [recorded] = await codec.encode([payload({"alerts": []})])
    assert BIND_METADATA not in recorded.metadata and MAC_METADATA in recorded.metadata
    [read] = await codec.with_context(in_workflow("wf-a")).decode([recorded])
    assert unbind(value_of(read)) == ({"alerts": []}, None)
    # Without a context (the codec server, `firebreak history`) the binding stays on show, unchecked.
    [sent] = await codec.with_context(in_workflow("wf-a")).encode([bind_request(payload(1), "update:submit_approval")])
    [shown] = await codec.decode([sent])
    assert Binding.decode(shown.metadata[BIND_METADATA]).to == "update:submit_approval"


def test_the_workflow_rule_for_messages() -> None:
    here = {"run-2", "run-1"}  # this run, and the run it continued from
    assert misplaced(MessageBinding("signal:alert", "run-2"), to="signal:alert", runs=here) is None
    assert misplaced(MessageBinding("signal:alert", "run-1"), to="signal:alert", runs=here) is None
    assert misplaced(MessageBinding("signal:alert", ""), to="signal:alert", runs=here, any_run=True) is None
    assert misplaced(MessageBinding("signal:alert", "run-0"), to="signal:alert", runs=here) == \
        "misplaced payload: made for run run-0, not this one"
    assert misplaced(MessageBinding("signal:alert", ""), to="signal:alert", runs=here) == \
        "misplaced payload: made for no particular run"
    assert misplaced(MessageBinding("signal:alert", "run-2"), to="signal:resolve", runs=here) == \
        "misplaced payload: made for signal:alert, not signal:resolve"
    assert misplaced(MessageBinding("", ""), to="start:IncidentWorkflow", runs=(), any_run=True) == \
        "misplaced payload: made for no message, not start:IncidentWorkflow"
    assert misplaced(None, to="signal:alert", runs=here).startswith("misplaced payload: not bound")
    # unbind takes only the codec's envelope apart.
    assert unbind({"firebreak_bound": {"to": "signal:alert", "run": ""}, "value": [1]}) == \
        ([1], MessageBinding("signal:alert", ""))
    for other in ({"firebreak_bound": {"to": "x"}, "value": 1}, {"firebreak_bound": 1, "value": 1}, {"value": 1}, [1]):
        assert unbind(other) == (other, None)


# -- on the real stack ---------------------------------------------------------------------------------------


def _events(history: Any, kind: int) -> list[Any]:
    return [e for e in history.events if e.event_type == kind]


async def _copied(handle: WorkflowHandle) -> dict[str, Any]:
    """What anyone who can read history can copy: the start input, the signals, the scheduled activities."""
    history = await handle.fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    signals = [e.workflow_execution_signaled_event_attributes
               for e in _events(history, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)]
    scheduled = [e.activity_task_scheduled_event_attributes
                 for e in _events(history, EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)]
    return {"start": started.input.payloads[0], "signals": signals, "scheduled": scheduled,
            "run_id": history.events[0].workflow_execution_started_event_attributes.original_execution_run_id}


def _failure_messages(failure: Any) -> list[str]:
    messages = []
    while failure is not None and failure.message:
        messages.append(failure.message)
        failure = failure.cause if failure.HasField("cause") else None
    return messages


async def test_a_start_copied_from_history_opens_nothing_under_another_id(dev_env: WorkflowEnvironment, watched) -> None:
    settings, fleet, seen = watched
    outsider = unauthenticated_client(dev_env)
    inject(fleet.url, "checkout", "bad_deploy")
    async with build_worker(dev_env.client, settings):
        genuine = await open_incident(dev_env.client, settings, make_alert("DrillRollback"))
        await wait_for_phase(genuine, Phase.awaiting_approval)
        copied = await _copied(genuine)
        [first_alert] = [s for s in copied["signals"] if s.signal_name == "alert"]
        requests_before, changes_before = len(seen.requests), fleet.fleet.changes("checkout")

        # Exactly what the intake sent (signal-with-start), MAC and all, under a new incident id.
        forged_id = f"{genuine.id}-copy"
        await outsider.start_workflow(
            "IncidentWorkflow", RawValue(copied["start"]), id=forged_id, task_queue=settings.temporal.task_queue,
            start_signal="alert", start_signal_args=[RawValue(first_alert.input.payloads[0])])
        with pytest.raises(WorkflowFailureError) as failed:  # refused at once; else it would wait for approval
            await asyncio.wait_for(dev_env.client.get_workflow_handle(forged_id).result(), 30)
        await asyncio.sleep(1)  # anything it might have scheduled
        forged_history = await dev_env.client.get_workflow_handle(forged_id).fetch_history()
        await genuine.terminate("test over")

    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "InputRefused"
    assert cause.message == (f"refused to open an incident: misplaced payload: made for workflow {genuine.id!r}, "
                             f"not {forged_id!r}")
    assert not _events(forged_history, EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED), "the copy scheduled an activity"
    assert len(seen.requests) == requests_before and fleet.fleet.changes("checkout") == changes_before


async def _deliver(client: Any, settings: Any, alert: Any, incident_id: str) -> WorkflowHandle:
    """The intake's own path, for a given incident id (so that a closed incident can fire again)."""
    routed = route_alerts(load_runbooks(Path(settings.resolved_runbooks_dir())), [alert]).routed[0]
    routed.incident_id = incident_id
    delivered = await deliver_routed(client, routed, task_queue=settings.temporal.task_queue,
                                     receipt=receipt_signer(settings.state_dir, None))
    assert delivered.handle is not None
    return delivered.handle


async def test_an_alert_signal_counts_only_for_its_incident_and_its_name(dev_env: WorkflowEnvironment, watched) -> None:
    settings, fleet, _ = watched
    outsider = unauthenticated_client(dev_env)
    inject(fleet.url, "checkout", "bad_deploy")
    async with build_worker(dev_env.client, settings):
        first = await open_incident(dev_env.client, settings, make_alert("DrillRollback"))
        other = await open_incident(dev_env.client, settings, make_alert("DrillRollback"))
        waiting = await wait_for_phase(first, Phase.awaiting_approval)
        other_waiting = await wait_for_phase(other, Phase.awaiting_approval)
        [alert] = [s.input.payloads[0] for s in (await _copied(first))["signals"] if s.signal_name == "alert"]

        # To another incident, and to the same one under another name (its alerts then taken as resolved).
        await outsider.get_workflow_handle(other.id).signal("alert", RawValue(alert))
        await outsider.get_workflow_handle(first.id).signal("resolve", RawValue(alert))
        other_after = await until(other, lambda s: len(s.refused_signals) >= 1)
        first_after = await until(first, lambda s: len(s.refused_signals) >= 1)
        for handle in (first, other):
            await handle.terminate("test over")

    assert other_after.refused_signals == [
        f"alert signal refused: misplaced payload: made for workflow {first.id!r}, not {other.id!r}"]
    assert other_after.alerts_received == other_waiting.alerts_received and other_after.firing == other_waiting.firing
    assert first_after.refused_signals == [
        "resolve signal refused: misplaced payload: made for signal:alert, not signal:resolve"]
    assert first_after.phase == Phase.awaiting_approval and first_after.firing == waiting.firing


async def test_a_resolved_alert_counts_only_in_its_run(dev_env: WorkflowEnvironment, watched) -> None:
    settings, fleet, _ = watched
    outsider = unauthenticated_client(dev_env)
    inject(fleet.url, "checkout", "bad_deploy")
    alert = make_alert("DrillRollback")
    async with build_worker(dev_env.client, settings):
        first = await open_incident(dev_env.client, settings, alert)
        await wait_for_phase(first, Phase.awaiting_approval)
        # The alert resolves (the intake's plain signal, bound to the run open now): the incident closes.
        await _deliver(dev_env.client, settings, alert.model_copy(update={"status": "resolved"}), first.id)
        assert (await report_of(first)).phase == Phase.auto_resolved
        closed = await _copied(first)
        [resolved] = [s.input.payloads[0] for s in closed["signals"] if s.signal_name == "alert"][1:]
        # It fires again: a new run of the same incident. The copied "resolved" would close it at once.
        again = await _deliver(dev_env.client, settings, make_alert("DrillRollback", fingerprint=alert.fingerprint),
                               first.id)
        waiting = await wait_for_phase(again, Phase.awaiting_approval)
        await outsider.get_workflow_handle(first.id).signal("alert", RawValue(resolved))
        after = await until(again, lambda s: len(s.refused_signals) >= 1)
        await again.terminate("test over")

    assert after.refused_signals == [
        f"alert signal refused: misplaced payload: made for run {closed['run_id']}, not this one"]
    assert after.phase == Phase.awaiting_approval and after.firing == waiting.firing == [alert.fingerprint]


def _messages(error: BaseException | None) -> str:
    parts = []
    while error is not None:
        parts.append(error.message if isinstance(error, ApplicationError) else str(error))
        error = error.__cause__
    return " <- ".join(parts)


@workflow.defn(name="Replay", sandboxed=False)
class Replay:
    """The outsider's workflow: schedules Firebreak's activities with payloads copied from history."""

    @workflow.run
    async def run(self, plan: dict[str, Any]) -> list[str]:
        outcomes = []
        for call in plan["calls"]:
            copied = Payload.FromString(base64.b64decode(call["payload"]))
            try:
                await workflow.execute_activity(
                    call["activity"], RawValue(copied), task_queue=plan["task_queue"], activity_id=call["activity_id"],
                    start_to_close_timeout=timedelta(seconds=20), retry_policy=RetryPolicy(maximum_attempts=1))
                outcomes.append("ran")
            except ActivityError as err:
                outcomes.append(_messages(err.cause))
        return outcomes


async def test_an_execute_step_input_runs_only_in_its_run(dev_env: WorkflowEnvironment, watched, approvers) -> None:
    settings, fleet, seen = watched
    outsider = unauthenticated_client(dev_env)
    inject(fleet.url, "checkout", "bad_deploy")
    attack_queue = f"attacker-{uuid.uuid4().hex[:8]}"
    async with build_worker(dev_env.client, settings):
        genuine = await open_incident(dev_env.client, settings, make_alert("DrillRollback"))
        waiting = await wait_for_phase(genuine, Phase.awaiting_approval)
        assert (await submit(genuine, approvers.approval("alice", genuine.id, waiting.plan_hash))).counted
        assert (await report_of(genuine)).status.steps  # it ran (Prometheus is down: then rolled back, by policy)
        copied = await _copied(genuine)
        steps = [s for s in copied["scheduled"] if s.activity_type.name == "execute_step"]
        assert steps, "the incident executed nothing to copy"
        calls = [{"activity": "execute_step", "activity_id": s.activity_id,
                  "payload": base64.b64encode(s.input.payloads[0].SerializeToString()).decode()} for s in steps]
        requests_before, changes_before = len(seen.requests), fleet.fleet.changes("checkout")

        async with Worker(outsider, task_queue=attack_queue, workflows=[Replay],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            plan = {"task_queue": settings.temporal.task_queue, "calls": calls}
            # From the outsider's own workflow, and from one under the closed incident's own id (a new run).
            elsewhere = await outsider.start_workflow(Replay.run, plan, id=f"replay-{uuid.uuid4().hex[:8]}",
                                                      task_queue=attack_queue, execution_timeout=timedelta(minutes=2))
            same_id = await outsider.start_workflow(Replay.run, plan, id=genuine.id, task_queue=attack_queue,
                                                    execution_timeout=timedelta(minutes=2))
            moved_workflow, moved_run = await asyncio.wait_for(asyncio.gather(elsewhere.result(), same_id.result()), 60)
        same_id_run = (await same_id.describe()).run_id

    assert moved_workflow == [(
        f"Failed decoding arguments <- misplaced payload: made for workflow {genuine.id!r}, not {elsewhere.id!r}; "
        "refusing to run the activity")] * len(calls)
    assert moved_run == [(f"misplaced payload: made for run {copied['run_id']}, not {same_id_run}; "
                          "refusing to run the activity")] * len(calls)
    # Recorded where the outsider scheduled them, and nothing reached the fleet (no read, no write).
    history = await same_id.fetch_history()
    failed = [e.activity_task_failed_event_attributes.failure
              for e in _events(history, EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED)]
    assert [f.application_failure_info.type for f in failed] == ["MisplacedPayload"] * len(calls)
    assert len(seen.requests) == requests_before and fleet.fleet.changes("checkout") == changes_before


async def test_a_requester_named_without_their_receipt_can_still_approve(
    dev_env: WorkflowEnvironment, watched, approvers
) -> None:
    settings, fleet, _ = watched
    inject(fleet.url, "checkout", "bad_deploy")
    alert = make_alert("DrillRollback")
    async with build_worker(dev_env.client, settings):
        handle = await open_incident(dev_env.client, settings, alert)
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        now = datetime.now(timezone.utc)
        # From a holder of the payload key: alice named as requester with no receipt, then with the intake's.
        intake = receipt_signer(settings.state_dir, None)(handle.id)
        await handle.signal("alert", AlertSignal(alerts=[alert], received_at=now, requested_by="alice"))
        await handle.signal("alert", AlertSignal(alerts=[alert], received_at=now, requested_by="alice", receipt=intake))
        # And bob, with the receipt he signed himself: he did raise it, so he may not approve it.
        bob = receipt_signer(settings.state_dir, "bob")(handle.id)
        await handle.signal("alert", AlertSignal(alerts=[alert], received_at=now, requested_by="bob", receipt=bob))
        after = await until(handle, lambda s: s.alerts_received >= waiting.alerts_received + 3)
        refused = await submit(handle, approvers.approval("bob", handle.id, waiting.plan_hash))
        counted = await submit(handle, approvers.approval("alice", handle.id, waiting.plan_hash))
        if not counted.counted:
            await handle.terminate("alice was blocked")  # else the incident waits for an approval: no report
        assert counted.counted, counted.reason
        report = await report_of(handle)

    assert after.refused_signals == [
        "alert signal: requester 'alice' not counted: the signal carries no receipt of theirs"] * 2
    assert after.requested_by == "bob"
    assert not refused.counted and "requested this incident" in refused.reason, refused
    assert report.status.steps and report.status.steps[0].status != "skipped", report.outcome  # her approval ran it
