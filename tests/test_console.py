"""The operator's console on the real dev server: endings Temporal tells apart, refusals that read refused,
comments and reasons kept everywhere, and the on-call commands (list, inbox, status --watch, approve --wait,
history --json, --version, the stack down, a closed pipe, a bad alert file).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from conftest import BIN, CLOSED_PORT_URL
from firebreak.contracts import APPROVAL_REFUSED, NEEDS_A_HUMAN_FAILURE, Phase
from firebreak.incidents import WAITING_KEY
from incidents import inject, make_alert, open_incident, report_of, wait_for_phase, wait_until
from test_cli import _run, cli_state  # noqa: F401 - cli_state is a fixture
from worker import build_worker

FIREBREAK = str(BIN / "firebreak")


def cli(*argv: str, timeout: float = 60, stdin: int | None = None) -> subprocess.CompletedProcess[str]:
    """The installed console script, as an engineer runs it."""
    return subprocess.run([FIREBREAK, *argv], capture_output=True, text=True, timeout=timeout, stdin=stdin)


async def test_an_ending_that_needs_a_human_is_a_failed_run_with_a_readable_message(
    dev_env: WorkflowEnvironment, settings, fleet, cli_state: Path, capsys: pytest.CaptureFixture[str]
):
    inject(fleet.url, "inventory", "clear")  # no recent change: the diagnosis cannot decide
    async with build_worker(dev_env.client, settings):
        handle = await open_incident(dev_env.client, settings, make_alert("DrillRollback", service="inventory"))
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
        report = await report_of(handle)
        description = await handle.describe()
        sd = ["--state-dir", str(cli_state)]
        assert await _run(["history", handle.id, "--json", *sd]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert await _run(["status", handle.id, "--watch", "--interval", "0.2", *sd]) == 1
        watched = capsys.readouterr().out

    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == NEEDS_A_HUMAN_FAILURE
    # Readable as it is (no codec needed): the phase first, then why.
    assert cause.message.startswith("failed: escalated to a human: no hypothesis is supported well enough")
    # A chosen ending, not a crash: the UI shows the reason alone, no SDK stack trace under it.
    assert cause.failure is not None and cause.failure.stack_trace == "", cause.failure.stack_trace
    assert report.phase == Phase.failed and report.status.phase == Phase.failed
    assert description.status == WorkflowExecutionStatus.FAILED
    assert await description.memo_value(WAITING_KEY) == "a human (escalated)"
    failed_ids = [wf.id async for wf in dev_env.client.list_workflows(
        f"WorkflowId = '{handle.id}' AND ExecutionStatus = 'Failed'")]
    assert failed_ids == [handle.id] or await _eventually_listed(dev_env, handle.id, "Failed")
    assert rows[-1]["kind"] == "workflow_execution_failed" and rows[-1]["detail"].startswith("failed: escalated")
    assert set(rows[0]) == {"event_id", "time", "kind", "detail"}
    assert "phase FAILED: needs a human" in watched and "outcome: escalated to a human" in watched


async def _eventually_listed(env: WorkflowEnvironment, incident_id: str, status: str) -> bool:
    """Visibility is eventually consistent (about a second here)."""
    for _ in range(50):
        found = [wf.id async for wf in env.client.list_workflows(
            f"WorkflowId = '{incident_id}' AND ExecutionStatus = '{status}'")]
        if found:
            return True
        await asyncio.sleep(0.2)
    return False


async def test_refusals_read_refused_and_comments_and_reasons_are_kept_everywhere(
    dev_env: WorkflowEnvironment, settings, fleet, approvers, cli_state: Path, capsys: pytest.CaptureFixture[str]
):
    inject(fleet.url, "checkout", "bad_deploy")
    sd = ["--state-dir", str(cli_state)]
    async with build_worker(dev_env.client, settings):
        handle = await open_incident(dev_env.client, settings, make_alert("DrillPair"), requested_by="bob")
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        # The update of a refused approval fails, with the reason: the UI shows it failed, not "Success".
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update("submit_approval", approvers.approval("bob", handle.id, waiting.plan_hash))
        assert isinstance(refused.value.cause, ApplicationError) and refused.value.cause.type == APPROVAL_REFUSED
        assert refused.value.cause.message == "refused: bob requested this incident and cannot approve it"

        # inbox: alice can give the approval, bob (who raised it) cannot, carol is not in the group.
        assert await _run(["inbox", "--as", "alice", "--json", *sd]) == 0
        assert handle.id in [i["incident_id"] for i in json.loads(capsys.readouterr().out)]
        assert await _run(["inbox", "--key", str(cli_state / "keys" / "bob.pem"), "--json", *sd]) == 0
        assert handle.id not in [i["incident_id"] for i in json.loads(capsys.readouterr().out)]
        assert await _run(["inbox", "--as", "carol", "--json", *sd]) == 0
        assert handle.id not in [i["incident_id"] for i in json.loads(capsys.readouterr().out)]
        assert await _run(["inbox", "--as", "alice", *sd]) == 0
        table = capsys.readouterr().out
        assert table.startswith("INCIDENT") and "s1: 1 more from oncall (you can)" in table

        # list: the phase and what it waits for, from visibility alone.
        row = await _listed(capsys, cli_state, handle.id, lambda r: r["waiting_for"].startswith("approval"))
        assert (row["phase"], row["service"], row["runbook"], row["execution_status"]) == (
            "awaiting_approval", "checkout", "drill-pair", "RUNNING")
        assert await _run(["list", "--open", "--runbook", "drill-pair", *sd]) == 0
        listed = capsys.readouterr().out
        assert listed.splitlines()[0].split() == ["ID", "RUN", "STATUS", "PHASE", "SERVICE", "RUNBOOK", "AGE",
                                                   "WAITING", "FOR"]
        assert handle.id in listed

        code = await _run(["approve", handle.id, "--as", "alice", "--comment", "restart then scale, as agreed",
                           "--wait", "--interval", "0.2", *sd])
        approved = capsys.readouterr().out
        assert code == 0, approved  # --wait: 0 because it resolved
        assert "approve by alice counted" in approved and "phase RESOLVED" in approved
        report = await report_of(handle)
        closed = await wait_until(handle, lambda s: len(s.tickets) == 1 and s.phase.closed)

        assert await _run(["status", handle.id, "--json", *sd]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert await _run(["status", handle.id, *sd]) == 0
        card = capsys.readouterr().out
        assert await _run(["history", handle.id, *sd]) == 0
        history = capsys.readouterr().out

    assert report.phase == Phase.resolved
    by_who = {a["approver"]: a for a in shown["approvals"]}
    assert by_who["alice"]["comment"] == "restart then scale, as agreed" and by_who["alice"]["counted"]
    assert not by_who["bob"]["counted"]
    assert 'comment: "restart then scale, as agreed"' in card and "REFUSED: bob requested" in card
    assert "**" not in card  # rendered for a terminal, not raw Markdown
    assert history.splitlines()[0].split() == ["EVENT", "TIME", "TYPE", "DETAIL"]
    assert "REFUSED: bob requested this incident and cannot approve it" in history
    assert 'from alice: approve; comment "restart then scale, as agreed"' in history
    ticket = Path(closed.tickets[0].url.removeprefix("file://")).read_text()
    assert 'comment: "restart then scale, as agreed"' in ticket and "REFUSED" in ticket


async def test_a_rejection_reason_is_kept_and_watch_says_it_did_not_resolve(
    dev_env: WorkflowEnvironment, settings, fleet, cli_state: Path, capsys: pytest.CaptureFixture[str]
):
    inject(fleet.url, "checkout", "bad_deploy")
    sd = ["--state-dir", str(cli_state)]
    async with build_worker(dev_env.client, settings):
        handle = await open_incident(dev_env.client, settings, make_alert("DrillRollback"))
        await wait_for_phase(handle, Phase.awaiting_approval)
        watching = asyncio.create_task(_run(["status", handle.id, "--watch", "--interval", "0.2", *sd]))
        await asyncio.sleep(1.0)
        assert await _run(["reject", handle.id, "--as", "alice", "--reason", "deploy freeze until 18:00", *sd]) == 0
        assert await watching == 1  # rejected is not resolved
        watched = capsys.readouterr().out
        closed = await wait_until(handle, lambda s: s.phase.closed and len(s.tickets) == 1)
        assert await _run(["history", handle.id, *sd]) == 0
        history = capsys.readouterr().out
        row = await _listed(capsys, cli_state, handle.id, lambda r: r["execution_status"] == "COMPLETED")

    assert closed.phase == Phase.rejected and closed.approvals[-1].comment == "deploy freeze until 18:00"
    assert "alice rejected" in watched and 'reason: "deploy freeze until 18:00"' in watched
    assert 'signal approval from alice: reject; reason "deploy freeze until 18:00"' in history or \
        'update submit_approval from alice: reject; reason "deploy freeze until 18:00"' in history
    ticket = Path(closed.tickets[0].url.removeprefix("file://")).read_text()
    assert ticket.splitlines()[1] == f"# [rejected] {handle.id}" and 'reason: "deploy freeze until 18:00"' in ticket
    assert (row["phase"], row["waiting_for"]) == ("rejected", "-")


async def _listed(capsys: pytest.CaptureFixture[str], cli_state: Path, incident_id: str, ready) -> dict:  # noqa: ANN001
    """The incident's row in `firebreak list --json`, once visibility shows it as ``ready``."""
    row: dict | None = None
    for _ in range(50):
        assert await _run(["list", "--json", "--state-dir", str(cli_state)]) == 0
        row = next((r for r in json.loads(capsys.readouterr().out) if r["incident_id"] == incident_id), None)
        if row is not None and ready(row):
            return row
        await asyncio.sleep(0.2)
    raise AssertionError(f"{incident_id} not listed as expected; last row {row}")


