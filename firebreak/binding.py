"""Payloads bound to their place: the interceptors that tell the codec what its context cannot.

The codec (firebreak/codec.py) binds every payload it writes to the workflow id and, for an activity,
its type and id: the SDK's serialization context tells it those. It does not tell it the message name
(signal, update, query), the run, or whether a workflow payload is a start. So:

- on clients, :class:`PayloadBinding` marks each argument of a start (``start:<type>``), of its start
  signal (``signal:<name>``, any run: a signal-with-start joins whichever run is open), of a signal or an
  update (``signal:<name>``, ``update:<name>``, the run that is open now: asked of Temporal when the
  handle names none) and of a query;
- in workflows, it marks an activity's input with the run that schedules it, and a continue-as-new's
  input with the run that continues;
- on the activity worker, it checks the run the codec could not (:func:`firebreak.codec.activity_bindings`).

A mark is a request, not a proof: the codec's MAC over the binding is the proof, and someone without
the payload key can neither make one nor move one. The workflow checks its messages itself
(:func:`firebreak.codec.misplaced`), since only it knows which handler and which run it is in.

Register it on every client that has a codec (:func:`firebreak.temporal.connect` does); workers built
from such a client inherit it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NoReturn

from temporalio import activity, workflow
from temporalio.client import (
    DescribeWorkflowInput,
    OutboundInterceptor,
    QueryWorkflowInput,
    SignalWorkflowInput,
    StartWorkflowInput,
    StartWorkflowUpdateInput,
    WorkflowHandle,
    WorkflowUpdateHandle,
)
from temporalio.client import (
    Interceptor as ClientInterceptor,
)
from temporalio.common import RawValue
from temporalio.converter import PayloadConverter
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ContinueAsNewInput,
    ExecuteActivityInput,
    StartActivityInput,
    StartLocalActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)
from temporalio.worker import (
    Interceptor as WorkerInterceptor,
)

from firebreak.codec import MISPLACED, activity_bindings, bind_request

MISPLACED_PAYLOAD = "MisplacedPayload"  # the failure type of an activity refused for its binding


def _marked(converter: PayloadConverter, args: Sequence[Any], to: str, run: str = "") -> list[Any]:
    marked = []
    for arg in args:
        payload = arg.payload if isinstance(arg, RawValue) else converter.to_payloads([arg])[0]
        marked.append(RawValue(bind_request(payload, to, run)))
    return marked


class PayloadBinding(ClientInterceptor, WorkerInterceptor):
    """Client and worker interceptor: binding requests on the way out, the run check on activities."""

    def __init__(self, payload_converter: PayloadConverter | None = None) -> None:
        if payload_converter is None:
            from firebreak.temporal import DATA_CONVERTER

            payload_converter = DATA_CONVERTER.payload_converter
        self.payload_converter = payload_converter

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        return _ClientOutbound(next, self.payload_converter)

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> type[WorkflowInboundInterceptor]:
        return _WorkflowInbound

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityInbound(next)


class _ClientOutbound(OutboundInterceptor):
    def __init__(self, next: OutboundInterceptor, converter: PayloadConverter) -> None:
        super().__init__(next)
        self._converter = converter

    async def start_workflow(self, input: StartWorkflowInput) -> WorkflowHandle[Any, Any]:
        # A start cannot know its run; the signal of a signal-with-start joins whichever run is open.
        changes: dict[str, Any] = {"args": _marked(self._converter, input.args, f"start:{input.workflow}")}
        if input.start_signal:
            changes["start_signal_args"] = _marked(self._converter, input.start_signal_args,
                                                   f"signal:{input.start_signal}")
        return await super().start_workflow(dataclasses.replace(input, **changes))

    async def signal_workflow(self, input: SignalWorkflowInput) -> None:
        if input.args:
            run = input.run_id or await self._open_run(input.id)
            input = dataclasses.replace(input, args=_marked(self._converter, input.args, f"signal:{input.signal}", run))
        await super().signal_workflow(input)

    async def start_workflow_update(self, input: StartWorkflowUpdateInput) -> WorkflowUpdateHandle[Any]:
        if input.args:
            run = input.run_id or await self._open_run(input.id)
            input = dataclasses.replace(input, args=_marked(self._converter, input.args, f"update:{input.update}", run))
        return await super().start_workflow_update(input)

    async def query_workflow(self, input: QueryWorkflowInput) -> Any:
        if input.args:  # a query changes nothing; its arguments are bound to its name (and run, if named)
            input = dataclasses.replace(
                input, args=_marked(self._converter, input.args, f"query:{input.query}", input.run_id or ""))
        return await super().query_workflow(input)

    async def _open_run(self, workflow_id: str) -> str:
        # The run the message is made for: the one open now. If it continues as new before the message
        # lands, the next run accepts it (it knows the run it continued from); any other run refuses it.
        description = await self.next.describe_workflow(
            DescribeWorkflowInput(id=workflow_id, run_id=None, rpc_metadata={}, rpc_timeout=None))
        return description.run_id


class _WorkflowInbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_WorkflowOutbound(outbound))


class _WorkflowOutbound(WorkflowOutboundInterceptor):
    def start_activity(self, input: StartActivityInput) -> workflow.ActivityHandle[Any]:
        args = _marked(workflow.payload_converter(), input.args, f"activity:{input.activity}", workflow.info().run_id)
        return super().start_activity(dataclasses.replace(input, args=args))

    def start_local_activity(self, input: StartLocalActivityInput) -> workflow.ActivityHandle[Any]:
        args = _marked(workflow.payload_converter(), input.args, f"activity:{input.activity}", workflow.info().run_id)
        return super().start_local_activity(dataclasses.replace(input, args=args))

    def continue_as_new(self, input: ContinueAsNewInput) -> NoReturn:
        name = input.workflow if isinstance(input.workflow, str) else workflow.info().workflow_type
        args = _marked(workflow.payload_converter(), input.args, f"continue:{name}", workflow.info().run_id)
        super().continue_as_new(dataclasses.replace(input, args=args))


class _ActivityInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        bindings = activity_bindings()
        if input.args and not bindings:
            # The codec notes what it checked; arguments it did not check are not run, whatever the reason.
            raise ApplicationError(f"{MISPLACED}: the arguments' binding was not checked; refusing to run the activity",
                                   type=MISPLACED_PAYLOAD, non_retryable=True)
        for binding in bindings:
            if binding.run != (info.workflow_run_id or ""):
                raise ApplicationError(
                    f"{MISPLACED}: made for run {binding.run or '(none)'}, not {info.workflow_run_id}; "
                    "refusing to run the activity", type=MISPLACED_PAYLOAD, non_retryable=True)
        return await super().execute_activity(input)
