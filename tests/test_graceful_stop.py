"""A stopping worker drains: `firebreak down` never leaves an activity to time out.

A real ``python worker.py`` process on the dev server holds a verification activity (8 s of polling) when ``firebreak.stack.down`` stops the stack. The worker gets SIGTERM first and alone, lets the
activity finish and report, and exits 0; only then does the rest of the stack (here a stand-in for the
Temporal server that records when it was told to stop) get its SIGTERM. The history shows the activity
completed on its first attempt, and a new worker carries the incident to the ending it would have had.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from firebreak import stack
from firebreak.contracts import Phase
from incidents import inject, make_alert, open_incident, report_of, submit, wait_for_phase
from worker import build_worker

ROOT = Path(__file__).resolve().parent.parent
# Stands in for the Temporal server: writes when SIGTERM reached it, then exits.
SERVER_STAND_IN = """
import signal, sys, time
def stopped(*_):
    open(sys.argv[1], "w").write(repr(time.time()))
    sys.exit(0)
signal.signal(signal.SIGTERM, stopped)
while True:
    time.sleep(1)
"""


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    # Own session, as `firebreak up` starts them: `down` signals the process group.
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, **(env or {})})


async def _running(handle: WorkflowHandle, activity: str) -> bool:
    """``activity`` is running in a worker now (history records its start only once it ends)."""
    description = await handle.describe()
    return any(p.activity_type.name == activity and p.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
               for p in description.raw_description.pending_activities)


async def _activity_events(handle: WorkflowHandle, activity: str) -> list[str]:
    """The event types of every attempt of ``activity`` in the run's history, in order."""
    scheduled: set[int] = set()
    found: list[str] = []
    async for event in handle.fetch_history_events():
        attributes = event.activity_task_scheduled_event_attributes
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED and attributes.activity_type.name == activity:
            scheduled.add(event.event_id)
            continue
        for name in ("activity_task_started", "activity_task_completed", "activity_task_failed",
                     "activity_task_timed_out", "activity_task_canceled"):
            if event.HasField(f"{name}_event_attributes"):
                if getattr(event, f"{name}_event_attributes").scheduled_event_id in scheduled:
                    found.append(name)
    return found


def _logged_at(log: str, message: str) -> float:
    """When the worker logged ``message`` (its log lines start with local time, milliseconds after a comma)."""
    line = next(line for line in log.splitlines() if message in line)
    stamp, millis = line[:23].split(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


async def _until(predicate, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def _finished(handle: WorkflowHandle) -> None:
    """The verification finished in the draining worker: its completion is in history."""
    assert await _activity_events(handle, "verify_step") == ["activity_task_started", "activity_task_completed"]


async def _handed_back(handle: WorkflowHandle) -> None:
    """The verification outlived the drain: the SDK cancelled it and reported a retryable WorkerShutdown
    failure (a retry is not in history until its last attempt ends), so its next attempt waits for any
    worker now, not for a heartbeat timeout."""
    assert await _activity_events(handle, "verify_step") == []
    [pending] = (await handle.describe()).raw_description.pending_activities
    assert pending.activity_type.name == "verify_step" and pending.attempt == 2
    assert pending.state == PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED
    assert pending.last_failure.application_failure_info.type == "WorkerShutdown"


# (the worker's drain in seconds, what the verification's 8 s of polling leave behind when `down` returns)
@pytest.mark.parametrize(("drain", "check"), [("20", _finished), ("1", _handed_back)], ids=["finishes", "handed-back"])
async def test_down_drains_the_worker_before_stopping_the_server(
    dev_env: WorkflowEnvironment, settings, fleet, approvers, tmp_path: Path, drain: str, check
) -> None:
    worker_state = tmp_path / "worker-state"
    worker_state.mkdir()
    config = settings.model_dump(mode="json", exclude={"state_dir"})
    config["temporal"]["address"] = dev_env.client.service_client.config.target_host
    stopped_at = tmp_path / "server-stopped-at"
    server = _spawn([sys.executable, "-c", SERVER_STAND_IN, str(stopped_at)], tmp_path / "server.log")
    worker = _spawn([sys.executable, str(ROOT / "worker.py"), "--state-dir", str(worker_state)],
                    tmp_path / "worker.log", env={"FIREBREAK_WORKER_DRAIN_S": drain})
    (worker_state / "stack.json").write_text(json.dumps(
        {"settings": config, "pids": {"temporal": server.pid, "worker": worker.pid}}))
    try:
        bad = inject(fleet.url, "checkout", "bad_deploy")["version"]
        handle = await open_incident(dev_env.client, settings, make_alert("DrillDrain"))
        waiting = await wait_for_phase(handle, Phase.awaiting_approval, timeout=60)
        assert (await submit(handle, approvers.approval("alice", handle.id, waiting.plan_hash))).counted

        # The verification (it polls for 8 s: Prometheus is down here) is running in the worker process.
        await _until(lambda: _running(handle, "verify_step"))
        began = time.time()
        await asyncio.to_thread(stack.down, worker_state)

        assert worker.wait(timeout=1) == 0, (tmp_path / "worker.log").read_text()[-3000:]
        assert stopped_at.exists(), "the rest of the stack was not stopped"
        server_stopped = float(stopped_at.read_text())
        # The worker had exited before the server got SIGTERM, its in-flight activity reported.
        await check(handle)
        log = (tmp_path / "worker.log").read_text()
        assert "SIGTERM: draining running activities" in log
        assert began < _logged_at(log, "worker stopped") < server_stopped
    finally:
        for process in (worker, server):
            if process.poll() is None:
                process.kill()
                process.wait()

    # A new worker carries on (from the recorded verdict, or by retrying the handed-back verification at
    # once): the verification does not hold, so the undo runs, once.
    async with build_worker(dev_env.client, settings):
        report = await asyncio.wait_for(report_of(handle), 60)
    assert report.phase == Phase.rolled_back, report.outcome
    events = await _activity_events(handle, "verify_step")
    assert "activity_task_timed_out" not in events and events[-1] == "activity_task_completed"
    assert [c["kind"] for c in fleet.fleet.changes("checkout")][-2:] == ["rollback", "deploy"]
    assert fleet.fleet.service_state("checkout")["version"] == bad