@pytest.mark.integration
def test_version_stack_down_bad_alert_file_and_closed_pipe(tmp_path: Path):
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("firebreak 0.1.0 (temporalio 1.35.0)")

    # The stack is down: nothing listens where stack.json points.
    (tmp_path / "stack.json").write_text(json.dumps({"settings": {
        "temporal": {"address": "127.0.0.1:9"}, "api_url": CLOSED_PORT_URL}}))
    for argv in (["list"], ["status", "x"], ["status", "x", "--watch"], ["history", "x"]):
        down = cli(*argv, "--state-dir", str(tmp_path))
        assert down.returncode == 1, (argv, down.stderr)
        assert "no Temporal at 127.0.0.1:9: run `firebreak up`" in down.stderr, (argv, down.stderr)
        assert "Traceback" not in down.stderr

    bad = tmp_path / "alert.json"
    bad.write_text(json.dumps({"fingerprint": "f1", "labels": {"service": "checkout"}}))
    refused = cli("alert", str(bad), "--state-dir", str(tmp_path))
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"firebreak: {bad}: alert [0].labels: Value error, labels.alertname is required")
    bad.write_text("{not json")
    assert cli("alert", str(bad), "--state-dir", str(tmp_path)).stderr.strip().startswith(
        f"firebreak: {bad}: not JSON: Expecting property name enclosed in double quotes at line 1 column 2")
    assert cli("alert", str(tmp_path / "missing.json")).returncode == 2

    # A reader that stops early (`| head`) is not an error: no traceback, exit 0. The read end closes
    # before the command writes (it is still importing), so its writes always meet a closed pipe.
    with subprocess.Popen([FIREBREAK, "runbook", "schema"], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 0 and stderr == ""
