"""`firebreak upgrade-check` names the open incidents a worker without a patch could not replay.

An incident that predates a patch is, to Temporal's visibility, an ``IncidentWorkflow`` run whose
``TemporalChangeVersion`` lacks the patch id: the run never passed ``workflow.patched(ID)``. A stand-in
workflow registered under that type (on a task queue of its own) makes one, exactly as old code did;
a real incident on today's worker records its patches and is not named.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from firebreak.cli import main
from firebreak.contracts import Phase
from firebreak.upgrades import pre_patch_query
from incidents import inject, make_alert, open_incident, wait_for_phase
from worker import build_worker


@workflow.defn(name="IncidentWorkflow")
class PrePatchIncident:
    """What an incident started before every patch looks like from outside: no patch marker, still open."""

    def __init__(self) -> None:
        self.done = False

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: self.done)

    @workflow.signal
    def finish(self) -> None:
        self.done = True


async def _cli(argv: list[str]) -> int:
    return await asyncio.to_thread(main, argv)


async def test_upgrade_check_names_the_open_pre_patch_incident_only(
    dev_env: WorkflowEnvironment, settings, fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    (tmp_path / "stack.json").write_text(json.dumps({"settings": {"temporal": {
        "address": dev_env.client.service_client.config.target_host,
        "payload_key_file": settings.temporal.payload_key_file}}}))
    old_id = f"pre-patch-{uuid.uuid4().hex[:8]}"
    queue = f"pre-patch-{uuid.uuid4().hex[:8]}"
    inject(fleet.url, "checkout", "bad_deploy")
    # Unsandboxed: the sandbox would re-import this test module, CLI and all; the stand-in does no I/O.
    async with Worker(dev_env.client, task_queue=queue, workflows=[PrePatchIncident],
                      workflow_runner=UnsandboxedWorkflowRunner()), \
            build_worker(dev_env.client, settings):
        old = await dev_env.client.start_workflow("IncidentWorkflow", id=old_id, task_queue=queue)
        current = await open_incident(dev_env.client, settings, make_alert("DrillPair"))
        await wait_for_phase(current, Phase.awaiting_approval)
        try:
            for _ in range(40):  # visibility is eventually consistent
                code = await _cli(["upgrade-check", "--patch", "lifecycle-v2", "--json", "--state-dir", str(tmp_path)])
                [row] = json.loads(capsys.readouterr().out)
                if old_id in row["open_incidents"]:
                    break
                await asyncio.sleep(0.5)
            assert code == 0 and row["patch"] == "lifecycle-v2" and row["safe_to_deprecate"] is False
            assert old_id in row["open_incidents"] and current.id not in row["open_incidents"]

            assert await _cli(["upgrade-check", "--patch", "lifecycle-v2", "--state-dir", str(tmp_path)]) == 0
            shown = capsys.readouterr().out
            assert "lifecycle-v2:" in shown and old_id in shown and "still need its old branch" in shown

            assert await _cli(["upgrade-check", "--patch", "no-such-patch", "--state-dir", str(tmp_path)]) == 2
            assert "no patch 'no-such-patch'" in capsys.readouterr().err
        finally:
            await old.signal(PrePatchIncident.finish)
            await current.terminate("test over")


def test_the_query_is_built_only_from_a_declared_patch_id():
    assert "TemporalChangeVersion NOT IN ('lifecycle-v2')" in pre_patch_query("lifecycle-v2")
    with pytest.raises(ValueError):
        pre_patch_query("x') OR ('1'='1")
