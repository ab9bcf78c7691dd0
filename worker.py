"""Runs a Firebreak worker: IncidentWorkflow and every activity it calls.

    python worker.py [--state-dir DIR]

Scale out by running more of these against the same Temporal namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
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
from activities.credentials import BrokerActivities
from activities.deps import ActivityDeps
from activities.diagnose import diagnose
from activities.execute import ExecuteActivities
from activities.investigate import InvestigateActivities
from activities.notify import NotifyActivities
from activities.observe import ObserveActivities
from activities.tickets import TicketActivities
from activities.verify import VerifyActivities
from firebreak.config import Settings, load_settings
from firebreak.deployments import DeploymentError, deployment_config, make_current
from firebreak.runbook import RunbookError, load_runbooks
from firebreak.telemetry import export_from_env, temporal_interceptors
from firebreak.temporal import connect
from workflows.incident import IncidentWorkflow


def activities_for(deps: ActivityDeps) -> Sequence[Any]:
    return [
        InvestigateActivities(deps).investigate,
        diagnose,
        ApprovalActivities(deps).verify_approval,
        ExecuteActivities(deps).execute_step,
        BrokerActivities(deps).report_run_closed,
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
# Runs kept in memory between their tasks (the SDK's default); an evicted run replays its history on its
# next task. bench/pipeline.py measures what that costs an approval, and the memory the cache holds.
WORKFLOW_CACHE = int(os.environ.get("FIREBREAK_WORKFLOW_CACHE", "1000"))
# Workflow tasks run at once. They all run Python under one GIL, so more at once is no faster, only later
# each. At the SDK's default (100), escalation timers coming due for thousands of evicted incidents
# shared one core a hundred ways: tasks passed their 10 s timeout, were retried (more work), and new
# incidents' first tasks waited minutes behind them (bench/pipeline.py, 10,000 held). A few at a time
# finish in time; the rest wait at the server, where waiting costs nothing.
WORKFLOW_TASK_SLOTS = int(os.environ.get("FIREBREAK_WORKFLOW_TASK_SLOTS", "10"))


def build_worker(client: Client, settings: Settings, deps: ActivityDeps | None = None, *,
                 drain: timedelta = timedelta(0)) -> Worker:
    deps = deps or ActivityDeps.from_settings(settings)
    return Worker(
        client,
        task_queue=settings.temporal.task_queue,
        workflows=[IncidentWorkflow],
        activities=activities_for(deps),
        graceful_shutdown_timeout=drain,
        max_cached_workflows=WORKFLOW_CACHE,
        max_concurrent_workflow_tasks=WORKFLOW_TASK_SLOTS,
        deployment_config=deployment_config(settings.temporal),  # None: unversioned
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


def tune_process() -> None:
    """Costs measured by bench/pipeline.py on the worker's critical path, cut for this process only."""
    # The workflow sandbox imports the workflow module again for every run it starts (and every run
    # evicted from the cache): with PYTHONDONTWRITEBYTECODE set and no .pyc, each of those compiles
    # workflows/incident.py again. Write the bytecode (where the tree is writable) whatever the environment says.
    sys.dont_write_bytecode = False
    # httpcore tries `import sniffio` on every request and lock it creates; anyio 4 no longer installs it, and a
    # failed import is never cached, so each try stats every sys.path entry (11% of the worker's busy time).
    # None in sys.modules makes it fail at once, with the same ImportError httpcore expects.
    if importlib.util.find_spec("sniffio") is None:
        sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]
    # One INFO line per HTTP request (mints, revokes, reads, writes) is the targets' access log, not ours.
    logging.getLogger("httpx").setLevel(logging.WARNING)


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a Firebreak worker.")
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--make-current", action="store_true",
                        help="route new incidents to this worker's build (temporal.deployment/build_id)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    tune_process()
    settings = load_settings(args.state_dir)
    try:  # a runbook that cannot run is refused before any incident meets it, naming file, line and field
        load_runbooks(settings.resolved_runbooks_dir())
    except RunbookError as exc:
        raise SystemExit(f"worker refused to start: {exc}") from None
    export_from_env("firebreak-worker")  # only with OTEL_EXPORTER_OTLP_ENDPOINT set
    # Traced: the workflow and its activities join the trace of the request that started them.
    client = await connect(settings.temporal, temporal_interceptors())
    deps = ActivityDeps.from_settings(settings)
    worker = build_worker(client, settings, deps, drain=DRAIN)
    logging.getLogger("firebreak.worker").info(
        "worker on %s namespace %s task queue %s", settings.temporal.address, settings.temporal.namespace,
        settings.temporal.task_queue,
    )
    current = asyncio.create_task(_make_current(client, settings)) if args.make_current else None
    await run_until_stopped(worker)
    if current is not None:
        current.cancel()
    # Revocations still on their way (reads revoke in the background) or queued for retry land before we go.
    left = await deps.broker.settle(timeout_s=10)
    if left:
        logging.getLogger("firebreak.worker").warning("%d grant(s) not revoked at stop; they expire on their own: %s",
                                                      len(left), ", ".join(left))
    logging.getLogger("firebreak.worker").info("worker stopped")


async def _make_current(client: Client, settings: Settings) -> None:
    """Once this build has polled the server knows it; from then on new incidents start on it."""
    log = logging.getLogger("firebreak.worker")
    try:
        await make_current(client, settings.temporal, identity=f"worker {os.getpid()}")
        log.info("build %s is now current in deployment %s", settings.temporal.build_id, settings.temporal.deployment)
    except DeploymentError as exc:
        log.error("%s", exc)


if __name__ == "__main__":
    asyncio.run(main())
    # Drained and reported: leave without interpreter finalization, which can abort a process that
    # used a Temporal client (sdk-python#300) and would turn a clean stop into exit code 134.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)
