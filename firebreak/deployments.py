"""Worker Deployments: an incident finishes on the build that started it.

An incident can wait hours for an approval, and a deploy in between must not hand its history to code
that would replay it differently. With a deployment name and a build id configured, a worker is one
version of the Worker Deployment and every IncidentWorkflow it starts is PINNED to that version: its
later tasks go to that build's workers only, while new incidents go to the deployment's current version.
Without them the worker is unversioned, and `workflow.patched` plus the replay corpus carry upgrades.

A rolling deploy: start the new build's workers with ``--make-current``; keep the old build's workers
until ``temporal worker deployment describe-version`` says the old version is drained.
"""

from __future__ import annotations

import asyncio

from temporalio.api.workflowservice.v1 import SetWorkerDeploymentCurrentVersionRequest
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.service import RPCError
from temporalio.worker import WorkerDeploymentConfig

from firebreak.config import TemporalSettings


class DeploymentError(Exception):
    """The deployment settings are incomplete, or the server would not take the version."""


def deployment_config(settings: TemporalSettings) -> WorkerDeploymentConfig | None:
    """The worker's versioning, or None for an unversioned worker."""
    if settings.deployment is None and settings.build_id is None:
        return None
    if not settings.deployment or not settings.build_id:
        raise DeploymentError("a versioned worker needs both temporal.deployment and temporal.build_id")
    return WorkerDeploymentConfig(
        version=WorkerDeploymentVersion(settings.deployment, settings.build_id),
        use_worker_versioning=True,
        default_versioning_behavior=VersioningBehavior.PINNED,
    )


async def make_current(client: Client, settings: TemporalSettings, *, identity: str, timeout_s: float = 60.0) -> None:
    """Route new incidents to this build. The version exists once one of its workers has polled, so ask
    again until the server knows it."""
    if not settings.deployment or not settings.build_id:
        raise DeploymentError("make-current needs temporal.deployment and temporal.build_id")
    request = SetWorkerDeploymentCurrentVersionRequest(
        namespace=client.namespace, deployment_name=settings.deployment, build_id=settings.build_id, identity=identity)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            await client.workflow_service.set_worker_deployment_current_version(request)
            return
        except RPCError as exc:
            if loop.time() > deadline:
                raise DeploymentError(f"{settings.deployment}/{settings.build_id} could not be made current: "
                                      f"{exc.message}") from None
            await asyncio.sleep(0.25)
