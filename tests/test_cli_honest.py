"""The approver is told the truth when the dev server dies under `firebreak approve`.

Real components throughout: a dev server of this test's own (a process it can SIGKILL and start
again on the same port and database), the real worker, the real API and the real `firebreak`
command as a process. The approval is held in flight by the broker's own lock (the workflow's check
of the signature waits for the broker), so the server is killed after Temporal recorded the
approval and before anyone could answer whether it counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_harness import TOKEN, api_settings
from conftest import BIN, PAYLOAD_KEY_FILE, temporal_bin
from incidents import inject, make_alert, open_incident, wait_for_phase
from temporalio.api.enums.v1 import EventType

from demo.prom import free_port
from firebreak.api import ApiServer
from firebreak.config import TemporalSettings
from firebreak.contracts import IncidentStatus, Phase
from firebreak.receipts import ensure_intake_key
from firebreak.temporal import SEARCH_ATTRIBUTES, connect
from worker import build_worker


class DevServer:
    """`temporal server start-dev` as a process of this test: killed with SIGKILL, started again on its port."""

    def __init__(self, db: Path, port: int) -> None:
        self.db, self.port = db, port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [temporal_bin(), "server", "start-dev", "--ip", "127.0.0.1", "--port", str(self.port), "--headless",
             "--db-filename", str(self.db), "--log-level", "error",
             *[arg for key in SEARCH_ATTRIBUTES for arg in ("--search-attribute", f"{key.name}=Keyword")]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[DevServer]:
    server = DevServer(tmp_path / "temporal.db", free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def _connected(temporal: TemporalSettings, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            client = await connect(temporal)
            await client.service_client.check_health()
            return client
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


def _cli_state(tmp_path: Path, state_dir: Path, settings, api_url: str) -> Path:
    """A state dir as `firebreak up` writes it, pointing the command at this test's servers."""
    cli = tmp_path / "cli"
    cli.mkdir()
    (cli / "keys").symlink_to(state_dir / "keys")
    ensure_intake_key(state_dir)
    (cli / "intake").symlink_to(state_dir / "intake")
    (cli / "stack.json").write_text(json.dumps({
        "settings": {"temporal": settings.temporal.model_dump(mode="json"), "roster": str(settings.resolved_roster()),
                     "runbooks_dir": str(settings.resolved_runbooks_dir()), "targets": settings.targets,
                     "api_url": api_url},
        "demo": {"intake_token": TOKEN},
    }))
    return cli


async def _firebreak(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(str(BIN / "firebreak"), *argv, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def _approval_reached_temporal(client, incident_id: str) -> bool:
    history = await client.get_workflow_handle(incident_id).fetch_history()
    return any(e.event_type in (EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED,
                                EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
               and (e.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
                    or e.workflow_execution_signaled_event_attributes.signal_name == "approval")
               for e in history.events)


async def test_server_killed_during_approve_never_says_failed_and_the_retry_says_already_counted(
    dev_server: DevServer, settings, fleet, broker, state_dir: Path, runbooks_dir: Path, tmp_path: Path
):
    temporal = TemporalSettings(address=f"127.0.0.1:{dev_server.port}", task_queue=settings.temporal.task_queue,
                                payload_key_file=str(PAYLOAD_KEY_FILE))
    settings = settings.model_copy(update={"temporal": temporal})
    client = await _connected(temporal)
    inject(fleet.url, "checkout", "bad_deploy")
    api = ApiServer(api_settings(state_dir, temporal, runbooks_dir), lambda: connect(temporal))
    async with build_worker(client, settings), api:
        cli = _cli_state(tmp_path, state_dir, settings, api.url)
        handle = await open_incident(client, settings, make_alert("DrillPair"))
        await wait_for_phase(handle, Phase.awaiting_approval)

        # The broker cannot answer the workflow's check of the signature: the approval stays in flight.
        assert broker.broker is not None
        broker.broker.lock.acquire()
        try:
            approve = await _firebreak("approve", handle.id, "--as", "alice", "--state-dir", str(cli))
            deadline = time.monotonic() + 60
            while not await _approval_reached_temporal(client, handle.id):
                assert time.monotonic() < deadline, "the approval never reached Temporal"
                await asyncio.sleep(0.1)
            dev_server.kill()  # Temporal has the approval; nobody has said whether it counted
            out, err = (b.decode() for b in await asyncio.wait_for(approve.communicate(), 120))
        finally:
            broker.broker.lock.release()
        answer = out + err
        said = err + out.split("Plan hash, recomputed here:")[-1]  # what it said after showing the plan

        # Never "failed" or "refused" for an approval that reached the incident: counted, queued, or unknown
        # with how to check.
        assert "refused" not in said and "failed" not in said and "not delivered" not in said, answer
        if approve.returncode == 0:
            assert "alice counted" in out or "recorded, not yet counted" in out, answer
        else:
            assert approve.returncode == 1, answer
            assert "outcome unknown" in err and f"firebreak status {handle.id}" in err, answer
            assert "again is safe" in err, answer
        # A 503 is named as a 503, never as an API that could not be reached.
        if "503" in answer:
            assert f"the API at {api.url} is unreachable" not in answer, answer

        # Temporal returns on the same database: the approval counts, exactly once.
        dev_server.start()
        client = await _connected(temporal)
        handle = client.get_workflow_handle(handle.id)
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(Exception):  # the worker may still be reconnecting
                status: IncidentStatus = await handle.query("status", result_type=IncidentStatus)
                if any(a.approver == "alice" and a.counted for a in status.approvals):
                    break
            assert time.monotonic() < deadline, "alice's approval never counted"
            await asyncio.sleep(0.3)

        # The approver's retry: it already counted, says so, exit 0, and nothing new is recorded.
        retry = await _firebreak("approve", handle.id, "--as", "alice", "--state-dir", str(cli))
        out, err = (b.decode() for b in await asyncio.wait_for(retry.communicate(), 120))
        assert retry.returncode == 0, out + err
        assert "approve by alice already counted" in out and "nothing sent" in out, out + err
        final = await handle.query("status", result_type=IncidentStatus)
        assert [a.counted for a in final.approvals if a.approver == "alice"].count(True) == 1
        print(f"the approver was told: {said.strip()}\nthe retry: {out.strip()}")
        if not final.phase.closed:
            await handle.terminate("test over")
