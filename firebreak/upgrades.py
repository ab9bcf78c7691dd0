"""Which open incidents would a worker without a given patch fail to replay? One visibility query each.

When a run first passes ``workflow.patched(ID)``, the SDK adds ID to the run's
``TemporalChangeVersion`` search attribute. A running incident without it started before the patch
(or has not reached the patched code yet): it still needs the patch's old branch, so deprecating
that patch would break it. An operator asks before every upgrade that deprecates or removes one.

The answer errs on the safe side: an incident that never reaches the patched code is listed too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

WORKFLOW_TYPE = "IncidentWorkflow"


def pre_patch_query(patch_id: str, workflow_type: str = WORKFLOW_TYPE) -> str:
    """The visibility query for running incidents that have not recorded ``patch_id``."""
    if not patch_id or "'" in patch_id or "\\\\" in patch_id:
        raise ValueError(f"patch id {patch_id[:40]!r} is not one the workflow declares")
    return (f"WorkflowType = '{workflow_type}' AND ExecutionStatus = 'Running' "
            f"AND TemporalChangeVersion NOT IN ('{patch_id}')")


@dataclass(frozen=True)
class PatchCheck:
    patch_id: str
    blocking: list[str]  # ids of the open incidents that still need the patch's old branch

    @property
    def safe_to_deprecate(self) -> bool:
        return not self.blocking


async def check(client: Any, patch_ids: list[str], workflow_type: str = WORKFLOW_TYPE,
                limit: int = 1000) -> list[PatchCheck]:
    """For each patch, the open incidents (up to ``limit``) a worker without it could not replay."""
    out = []
    for patch_id in patch_ids:
        ids = [wf.id async for wf in client.list_workflows(pre_patch_query(patch_id, workflow_type), limit=limit)]
        out.append(PatchCheck(patch_id, ids))
    return out
