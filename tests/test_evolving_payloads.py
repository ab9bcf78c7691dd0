"""Payloads that evolve: a field added or removed never breaks an incident that is already running.

Temporal keeps every payload for the life of a run, and workers of two versions overlap during a
deploy. So every model that crosses a Temporal boundary ignores fields it does not know and gives
new fields defaults, while the boundaries people and other services write to (runbook YAML, the
broker's requests) stay strict.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel, ValidationError, model_validator
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from firebreak import contracts, signing
from firebreak.api.approvals import ApprovalGate
from firebreak.api.sources import PayloadError
from firebreak.broker.models import ApprovalCheckRequest, MintRequest
from firebreak.contracts import AlertSignal, Approval, IncidentInput, IncidentReport, Phase
from firebreak.intake import ALERT_SIGNAL, WORKFLOW, route_alerts
from firebreak.roster import Roster
from firebreak.runbook import RunbookError, load_runbooks, parse_runbook
from firebreak.temporal import DATA_CONVERTER
from incidents import inject, make_alert, receipt_signer, report_of, submit, wait_for_phase
from activities.deps import ActivityDeps
from worker import activities_for, build_worker
from workflows.incident import IncidentWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
T = TypeVar("T")
UNKNOWN = {"added_by_a_newer_version": {"nested": [1, 2, 3]}}


def _contract_models() -> list[type[BaseModel]]:
    return [obj for obj in vars(contracts).values()
            if isinstance(obj, type) and issubclass(obj, contracts.Model) and obj is not contracts.Model]


@pytest.mark.parametrize("model", _contract_models(), ids=lambda m: m.__name__)
def test_every_temporal_payload_model_ignores_unknown_fields(model: type[BaseModel]) -> None:
    assert model.model_config.get("extra") == "ignore"


def _routed_drill(settings: Any, alertname: str = "DrillPair") -> Any:
    routing = route_alerts(load_runbooks(Path(settings.resolved_runbooks_dir())), [make_alert(alertname)])
    routed = routing.routed[0]
    routed.incident_id = f"{routed.incident_id}-{uuid.uuid4().hex[:6]}"
    return routed


def _with_unknown_fields(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as a newer version might write it: unknown fields at the top and deep inside."""
    evolved = json.loads(json.dumps(data))
    evolved.update(UNKNOWN)
    if "runbook" in evolved:
        evolved["runbook"].update(UNKNOWN)
        for action in evolved["runbook"]["remediate"]["actions"].values():
            action.update(UNKNOWN)
    for alert in evolved.get("alerts", []):
        alert.update(UNKNOWN)
    for receipt in evolved.get("receipts", []) + ([evolved["receipt"]] if evolved.get("receipt") else []):
        receipt.update(UNKNOWN)
    return evolved


def test_a_newer_input_decodes_through_the_data_converter(settings) -> None:
    routed = _routed_drill(settings)
    incident = IncidentInput(incident_id=routed.incident_id, runbook=routed.runbook, params=routed.params)
    payload = DATA_CONVERTER.payload_converter.to_payloads([_with_unknown_fields(incident.model_dump(mode="json",
                                                                                                     by_alias=True))])
    [decoded] = DATA_CONVERTER.payload_converter.from_payloads(payload, [IncidentInput])
    assert decoded == incident
    assert "added_by_a_newer_version" not in decoded.model_dump_json()


def test_signed_models_keep_verifying_and_never_re_emit_unknown_fields(state_dir: Path, approvers) -> None:
    roster = Roster.load(state_dir / "roster.yaml")
    approval = approvers.approval("alice", "shop.checkout.error-rate", "a" * 64)
    evolved = Approval.model_validate({**approval.model_dump(mode="json"), **UNKNOWN})
    assert evolved.signing_payload() == approval.signing_payload()
    assert signing.verify_approval(evolved, roster).valid
    assert "added_by_a_newer_version" not in evolved.model_dump_json()

    receipt = receipt_signer(state_dir, "bob")("shop.checkout.error-rate")
    evolved_receipt = contracts.Receipt.model_validate({**receipt.model_dump(mode="json"), **UNKNOWN})
    assert evolved_receipt.signing_payload() == receipt.signing_payload()
    assert signing.verify_receipt(evolved_receipt, roster, []) is None


