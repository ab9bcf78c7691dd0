"""Runs a Firebreak worker: IncidentWorkflow and every activity it calls.

    python worker.py [--state-dir DIR]

Scale out by running more of these against the same Temporal namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta
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


# How long a stopping worker lets its running activities finish. A write or an investigation takes
# seconds; a verification may poll for minutes: past the drain the SDK cancels it and reports a retryable
# "WorkerShutdown" failure, so its next attempt starts at once on any worker instead of waiting for a
# timeout. `firebreak down` waits for the drain (FIREBREAK_WORKER_DRAIN_S) plus a margin.
DRAIN = timedelta(seconds=float(os.environ.get("FIREBREAK_WORKER_DRAIN_S", "20")))


def build_worker(client: Client, settings: Settings, deps: ActivityDeps | None = None, *,
                 drain: timedelta = timedelta(0)) -> Worker:
    deps = deps or ActivityDeps.from_settings(settings)
    return Worker(
        client,
        task_queue=settings.temporal.task_queue,
        workflows=[IncidentWorkflow],
        activities=activities_for(deps),
        graceful_shutdown_timeout=drain,
    )


async def run_until_stopped(worker: Worker) -> None:
    """Run until SIGTERM or SIGINT, then drain: stop polling, let running activities finish (up to
    the worker's graceful shutdown timeout), report each one's outcome, and return."""
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []  # a strong reference: asyncio keeps only weak ones

    def stop(name: str) -> None:
        if not stopping:
            logging.getLogger("firebreak.worker").info("%s: draining running activities, then stopping", name)
            stopping.append(loop.create_task(worker.shutdown()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig.name)
    await worker.run()
    if stopping:
        await stopping[0]


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a Firebreak worker.")
    parser.add_argument("--state-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = load_settings(args.state_dir)
    export_from_env("firebreak-worker")  # only with OTEL_EXPORTER_OTLP_ENDPOINT set
    # Traced: the workflow and its activities join the trace of the request that started them.
    client = await connect(settings.temporal, temporal_interceptors())
    worker = build_worker(client, settings, drain=DRAIN)
    logging.getLogger("firebreak.worker").info(
        "worker on %s namespace %s task queue %s", settings.temporal.address, settings.temporal.namespace,
        settings.temporal.task_queue,
    )
    await run_until_stopped(worker)
    logging.getLogger("firebreak.worker").info("worker stopped")


if __name__ == "__main__":
    asyncio.run(main())
    # Drained and reported: leave without interpreter finalization, which can abort a process that
    # used a Temporal client (sdk-python#300) and would turn a clean stop into exit code 134.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)
