"""Reading an incident and handing it an approval, with or without a live worker.

A workflow query and an update both need a worker to answer. Right after a worker
crash an on-call engineer must still see the plan and leave an approval, so:

* the status comes from the ``status`` query, or, when no worker answers in time,
  from the memo the workflow writes when it proposes (plan, hash, requesters...);
* an approval goes as the ``submit_approval`` update, or, when no worker answers
  in time, as the ``approval`` signal: recorded in history at once, and judged by
  the same code path as soon as a worker runs the incident again.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio.client import WorkflowHandle, WorkflowQueryFailedError, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError, RPCStatusCode

from firebreak.contracts import Approval, ApprovalOutcome, IncidentStatus

MEMO_KEY = "firebreak"  # what an approver needs, readable from visibility without a worker
WORKER_WAIT = timedelta(seconds=2)
_NO_ANSWER = (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED, RPCStatusCode.UNAVAILABLE)


def memo_status(status: IncidentStatus) -> dict[str, Any]:
    """The memo: the status without the evidence series (they can be large; the plan cannot)."""
    return status.model_dump(mode="json", exclude={"evidence"})


async def read_status(handle: WorkflowHandle[Any, Any], wait: timedelta = WORKER_WAIT) -> tuple[IncidentStatus, str]:
    """The incident's status and where it came from ("the workflow", or its memo when no worker answers)."""
    try:
        status: IncidentStatus = await handle.query("status", result_type=IncidentStatus, rpc_timeout=wait)
        return status, "the workflow"
    except WorkflowQueryFailedError:
        pass
    except RPCError as exc:
        if exc.status not in _NO_ANSWER and "Timeout" not in exc.message:
            raise
    description = await handle.describe()
    memo = await description.memo_value(MEMO_KEY, None)
    if memo is None:
        raise WorkerDown(f"no worker answered for {handle.id} within {wait.total_seconds():.0f}s, "
                         "and it has proposed nothing yet")
    return IncidentStatus.model_validate(memo), "its memo (no worker answered; the plan as proposed)"


async def submit_approval(handle: WorkflowHandle[Any, Any], approval: Approval,
                          wait: timedelta = WORKER_WAIT) -> ApprovalOutcome | None:
    """The workflow's answer, or None when no worker answered and the approval went as a signal.

    A quick status query first tells whether a worker is there: without one, an update would only
    be held in the server's memory, so the approval goes straight to history as a signal instead.
    """
    _, source = await read_status(handle, wait)
    if source != "the workflow":
        await handle.signal("approval", approval.model_dump(mode="json"))
        return None
    try:
        outcome: ApprovalOutcome = await handle.execute_update(
            "submit_approval", approval, result_type=ApprovalOutcome, rpc_timeout=wait)
        return outcome
    except WorkflowUpdateRPCTimeoutOrCancelledError:
        pass
    except RPCError as exc:
        if exc.status not in _NO_ANSWER and "Timeout" not in exc.message:
            raise
    await handle.signal("approval", approval.model_dump(mode="json"))
    return None


class WorkerDown(Exception):
    """No worker answered and there is nothing to read instead."""