def test_runbook_yaml_and_broker_requests_stay_strict(settings) -> None:
    text = Path(settings.resolved_runbooks_dir(), "drill-pair.yaml").read_text()
    with pytest.raises(RunbookError, match=r"remediate\.actions\.restart\.retries: unknown field"):
        parse_runbook(text.replace("blast_radius: \"{service}\", timeout: 30s}",
                                   "blast_radius: \"{service}\", timeout: 30s, retries: 3}", 1))

    approval = {"workflow_id": "w", "plan_hash": "0" * 64, "decision": "approve", "nonce": "n" * 8,
                "expires_at": "2030-01-01T00:00:00Z", "approver": "alice"}
    assert ApprovalCheckRequest.model_validate({"approval": approval}).approval.approver == "alice"
    with pytest.raises(ValidationError, match=r"approval\.added_by_a_newer_version: unknown field"):
        ApprovalCheckRequest.model_validate({"approval": {**approval, **UNKNOWN}})
    mint = {"audience": "fleet", "verb": "fleet.read", "resource": "service/checkout", "ttl_s": 30,
            "workflow_id": "w", "run_id": "r", "activity_id": "1", "runbook": "drill-pair"}
    with pytest.raises(ValidationError, match=r"approvals\.0\.added_by_a_newer_version: unknown field"):
        MintRequest.model_validate({**mint, "approvals": [{**approval, **UNKNOWN}]})
    with pytest.raises(ValidationError, match="added_by_a_newer_version"):
        MintRequest.model_validate({**mint, **UNKNOWN})
    # The intake API's approvals endpoint too: a field it does not know is a 4xx naming it.
    gate = ApprovalGate(settings.resolved_roster())
    assert gate.parse(json.dumps(approval).encode(), "w").approver == "alice"
    with pytest.raises(PayloadError, match="added_by_a_newer_version"):
        gate.parse(json.dumps({**approval, **UNKNOWN}).encode(), "w")


class _Counting:
    """How often the evolved model below was validated: proves the workflow really used it."""

    validations = 0


class IncidentInputV1(IncidentInput):
    """IncidentInput as it was before f918bd8 dropped this field."""

    approval_keys_hint: str = ""


class IncidentInputV2(IncidentInput):
    """IncidentInput as a later version might declare it: that field gone, one more with a default."""

    escalation_channel: str = "#incidents"

    @model_validator(mode="after")
    def _count(self) -> "IncidentInputV2":
        _Counting.validations += 1
        return self


class AlertSignalV2(AlertSignal):
    dedup_window_s: float = 0.0


def _uncached_worker(client: Any, settings: Any) -> Worker:
    """A worker that keeps no workflow cache, hence no sticky queue: the time-skipping server never
    hands a sticky queue's tasks to another worker, so the next worker would wait forever."""
    return Worker(client, task_queue=settings.temporal.task_queue, workflows=[IncidentWorkflow],
                  activities=activities_for(ActivityDeps.from_settings(settings)), max_cached_workflows=0)


