"""The worker takes a few workflow tasks at a time, not the SDK's hundred (see worker.py's WORKFLOW_TASK_SLOTS):
bench/pipeline.py showed a worker holding thousands of incidents time its tasks out under the default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from worker import WORKFLOW_TASK_SLOTS, build_worker

ROOT = Path(__file__).resolve().parent.parent


async def test_the_worker_takes_at_most_its_slots_of_workflow_tasks(time_env: WorkflowEnvironment, settings):
    worker = build_worker(time_env.client, settings)
    assert WORKFLOW_TASK_SLOTS == 10
    assert worker.config()["max_concurrent_workflow_tasks"] == WORKFLOW_TASK_SLOTS


@pytest.mark.integration
def test_the_slots_are_set_by_the_environment():
    shown = subprocess.run(
        [sys.executable, "-c", "import worker; print(worker.WORKFLOW_TASK_SLOTS)"], cwd=ROOT, check=True,
        env={**os.environ, "FIREBREAK_WORKFLOW_TASK_SLOTS": "4"}, capture_output=True, text=True,
    )
    assert shown.stdout.strip() == "4"
