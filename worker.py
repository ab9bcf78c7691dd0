"""Runs a Firebreak worker: IncidentWorkflow and every activity it calls.

    python worker.py [--state-dir DIR]

Scale out by running more of these against the same Temporal namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker

from activities.approvals import ApprovalActivities
from activities.deps import ActivityDeps
from activities.diagnose import diagnose
from activities.execute import ExecuteActivities
from activities.investigate import InvestigateActivities
from activities.notify import NotifyActivities
from activities.observe import ObserveActivities
from activities.tickets import TicketActivities
from activities.verify import VerifyActivities
from firebreak.config import Settings, load_settings
from firebreak.telemetry import export_from_env, temporal_interceptors
from firebreak.temporal import connect
from workflows.incident import IncidentWorkflow


def activities_for(deps: ActivityDeps) -> Sequence[Any]:
    return [
        InvestigateActivities(deps).investigate,
        diagnose,
        ApprovalActivities(deps).verify_approval,
        ExecuteActivities(deps).execute_step,
        VerifyActivities(deps).verify_step,
        ObserveActivities(deps).observe_target,
        TicketActivities(deps).file_ticket,
        NotifyActivities(deps).notify,
    ]


def build_worker(client: Client, settings: Settings, deps: ActivityDeps | None = None) -> Worker:
    deps = deps or ActivityDeps.from_settings(settings)
    return Worker(
        client,
        task_queue=settings.temporal.task_queue,
        workflows=[IncidentWorkflow],
        activities=activities_for(deps),
    )


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a Firebreak worker.")
    parser.add_argument("--state-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = load_settings(args.state_dir)
    export_from_env("firebreak-worker")  # only with OTEL_EXPORTER_OTLP_ENDPOINT set
    # Traced: the workflow and its activities join the trace of the request that started them.
    client = await connect(settings.temporal, temporal_interceptors())
    worker = build_worker(client, settings)
    logging.getLogger("firebreak.worker").info(
        "worker on %s namespace %s task queue %s", settings.temporal.address, settings.temporal.namespace,
        settings.temporal.task_queue,
    )
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main())