async def _or_task_failure(handle: Any, awaitable: Awaitable[T], timeout: float = 60.0) -> T:
    """``awaitable``, or the reason its workflow task keeps failing: a run that cannot replay retries
    its task forever instead of failing, so without a bound the test would hang, not fail."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
        async for event in handle.fetch_history_events():
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                raise AssertionError(event.workflow_task_failed_event_attributes.failure.message) from None
        raise


def _evolve(monkeypatch: pytest.MonkeyPatch) -> None:
    # The workflow module imports these from firebreak.contracts (passed through the sandbox) each time a
    # worker or replayer loads it, so a worker built after this runs "version 2" of the contracts.
    monkeypatch.setattr(contracts, "IncidentInput", IncidentInputV2)
    monkeypatch.setattr(contracts, "AlertSignal", AlertSignalV2)
    _Counting.validations = 0


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_recorded_without_a_new_field_replays(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _evolve(monkeypatch)
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    await Replayer(workflows=[IncidentWorkflow], data_converter=DATA_CONVERTER).replay_workflow(history)
    assert _Counting.validations > 0, "the replay did not use the evolved model"


async def test_incident_started_before_fields_changed_finishes_after_the_upgrade(
    time_env: WorkflowEnvironment, settings, fleet, approvers, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject(fleet.url, "checkout", "bad_deploy")
    changes_before = len(fleet.fleet.changes("checkout"))
    routed = _routed_drill(settings)
    signed = receipt_signer(settings.state_dir, None)(routed.incident_id)
    incident = IncidentInputV1(incident_id=routed.incident_id, runbook=routed.runbook, params=routed.params,
                               receipts=[signed], approval_keys_hint="firebreak approve ... --key PATH")
    signal = AlertSignal(alerts=routed.alerts, received_at=datetime.now(timezone.utc), receipt=signed)
    # Version 1 records the start, with a field version 2 no longer has, and runs up to the approval.
    monkeypatch.setattr(contracts, "IncidentInput", IncidentInputV1)
    async with _uncached_worker(time_env.client, settings):
        handle = await time_env.client.start_workflow(
            WORKFLOW, incident, id=routed.incident_id, task_queue=settings.temporal.task_queue,
            start_signal=ALERT_SIGNAL, start_signal_args=[signal], result_type=IncidentReport)
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)

    # Version 2 dropped that field and has a new one on the input and on the alert signal; a new worker
    # has no cache, so it replays the history version 1 wrote, then carries the incident to its end.
    _evolve(monkeypatch)
    async with build_worker(time_env.client, settings):
        outcome = await _or_task_failure(handle, submit(handle, approvers.approval("alice", handle.id,
                                                                                waiting.plan_hash)))
        assert outcome.counted, outcome.reason
        report = await _or_task_failure(handle, report_of(handle))

    assert _Counting.validations > 0, "the upgraded worker did not use the evolved model"
    assert report.phase == Phase.resolved, report.outcome
    assert [s.status for s in report.status.steps] == ["succeeded", "succeeded"]
    assert len(fleet.fleet.changes("checkout")) == changes_before + 2  # restart and scale, once each


async def test_an_input_written_by_a_newer_version_runs(
    time_env: WorkflowEnvironment, settings, fleet, approvers
) -> None:
    inject(fleet.url, "checkout", "bad_deploy")
    routed = _routed_drill(settings)
    signed = receipt_signer(settings.state_dir, None)(routed.incident_id)
    incident = IncidentInput(incident_id=routed.incident_id, runbook=routed.runbook, params=routed.params,
                             receipts=[signed]).model_dump(mode="json", by_alias=True)
    signal = AlertSignal(alerts=routed.alerts, received_at=datetime.now(timezone.utc),
                         receipt=signed).model_dump(mode="json")
    async with build_worker(time_env.client, settings):
        # Raw dicts, as a newer API or worker would have written them: unknown fields at every level.
        handle = await time_env.client.start_workflow(
            WORKFLOW, _with_unknown_fields(incident), id=routed.incident_id, task_queue=settings.temporal.task_queue,
            start_signal=ALERT_SIGNAL, start_signal_args=[_with_unknown_fields(signal)], result_type=IncidentReport)
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        assert waiting.alerts_received == 1 and not waiting.refused_signals
        approval = approvers.approval("alice", handle.id, waiting.plan_hash).model_dump(mode="json")
        await handle.signal("approval", {**approval, **UNKNOWN})
        report = await report_of(handle)

    assert report.phase == Phase.resolved, report.outcome
    assert [r.counted for r in report.status.approvals] == [True]
