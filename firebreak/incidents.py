"""Reading an incident and handing it an approval, with or without a live worker.

A workflow query and an update both need a worker to answer. Right after a worker
crash an on-call engineer must still see the plan and leave an approval, so:

* the status comes from the ``status`` query, or, when no worker answers in time,
  from the memo the workflow writes when it proposes (plan, hash, requesters...);
* an approval goes as the ``submit_approval`` update, or, when no worker answers
  in time, as the ``approval`` signal: recorded in history at once, and judged by
  the same code path as soon as a worker runs the incident again. A refused
  approval fails its update (so the UI shows it refused); its outcome is read
  back from the failure.

An incident that ends needing a human (failed, expired, rollback_failed) ends as a
Failed run; :func:`final_report` reads its report from the failure as from a result.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from temporalio.client import (
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

if TYPE_CHECKING:  # the contracts are imported where read: `firebreak list` needs only the memo keys
    from firebreak.contracts import (
        Approval,
        ApprovalArrival,
        ApprovalOutcome,
        IncidentReport,
        IncidentStatus,
    )

MEMO_KEY = "firebreak"  # what an approver needs, readable from visibility without a worker
WAITING_KEY = "firebreak_waiting"  # what the incident waits for, in a few words (`firebreak list`)
WORKER_WAIT = timedelta(seconds=2)
_NO_ANSWER = (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED, RPCStatusCode.UNAVAILABLE)


def memo_status(status: IncidentStatus) -> dict[str, Any]:
    """The memo: the status without the evidence series (they can be large; the plan cannot)."""
    return status.model_dump(mode="json", exclude={"evidence"})


async def read_status(handle: WorkflowHandle[Any, Any], wait: timedelta = WORKER_WAIT) -> tuple[IncidentStatus, str]:
    """The incident's status and where it came from ("the workflow", or its memo when no worker answers)."""
    from firebreak.contracts import IncidentStatus

    try:
        status: IncidentStatus = await handle.query("status", result_type=IncidentStatus, rpc_timeout=wait)
        return status, "the workflow"
    except WorkflowQueryFailedError:
        pass
    except RPCError as exc:
        # "no poller seen for task queue recently": no worker at all (a closed incident's last word is its memo).
        if exc.status not in _NO_ANSWER and "Timeout" not in exc.message and "no poller" not in exc.message:
            raise
    description = await handle.describe()
    memo = await description.memo_value(MEMO_KEY, None)
    if memo is None:
        raise WorkerDown(f"no worker answered for {handle.id} within {wait.total_seconds():.0f}s, "
                         "and it has proposed nothing yet")
    return IncidentStatus.model_validate(memo), "its memo (no worker answered; the plan as proposed)"


async def submit_approval(handle: WorkflowHandle[Any, Any], approval: Approval,
                          wait: timedelta = WORKER_WAIT, *, arrival: ApprovalArrival | None = None,
                          sending: Callable[[], None] | None = None) -> ApprovalOutcome | None:
    """The workflow's answer, or None when no worker answered and the approval went as a signal.

    A quick status query first tells whether a worker is there: without one, an update would only
    be held in the server's memory, so the approval goes straight to history as a signal instead.
    The signal carries ``arrival`` (the API's signed receipt) beside the approval: judged after the
    approval deadline, it still counts if it arrived before. ``sending`` is called just before the
    approval itself goes out: a failure after it leaves the outcome unknown (it may have reached the
    incident), one before it delivered nothing.
    """
    signal = {**approval.model_dump(mode="json"), **({"arrival": arrival.model_dump(mode="json")} if arrival else {})}
    _, source = await read_status(handle, wait)
    if sending is not None:
        sending()
    if source != "the workflow":
        await handle.signal("approval", signal)
        return None
    try:
        return await approval_outcome(handle, approval, wait)
    except WorkflowUpdateRPCTimeoutOrCancelledError:
        pass
    except RPCError as exc:
        if exc.status not in _NO_ANSWER and "Timeout" not in exc.message:
            raise
    await handle.signal("approval", signal)
    return None


async def approval_outcome(handle: WorkflowHandle[Any, Any], approval: Approval,
                           wait: timedelta | None = None) -> ApprovalOutcome:
    """The ``submit_approval`` update's answer, counted or refused (a refusal fails the update)."""
    from firebreak.contracts import APPROVAL_REFUSED, ApprovalOutcome

    try:
        outcome: ApprovalOutcome = await handle.execute_update(
            "submit_approval", approval, result_type=ApprovalOutcome, rpc_timeout=wait)
        return outcome
    except WorkflowUpdateFailedError as exc:
        refused = _details(exc.cause, APPROVAL_REFUSED)
        if refused is None:
            raise
        return ApprovalOutcome.model_validate(refused)


async def final_report(handle: WorkflowHandle[Any, Any]) -> IncidentReport:
    """The incident's report, whether the run completed or failed because it needs a human."""
    from firebreak.contracts import NEEDS_A_HUMAN_FAILURE, IncidentReport

    try:
        result = await handle.result()
    except WorkflowFailureError as exc:
        report = _details(exc.cause, NEEDS_A_HUMAN_FAILURE)
        if report is None:
            raise
        return IncidentReport.model_validate(report)
    return result if isinstance(result, IncidentReport) else IncidentReport.model_validate(result)


def _details(cause: BaseException | None, failure_type: str) -> Any | None:
    """The first detail of an ApplicationError of this type (decoded as plain JSON), else None."""
    if isinstance(cause, ApplicationError) and cause.type == failure_type and cause.details:
        return cause.details[0]
    return None


class WorkerDown(Exception):
    """No worker answered and there is nothing to read instead."""
