"""The `firebreak` CLI against the real dev server: approve, reject, status, history, alert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from firebreak.cli import main
from firebreak.contracts import Phase
from api_harness import TOKEN, running_api
from conftest import CLOSED_PORT_URL
from firebreak.receipts import ensure_intake_key
from incidents import inject, make_alert, open_incident, report_of, wait_for_phase
from worker import build_worker


@pytest.fixture
def cli_state(tmp_path: Path, state_dir: Path, dev_env: WorkflowEnvironment, settings) -> Path:
    """A state dir whose stack.json points the CLI at the test servers."""
    (tmp_path / "keys").symlink_to(state_dir / "keys")
    stack = {"settings": {
        "temporal": {"address": dev_env.client.service_client.config.target_host,
                     "task_queue": settings.temporal.task_queue,
                     "payload_key_file": settings.temporal.payload_key_file},  # the worker refuses unsigned payloads
        "roster": str(settings.resolved_roster()),
        "runbooks_dir": str(settings.resolved_runbooks_dir()),
        "targets": settings.targets,
        "api_url": CLOSED_PORT_URL,  # no API unless a test starts one: the CLI then goes to Temporal
    }}
    (tmp_path / "stack.json").write_text(json.dumps(stack))
    # The CLI signs receipts for what it raises with this host's intake key, as on the stack.
    ensure_intake_key(state_dir)
    (tmp_path / "intake").symlink_to(state_dir / "intake")
    return tmp_path


def point_at_api(cli_state: Path, api) -> None:
    """As `firebreak up` writes it: the API's address and the demo's read token."""
    stack = json.loads((cli_state / "stack.json").read_text())
    stack["settings"]["api_url"] = api.url
    stack["demo"] = {"intake_token": TOKEN}
    (cli_state / "stack.json").write_text(json.dumps(stack))


async def test_approve_as_requester_is_refused_then_on_call_approval_resolves(
    dev_env: WorkflowEnvironment, settings, fleet, cli_state: Path, capsys: pytest.CaptureFixture[str]
):
    inject(fleet.url, "checkout", "bad_deploy")
    async with running_api(dev_env.client, settings, settings.state_dir) as api:
        point_at_api(cli_state, api)
        handle = await open_incident(dev_env.client, settings, make_alert("DrillPair"), requested_by="bob")
        await wait_for_phase(handle, Phase.awaiting_approval)
        sd = ["--state-dir", str(cli_state)]

        code = await _run(["approve", handle.id, "--key", str(cli_state / "keys" / "bob.pem"), *sd])
        out = capsys.readouterr()
        assert code == 1 and "bob requested this incident and cannot approve it" in out.err
        # Every field is shown, the plan's origin too, and the hash is recomputed from what was shown.
        assert f"from the workflow, through the API at {api.url}" in out.out and f"(workflow {handle.id}, run " in out.out
        for shown in ('verb: "fleet.restart"', 'resource: "service/checkout"', "blast_radius:", "timeout_s:",
                      'replicas: 5', "requesters:", '- "bob"', "evidence:"):
            assert shown in out.out, shown
        assert "Plan hash, recomputed here:" in out.out and "note: the API" not in out.err

        assert await _run(["status", handle.id, "--json", *sd]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["phase"] == "awaiting_approval" and shown["plan"]["hash"]
        assert [{k: a[k] for k in ("approver", "decision", "counted", "reason")} for a in shown["approvals"]] == [
            {"approver": "bob", "decision": "approve", "counted": False,
             "reason": "bob requested this incident and cannot approve it"}]
        assert [n["approved_by"] for n in shown["needed"]] == [[], []]

        assert await _run(["approve", handle.id, "--as", "alice", "--steps", "s2", "--comment", "scale only", *sd]) == 0
        assert "approve by alice counted; approved: executing now" in capsys.readouterr().out
        report = await report_of(handle)
        assert report.phase == Phase.resolved

        assert await _run(["history", handle.id, *sd]) == 0
        history = capsys.readouterr().out
        assert "REFUSED: bob requested this incident" in history
        assert "execute s2: fleet.scale on service/checkout" in history and "grant " in history


async def test_reject_needs_a_reason_and_closes_the_incident(
    dev_env: WorkflowEnvironment, settings, fleet, cli_state: Path, capsys: pytest.CaptureFixture[str]
):
    inject(fleet.url, "checkout", "bad_deploy")
    async with build_worker(dev_env.client, settings):
        handle = await open_incident(dev_env.client, settings, make_alert("DrillRollback"))
        await wait_for_phase(handle, Phase.awaiting_approval)
        with pytest.raises(SystemExit) as usage:
            main(["reject", handle.id, "--as", "alice", "--state-dir", str(cli_state)])
        assert usage.value.code == 2
        assert await _run(["reject", handle.id, "--as", "alice", "--reason", "deploy freeze",
                           "--state-dir", str(cli_state)]) == 0
        report = await report_of(handle)
    assert report.phase == Phase.rejected and report.status.approvals[0].reason == "rejection recorded"
    assert report.status.approvals[0].comment == "deploy freeze"


async def test_alert_file_opens_an_incident_and_prints_its_id(
    dev_env: WorkflowEnvironment, settings, fleet, cli_state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    inject(fleet.url, "payments", "bad_deploy")
    alert = make_alert("DrillRollback", service="payments").model_dump(mode="json")
    path = tmp_path / "alert.json"
    path.write_text(json.dumps(alert))
    async with build_worker(dev_env.client, settings):
        assert await _run(["alert", str(path), "--state-dir", str(cli_state)]) == 0
        incident = capsys.readouterr().out.strip().splitlines()[-1]
        assert incident == "payments.drill-rollback"
        handle = dev_env.client.get_workflow_handle(incident)
        await wait_for_phase(handle, Phase.awaiting_approval)
        await handle.terminate("test over")

    path.write_text(json.dumps({**alert, "labels": {**alert["labels"], "service": "pay/../ments"}}))
    assert await _run(["alert", str(path), "--state-dir", str(cli_state)]) == 1
    assert "labels.service" in capsys.readouterr().err


async def _run(argv: list[str]) -> int:
    """The CLI runs its own event loop: give it a thread."""
    import asyncio

    return await asyncio.to_thread(main, argv)


async def test_approve_right_after_the_worker_went_down_answers_at_once_and_counts_later(
    dev_env: WorkflowEnvironment, settings, fleet, cli_state: Path, capsys: pytest.CaptureFixture[str]
):
    import time

    inject(fleet.url, "checkout", "bad_deploy")
    async with running_api(dev_env.client, settings, settings.state_dir, worker=False) as api:
        point_at_api(cli_state, api)
        async with build_worker(dev_env.client, settings):
            handle = await open_incident(dev_env.client, settings, make_alert("DrillPair"))
            await wait_for_phase(handle, Phase.awaiting_approval)
        # The worker is gone (crashed, restarting): the plan comes from the memo, the approval is recorded.
        started = time.monotonic()
        code = await _run(["approve", handle.id, "--as", "alice", "--state-dir", str(cli_state)])
        elapsed = time.monotonic() - started
        out = capsys.readouterr().out
        assert code == 0 and elapsed < 10, (code, elapsed)
        assert "its memo (no worker answered" in out and "no worker is answering right now" in out
        async with build_worker(dev_env.client, settings):
            report = await report_of(handle)
    assert report.phase == Phase.resolved, report.outcome
    assert [(a.approver, a.counted, a.via) for a in report.status.approvals] == [("alice", True, "signal")]


async def test_status_waits_worker_wait_s_for_a_worker_then_says_none_answered(
    dev_env: WorkflowEnvironment, settings, cli_state: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
):
    import time

    # Opened with no worker at all: nothing answers the query, and there is no memo to fall back on.
    handle = await open_incident(dev_env.client, settings, make_alert("DrillPair"))
    monkeypatch.setenv("FIREBREAK_WORKER_WAIT_S", "3")
    started = time.monotonic()
    code = await _run(["status", handle.id, "--state-dir", str(cli_state)])
    elapsed = time.monotonic() - started
    assert code == 1 and 3 <= elapsed < 15, (code, elapsed)
    assert f"no worker answered for {handle.id} within 3s" in capsys.readouterr().err
    await handle.terminate("test over")


def test_worker_wait_s_must_be_positive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from pydantic import ValidationError

    from firebreak.config import load_settings

    monkeypatch.setenv("FIREBREAK_WORKER_WAIT_S", "0")
    with pytest.raises(ValidationError, match="worker_wait_s"):
        load_settings(tmp_path)
