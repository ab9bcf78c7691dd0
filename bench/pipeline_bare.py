"""Bare Temporal, shaped like an incident: the baseline ``bench/pipeline.py`` measures Firebreak against.

    python -m bench.pipeline_bare --address HOST:PORT --task-queue QUEUE

A workflow with the same messages and the same number of activities as the bench's incident, each
activity a no-op: started by signal-with-start (``alert``), N parallel "investigations", a diagnosis,
the observations, then it waits for an ``approve`` signal or a ``submit_approval`` update (which runs
one activity, as the approval check does), then the activities after approval. Run in its own
process, like ``worker.py``, traced the same way, with the SDK's default worker settings.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():  # as workflows/incident.py imports its models
    from pydantic import BaseModel

WORKFLOW = "BareIncident"


class BareShape(BaseModel):
    investigations: int = 3
    before_proposal: int = 2  # diagnose, observe
    background: int = 1  # the proposal's ticket, off the critical path
    after_approval: int = 5  # observe, execute, verify, closing ticket, run closed


@activity.defn(name="bare_noop")
async def noop(label: str) -> float:
    """Does nothing; returns when it ran, by the worker's clock."""
    return time.time()


def _call(label: str) -> object:
    return workflow.execute_activity(noop, label, start_to_close_timeout=timedelta(seconds=30))


@workflow.defn(name=WORKFLOW)
class BareIncident:
    def __init__(self) -> None:
        self.alerts = 0
        self.phase = "investigating"
        self.approved = False

    @workflow.signal
    def alert(self, _payload: object) -> None:
        self.alerts += 1

    @workflow.signal
    def approve(self, _payload: object) -> None:
        self.approved = True

    @workflow.update
    async def submit_approval(self, _payload: object) -> str:
        await _call("check approval")
        self.approved = True
        return self.phase

    @workflow.query
    def status(self) -> dict[str, str]:
        return {"phase": self.phase}

    @workflow.run
    async def run(self, shape: BareShape) -> str:
        await workflow.wait_condition(lambda: self.alerts > 0)
        await asyncio.gather(*[_call(f"investigate {i}") for i in range(shape.investigations)])
        for i in range(shape.before_proposal):
            await _call(f"before proposal {i}")
        background = [asyncio.ensure_future(_call(f"background {i}")) for i in range(shape.background)]
        self.phase = "awaiting_approval"
        await workflow.wait_condition(lambda: self.approved)
        self.phase = "executing"
        for i in range(shape.after_approval):
            await _call(f"after approval {i}")
        await asyncio.gather(*background)
        await workflow.wait_condition(workflow.all_handlers_finished)
        self.phase = "resolved"
        return self.phase


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--workflow-cache", type=int, default=1000, help="max_cached_workflows, as the worker's")
    parser.add_argument("--workflow-task-slots", type=int, default=None,
                        help="max_concurrent_workflow_tasks, as the worker's (default: the SDK's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from firebreak.telemetry import export_from_env, temporal_interceptors

    export_from_env("bare-worker")  # traced as worker.py is: the same exporter, the same interceptor
    client = await Client.connect(args.address, data_converter=pydantic_data_converter,
                                  interceptors=temporal_interceptors())
    worker = Worker(client, task_queue=args.task_queue, workflows=[BareIncident], activities=[noop],
                    max_cached_workflows=args.workflow_cache, max_concurrent_workflow_tasks=args.workflow_task_slots)
    logging.getLogger("bare").info("worker on %s task queue %s", args.address, args.task_queue)
    await worker.run()


if __name__ == "__main__":
    # Run from the module by its own name: the workflow sandbox re-imports a workflow's module, never __main__.
    from bench import pipeline_bare

    asyncio.run(pipeline_bare.main())
    sys.stdout.flush()
    os._exit(0)  # sdk-python#300: never finalize an interpreter that used a client
