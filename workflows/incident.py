"""IncidentWorkflow: one durable workflow per incident. Orchestration only.

investigating -> diagnosing -> proposing -> awaiting_approval -> executing
-> verifying -> resolved, with the exits auto_resolved, rejected, expired,
rolled_back, rollback_failed and failed. Every side effect is an activity;
every decision here is deterministic and visible in history.

Every ending is chosen here, never by a sink or a check: a ticket or
notification that cannot be sent is a recorded gap; a verification that cannot
run follows the runbook's ``on_unverified``; the broker's kill switch holds the
incident until a thaw; a plan that no longer fits the world is proposed anew.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from activities.approvals import ApprovalActivities
    from activities.diagnose import diagnose
    from activities.execute import ExecuteActivities
    from activities.investigate import InvestigateActivities
    from activities.credentials import FROZEN, BrokerActivities, RunClosedReport
    from activities.notify import NotifyActivities
    from activities.observe import ObserveActivities
    from activities.tickets import TicketActivities
    from activities.verify import VerifyActivities
    from firebreak import policy
    from firebreak.codec import MessageBinding, misplaced, unauthenticated_reason, unbind
    from firebreak.incidents import MEMO_KEY, WAITING_KEY, memo_status
    from firebreak.contracts import (
        Alert,
        AlertSignal,
        Approval,
        CarriedState,
        ReceivedApproval,
        ApprovalArrival,
        ApprovalCheck,
        ApprovalOutcome,
        ApprovalRecord,
        DiagnoseRequest,
        Diagnosis,
        Evidence,
        ExecuteRequest,
        APPROVAL_REFUSED,
        NEEDS_A_HUMAN,
        NEEDS_A_HUMAN_FAILURE,
        IncidentInput,
        IncidentReport,
        IncidentStatus,
        InvestigateRequest,
        Notification,
        ObserveRequest,
        Phase,
        Plan,
        PlanStep,
        Receipt,
        StepResult,
        Ticket,
        TicketRequest,
        VerifyRequest,
        VerifyResult,
    )
    from activities.investigate import evidence_id
    from firebreak.correlation import correlation_lines, impact_of, owner_to_escalate
    from firebreak.diagnosis import dependencies, indecision
    from firebreak.plan import build_plan, over_caps, undo_params
    from firebreak.runbook import Investigation, cannot_run, parse_duration
    from firebreak.temporal import PHASE, RUNBOOK, SERVICE, SEVERITY
    from workflows.summary import plan_markdown, status_markdown, waiting_for

QUICK = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10), maximum_attempts=3)
# Budgets, not attempt counts: an outage shorter than the budget delays the work, it does not fail it.
# Refusals (no approval, bad scope, bad input) are raised non-retryable by the activities.
PATIENT = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                      maximum_interval=timedelta(seconds=15))
SINK_BUDGET = timedelta(minutes=5)  # a ticket or notification that cannot go by then is a recorded gap
INVESTIGATION_BUDGET = timedelta(minutes=1)  # a source down longer than this is a gap in the evidence
APPROVAL_CHECK_BUDGET = timedelta(minutes=1)  # a broker down longer than this refuses the approval, with why
# Writes are idempotent at the target (the token binds the idempotency key), so a retry never acts twice.
WRITE = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                    maximum_interval=timedelta(seconds=5))
HOLD_POLL = timedelta(seconds=15)  # how often a held incident asks again whether the broker thawed
MAX_PROPOSALS = 3  # a plan that keeps going stale is a human's job
MIN_TOP_SCORE = 0.5
MAX_DEPENDENCIES = 8  # per-dependency reads: 4 each; a catalog listing dozens is a human's to read
# What incidents started before lifecycle v2 ran with: kept so that they replay as they ran.
_LEGACY_PATIENT = RetryPolicy(initial_interval=timedelta(seconds=2), maximum_interval=timedelta(minutes=1),
                              maximum_attempts=8)
_LEGACY_WRITE = RetryPolicy(initial_interval=timedelta(seconds=2), maximum_interval=timedelta(seconds=20),
                            maximum_attempts=3)
T = TypeVar("T")
# Each message, input and activity is bound to its workflow, run and handler (firebreak/codec.py,
# firebreak/binding.py): runs started before this patch read their payloads as recorded.
PAYLOAD_BINDING = "payload-binding"
# A requester named in a signal counts only with a receipt of theirs (for this incident) in that signal.
SIGNAL_REQUESTER_RECEIPT = "signal-requester-receipt"


def _refusal(incident: Any) -> str | None:
    """Why an incident input cannot be trusted or read, or None."""
    unauthenticated = unauthenticated_reason(incident)
    if unauthenticated is not None:
        return unauthenticated
    try:
        IncidentInput.model_validate(incident)
    except ValidationError as exc:
        first = exc.errors()[0]
        return f"not an incident input: {'.'.join(str(p) for p in first['loc']) or '(input)'}: {first['msg']}"
    return None



# Temporal warns of a memo over 2 KB (the SDK's TMPRL1103, the server's limit.memoSize.warn): the memo
# keeps what is read without a worker (the plan, what it still needs, the ending) within this many bytes
# of JSON, leaving room for the payload's metadata and a codec's envelope.
MEMO_BUDGET = 1700
# What the memo gives up first when it must: the detail the status query and the ticket keep in full.
_MEMO_SHEDS: tuple[tuple[str, str, Callable[[dict[str, Any]], Any]], ...] = (
    ("hypotheses", "findings", lambda m: [{**h, "findings": []} for h in m["hypotheses"]]),
    ("approvals", "approvals", lambda m: []),
    ("refused_signals", "notes", lambda m: []),
    ("reproposals", "notes", lambda m: []),
    ("sink_gaps", "notes", lambda m: []),
    ("gaps", "notes", lambda m: []),  # (the note saying what was shed stays)
    ("steps", "step results", lambda m: []),
    ("hypotheses", "hypotheses", lambda m: []),
    # Last, and only once closed: while it waits, `firebreak approve` without a worker shows this plan and
    # signs its hash, so it stays whole even over the budget (the warning is then the price of that).
    ("plan", "the plan", lambda m: None if m["phase"] in _CLOSED_PHASES else m["plan"]),
)
_CLOSED_PHASES = frozenset(phase.value for phase in Phase if phase.closed)


def bounded_memo(status: IncidentStatus) -> dict[str, Any]:
    """The status for the memo, within MEMO_BUDGET when the plan allows: detail is shed in a fixed order,
    and what was shed is named in the memo's gaps (a reader without a worker is told, never misled)."""
    memo = memo_status(status)
    gaps: list[str] = list(memo["gaps"])
    shed: list[str] = []
    for field, name, shrink in _MEMO_SHEDS:
        if _json_size(memo) <= MEMO_BUDGET:
            break
        if field == "gaps":
            if not gaps:
                continue
            gaps = []
        elif memo.get(field) and shrink(memo) != memo[field]:
            memo[field] = shrink(memo)
        else:
            continue
        if name not in shed:
            shed.append(name)
        memo["gaps"] = [*gaps, _shed_note(shed)]
    return memo


def _shed_note(shed: list[str]) -> str:
    return (f"the memo leaves out {', '.join(shed)} (Temporal's 2 KB memo limit); "
            "the status with a worker and the ticket have them")


def _json_size(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":")).encode())  # as the SDK's JSON payloads are written


class _Ending(ApplicationError):
    """A chosen ending shown as Failed: its message is the reason, with no stack trace beside it.

    The SDK's failure converter writes ``__traceback__`` into the failure as its stack trace, which the UI
    shows under the message; this ending is no crash, so it has none (raising still records one, unread).
    """

    @property  # type: ignore[override]
    def __traceback__(self) -> None:
        return None

    @__traceback__.setter
    def __traceback__(self, _tb: object) -> None:
        pass


@workflow.defn
class IncidentWorkflow:
    @workflow.init
    def __init__(self, incident: Any) -> None:
        # Typed Any and validated here, so that an input this worker must refuse (unauthenticated,
        # moved from elsewhere, or not an IncidentInput) fails the run with its reason instead of wedging
        # its first task.
        incident, bound = unbind(incident)
        self.binds = workflow.patched(PAYLOAD_BINDING)
        self.refused_input = _refusal(incident) or self._input_misplaced(bound)
        self.incident = IncidentInput.model_validate(incident) if self.refused_input is None else None
        # Whoever raised the incident may not approve it, even if an alert system opened it first.
        self.requested_by = self.incident.requested_by if self.incident else None
        self.receipts: list[Receipt] = list(self.incident.receipts) if self.incident else []
        self.plan_receipts: list[Receipt] = []
        self.phase = Phase.investigating
        self.alerts_received = 0
        self.firing: dict[str, Alert] = {}
        self.opened_at = workflow.now()
        self.started_at = None
        self.severity = ""
        self.plan: Plan | None = None
        self.diagnosis: Diagnosis | None = None
        self.evidence: list = []
        self.received: list[tuple[Approval, ApprovalCheck]] = []
        self.records: list[ApprovalRecord] = []
        self.verdict: policy.PolicyResult | None = None
        self.escalates_at = None
        self.expires_at = None
        self.escalated = False
        self.steps: list[StepResult] = []
        self.tickets: list[Ticket] = []
        self.outcome = ""
        self.closed_at = None
        self.refused_signals: list[str] = []
        self.sink_gaps: list[str] = []
        self.held: str | None = None
        self.reproposals: list[str] = []
        self.reinvestigated: str | None = None
        self.background: list[asyncio.Future[None]] = []
        self.runs = 1
        if self.incident is not None and self.incident.carried is not None:
            self._restore(self.incident.carried)
        self.v2 = False  # set in run(): False only when replaying an incident started before lifecycle v2
        self.console = False  # set in run(): the operator's console (endings as Failed, refusals as failed updates)
        self.correlation = False  # set in run(): the catalog walk and per-dependency evidence
        self.unfixed_escalates = False  # set in run(): a rollback with the alert still firing needs a human
        self.needs_a_human = False  # an ending that needs a human although its phase alone does not say so
        self.waiting_shown = ""
        self.approval_lock = asyncio.Lock()
        self.in_time = False  # set in run(): an approval is judged by when it arrived, not when a worker took it
        self.unjudged = 0  # approvals received and not yet judged: the expiry decision waits for them
        # The preconditions re-read, started beside the check of an approval that may decide the plan.
        self.precheck: asyncio.Future[dict[str, dict[str, Any]] | str] | None = None

    # -- messages -------------------------------------------------------------

    def _input_misplaced(self, bound: MessageBinding | None) -> str | None:
        """Why this run's input was not made to start it (or to continue the run before it), or None."""
        if not self.binds:
            return None
        info = workflow.info()
        if info.continued_run_id:
            return misplaced(bound, to=f"continue:{info.workflow_type}", runs={info.continued_run_id})
        # A start cannot know its run: it is bound to this workflow id and to being a start.
        return misplaced(bound, to=f"start:{info.workflow_type}", runs=(), any_run=True)

    def _misplaced(self, bound: MessageBinding | None, to: str, *, any_run: bool = False) -> str | None:
        """Why a message was not made for this handler of this run (or the run it continued), or None."""
        if not self.binds:
            return None
        info = workflow.info()
        runs = {info.run_id} | ({info.continued_run_id} if info.continued_run_id else set())
        return misplaced(bound, to=to, runs=runs, any_run=any_run)

    @workflow.signal
    def alert(self, payload: Any) -> None:
        """A new, repeated or resolved alert for this incident.

        Typed as Any so that a payload this code cannot read is recorded, not
        dropped by the SDK: no alert disappears silently.
        """
        signal = self._read_signal("alert", payload)
        if signal is not None:
            self._apply_alerts(signal)

    def _read_signal(self, name: str, payload: Any) -> AlertSignal | None:
        payload, bound = unbind(payload)
        unauthenticated = unauthenticated_reason(payload)
        if unauthenticated is not None:
            self.refused_signals.append(f"{name} signal refused: {unauthenticated}")
            return None
        # An alert may come with a signal-with-start, which joins whichever run is open: any run of this id.
        moved = self._misplaced(bound, f"signal:{name}", any_run=name == "alert")
        if moved is not None:
            self.refused_signals.append(f"{name} signal refused: {moved}")
            return None
        try:
            return AlertSignal.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(payload)"
            self.refused_signals.append(f"{name} signal refused: {where}: {first['msg']}")
            return None

    def _apply_alerts(self, signal: AlertSignal) -> None:
        named = signal.requested_by
        if named and workflow.patched(SIGNAL_REQUESTER_RECEIPT):
            receipt = signal.receipt
            # The receipt the person signed for this incident (the broker verifies its signature at mint).
            if receipt is None or receipt.requested_by != named or receipt.signer != named \
                    or receipt.incident_id != workflow.info().workflow_id:
                self.refused_signals.append(
                    f"alert signal: requester {named[:64]!r} not counted: the signal carries no receipt of theirs")
                named = None
        self.requested_by = self.requested_by or named
        # One receipt per requester is enough: a repeated delivery must not grow the history.
        receipt = signal.receipt
        if receipt is not None and all(r.requested_by != receipt.requested_by for r in self.receipts):
            self.receipts.append(receipt)
        for alert in signal.alerts:
            self.alerts_received += 1
            if alert.status == "firing":
                self.firing[alert.fingerprint] = alert
                self.severity = self.severity or alert.labels.get("severity", "")
                if self.started_at is None or (alert.starts_at and alert.starts_at < self.started_at):
                    self.started_at = alert.starts_at
            else:
                self.firing.pop(alert.fingerprint, None)

    @workflow.signal
    def resolve(self, payload: Any) -> None:
        """The incident system says these alerts are resolved, whatever their status field says."""
        signal = self._read_signal("resolve", payload)
        if signal is None:
            return
        self._apply_alerts(AlertSignal(
            alerts=[a.model_copy(update={"status": "resolved"}) for a in signal.alerts],
            received_at=signal.received_at,
            delivery_id=signal.delivery_id,
            requested_by=signal.requested_by,
            receipt=signal.receipt if signal.requested_by and workflow.patched(SIGNAL_REQUESTER_RECEIPT) else None,
        ))

    @workflow.signal
    async def approval(self, payload: Any) -> None:
        """Recorded in history always; a malformed, unsigned or misplaced one is recorded as refused."""
        payload, bound = unbind(payload)
        await self._receive_approval(payload, via="signal", moved=self._misplaced(bound, "signal:approval"))

    @workflow.update
    async def submit_approval(self, approval: Any) -> ApprovalOutcome:
        """Answers at once whether the approval counted, and why not.

        A refused approval fails the update (its outcome in the failure's details), so that the UI shows
        it as failed with the reason, not as "Outcome Success". It is recorded all the same.
        Typed Any: a bound message arrives in its envelope (firebreak.codec.unbind); the validator has
        refused anything that is not a signed Approval made for this update of this run.
        """
        payload, _ = unbind(approval)
        checked = Approval.model_validate(payload)
        outcome = await self._receive_approval(checked.model_dump(mode="json"), via="update")
        if self.console and not outcome.counted:
            raise ApplicationError(f"refused: {outcome.reason}", outcome, type=APPROVAL_REFUSED, non_retryable=True)
        return outcome

    @submit_approval.validator
    def _validate_submit(self, approval: Any) -> None:
        # Refused here, an update never enters history: as the typed argument did before payload binding.
        payload, bound = unbind(approval)
        refused = unauthenticated_reason(payload) or self._misplaced(bound, "update:submit_approval")
        if refused is not None:
            raise ValueError(refused)
        try:
            checked = Approval.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"malformed approval: {'.'.join(str(p) for p in first['loc']) or '(payload)'}: "
                             f"{first['msg']}") from None
        if not checked.signature:
            raise ValueError("approval is not signed")

    @workflow.query
    def status(self) -> IncidentStatus:
        if self.incident is None:
            return IncidentStatus(
                incident_id=workflow.info().workflow_id, phase=Phase.failed, runbook="", runbook_version=0,
                opened_at=self.opened_at, alerts_received=self.alerts_received,
                refused_signals=self.refused_signals, outcome=f"refused to open: {self.refused_input}",
            )
        return IncidentStatus(
            incident_id=self.incident.incident_id,
            phase=self.phase,
            runbook=self.incident.runbook.name,
            runbook_version=self.incident.runbook.version,
            service=self.incident.params.get("service", ""),
            severity=self.severity,
            requested_by=self.requested_by,
            opened_at=self.opened_at,
            alerts_received=self.alerts_received,
            firing=sorted(self.firing),
            evidence=self.evidence,
            hypotheses=self.diagnosis.hypotheses if self.diagnosis else [],
            gaps=self.diagnosis.gaps if self.diagnosis else [],
            plan=self.plan,
            plan_hash=self.plan.hash if self.plan else None,
            approvals=self.records,
            needed=self.verdict.needs if self.verdict else [],
            escalates_at=self.escalates_at,
            expires_at=self.expires_at,
            escalated=self.escalated,
            steps=self.steps,
            tickets=self.tickets,
            refused_signals=self.refused_signals,
            sink_gaps=self.sink_gaps,
            held=self.held,
            reproposals=self.reproposals,
            reinvestigated=self.reinvestigated,
            closed_at=self.closed_at,
            outcome=self.outcome,
            needs_a_human=self.needs_a_human,
        )

    # -- the run --------------------------------------------------------------

    @workflow.run
    async def run(self, _input: Any) -> IncidentReport:
        if self.refused_input is not None:
            # Nothing runs for an input this worker cannot trust: no activity, no ticket.
            raise ApplicationError(f"refused to open an incident: {self.refused_input}", type="InputRefused",
                                   non_retryable=True)
        # One marker for everything lifecycle v2 adds to the commands (observations, escalations on
        # failure): incidents started before it replay exactly as they ran.
        self.v2 = workflow.patched("lifecycle-v2")
        # Endings that need a human fail the run, refusals fail their update, the memo says what the
        # incident waits for: incidents started before the console replay as they ran.
        self.console = self.v2 and workflow.patched("operator-console")
        # Correlation across services: the catalog walk, per-dependency evidence, computed blast radius,
        # escalation to the owner the evidence points at. Incidents started before it replay as they ran.
        self.correlation = self.console and workflow.patched("correlation")
        # An approval that arrived before the approval deadline counts whenever a worker judges it (its arrival
        # told by the API's signed receipt, the broker's first sight or its signal's time in history); the
        # expiry waits for it.
        self.in_time = self.v2 and workflow.patched("approval-in-time")
        if self.in_time and self.plan is not None and self.received:
            self.verdict = self._evaluate()  # carried from a run before: re-judged against the deadline
        # A rollback that leaves the alert firing did not fix the incident: it ends needing a human (escalated
        # with the evidence, a Failed run), not green. Incidents started before it replay as they ran.
        self.unfixed_escalates = self.console and workflow.patched("rolled-back-while-firing-needs-a-human")
        incident = self.incident
        runbook = incident.runbook
        # Signal-with-start delivers the alert with the first task; wait in case it came apart.
        try:
            await workflow.wait_condition(lambda: self.alerts_received > 0, timeout=timedelta(minutes=5),
                                          timeout_summary="wait for the first alert")
        except asyncio.TimeoutError:
            return await self._close(Phase.failed, "started without any alert that could be read")
        workflow.upsert_search_attributes([
            RUNBOOK.value_set(runbook.name),
            SERVICE.value_set(incident.params.get("service", "")),
            SEVERITY.value_set(self.severity or "none"),
        ])
        while True:
            # An incident that continued as new arrives with its plan: straight back to waiting.
            outcome = await self._propose() if self.plan is None else None
            if outcome is None:
                outcome = await self._await_approval()
            if outcome is not None:
                return outcome
            stale = await self._plan_no_longer_fits() if self.v2 else None
            if isinstance(stale, IncidentReport):
                return stale
            if stale is None:
                return await self._execute_and_verify()
            if len(self.reproposals) + 1 >= MAX_PROPOSALS:
                return await self._close(Phase.failed, f"the plan went stale {MAX_PROPOSALS} times; last: {stale}")
            # Nothing ran: withdraw the plan (its approvals no longer apply) and propose anew.
            self.reproposals.append(stale)
            self.plan, self.verdict, self.received = None, None, []
            self.escalates_at = self.expires_at = None
            self.escalated = False

    async def _propose(self) -> IncidentReport | None:
        """Investigate, diagnose and propose a plan; an ending if there is nothing to propose."""
        incident = self.incident
        runbook = incident.runbook
        await self._enter(Phase.investigating)
        started = self.started_at or self.opened_at
        self.evidence = await self._gather_evidence(started)
        if self._all_resolved():
            return await self._close(Phase.auto_resolved, "the alert cleared during investigation; nothing executed")

        await self._enter(Phase.diagnosing)
        self.diagnosis = await self._diagnose(started)
        why = indecision(self.diagnosis, MIN_TOP_SCORE, runbook.decide.margin) if self.v2 else None
        if why is not None:
            # Too close to call (the alert may have opened the incident while its evidence was still
            # arriving): look once more, after the runbook's delay, before proposing or escalating.
            self.reinvestigated = why
            await workflow.sleep(parse_duration(runbook.decide.reinvestigate_after),
                                 summary=f"re-investigate once: {why}"[:200])
            await self._enter(Phase.investigating)
            self.evidence = await self._gather_evidence(started)
            if self._all_resolved():
                return await self._close(Phase.auto_resolved, "the alert cleared during investigation; nothing executed")
            await self._enter(Phase.diagnosing)
            self.diagnosis = await self._diagnose(started)

        await self._enter(Phase.proposing)
        top = self.diagnosis.hypotheses[0] if self.diagnosis.hypotheses else None
        if top is None or top.score < MIN_TOP_SCORE or not top.actions:
            why = "no hypothesis is supported well enough" if top is None or top.score < MIN_TOP_SCORE else (
                f"the top hypothesis ({top.title}) has no remediation in the runbook's catalog")
            if not self.v2:  # v2: _close escalates every ending that needs a human
                await self._notify("escalation", f"{why}; a human must take this incident")
            return await self._close(Phase.failed, f"escalated to a human: {why}")
        # The plan binds everything the approver is shown: params, requesters, evidence.
        bind_all = workflow.patched("plan-binds-all")
        self.plan_receipts = list(self.receipts)
        # A runbook that reached the worker without passing the load check: never a workflow task that fails
        # and retries forever. (Patched only where such a runbook is met; wedged incidents then end too.)
        build = lambda: build_plan(  # noqa: E731
            runbook, incident.params, top, incident_id=incident.incident_id, run_id=workflow.info().run_id,
            requesters=sorted(self._requesters()), evidence=[f.detail for f in top.findings if f.held],
            bind_all=bind_all,
        )
        unrunnable = cannot_run(runbook)
        if unrunnable is None:
            try:
                self.plan = build()
            except ValueError as exc:
                unrunnable = f"runbook {runbook.name} v{runbook.version}: no plan can be built: {exc}"
        if unrunnable is not None:
            if workflow.patched("runbook-cannot-run"):
                self.plan = None
                why = f"the runbook cannot run: {unrunnable}"
                if not self.v2:  # v2: _close escalates every ending that needs a human
                    await self._notify("escalation", f"{why}; a human must take this incident")
                return await self._close(Phase.failed, f"escalated to a human: {why}")
            self.plan = build()  # a run from before this check: as it ran
        assert self.plan is not None  # top.actions is not empty
        if self.correlation:
            # Shown to the approvers and hashed with the plan: who else is hurt if each step's target misbehaves.
            # Patched: what was not read says so, with why (dependents unknown, traffic not asked or not
            # answered); the radius is hashed with the plan, so earlier incidents replay with the old one.
            truthful = workflow.patched("blast-radius-says-how-it-knows")
            self.plan = self.plan.model_copy(update={"impact": impact_of(self.plan, self.evidence, truthful=truthful)})
        cap = over_caps(self.plan, runbook) if self.v2 else None
        if cap is not None:
            # An unsafe output is never proposed: a human gets the incident, and the cap it broke.
            self.plan = None
            return await self._close(Phase.failed, f"escalated to a human: the plan would break the runbook's {cap}")
        if self.v2:
            observed = await self._observe_all(self.plan)
            if isinstance(observed, str):
                return await self._close(Phase.failed, f"escalated to a human: {observed}")
            if observed:
                self.plan = self.plan.model_copy(update={"observed": observed})
        self.verdict = policy.evaluate(
            self.plan, runbook, [], workflow_id=incident.incident_id, requested_by=self._requesters(),
            now=workflow.now(), deadline=self._deadline(),
        )
        if self.v2:
            # Off the critical path: the approval wait starts now, the ticket follows when it can.
            self.background.append(asyncio.ensure_future(self._ticket("proposed")))
        else:
            await self._ticket("proposed")
        return None

    async def _diagnose(self, started: datetime) -> Diagnosis:
        request = DiagnoseRequest(runbook=self.incident.runbook, evidence=self.evidence, alert_started_at=started)
        # Not a local activity (which would save a round trip): a `workflow.patched` right after a local
        # activity replayed as nondeterministic when its workflow task was split under load.
        return await workflow.execute_activity(
            diagnose,
            request,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=QUICK,
            summary="rank hypotheses from the evidence",
        )

    async def _gather_evidence(self, started: datetime) -> list[Evidence]:
        """The service's own evidence; with correlation, alongside it the catalog walk, then each dependency's."""
        runbook = self.incident.runbook
        own = [s for s in runbook.investigate if s.kind != "catalog" and not s.for_each]
        if not self.correlation:
            return list(await asyncio.gather(*[self._investigate(spec, started) for spec in own]))
        walks = [s for s in runbook.investigate if s.kind == "catalog"]
        per_dependency = [s for s in runbook.investigate if s.for_each]

        async def walk_then_dependencies() -> list[Evidence]:
            walked = [await self._investigate(spec, started) for spec in walks]
            found = dependencies(walked)[:MAX_DEPENDENCIES]
            more = await asyncio.gather(*[self._investigate(spec, started, {spec.for_each: name})
                                          for name in found for spec in per_dependency if spec.for_each])
            return walked + list(more)

        mine, theirs = await asyncio.gather(
            asyncio.gather(*[self._investigate(spec, started) for spec in own]), walk_then_dependencies())
        return list(mine) + theirs

    async def _investigate(self, spec: Investigation, started: datetime,
                           derived: dict[str, str] | None = None) -> Evidence:
        params = {**self.incident.params, **(derived or {})}
        # The pattern every name a catalog walk follows must match: the runbook's derived param's.
        pattern = next((p.pattern for p in self.incident.runbook.params.values() if p.derived), "")
        try:
            return await workflow.execute_activity_method(
                InvestigateActivities.investigate,
                InvestigateRequest(
                    incident_id=self.incident.incident_id, runbook=self.incident.runbook.name, spec=spec,
                    params=params, alert_started_at=started,
                    name_pattern=pattern if spec.kind == "catalog" else "",
                ),
                # v2: a source or broker that is down or restarting delays the read for up to a minute;
                # past that budget it is a gap.
                start_to_close_timeout=timedelta(seconds=15 if self.v2 else 30),
                schedule_to_close_timeout=INVESTIGATION_BUDGET if self.v2 else None,
                retry_policy=PATIENT if self.v2 else QUICK,
                summary=f"investigate {evidence_id(spec, params)}: {spec.title or spec.kind}",
            )
        except ActivityError as exc:
            # An investigation that failed outright is a gap in the evidence, not a failed incident.
            return Evidence(
                id=evidence_id(spec, params), kind=spec.kind, title=spec.title, source=spec.target, query="",
                ok=False, gap=f"{evidence_id(spec, params)}: investigation failed: {_cause(exc)}",
                gathered_at=workflow.now(),
            )

    # -- approval -------------------------------------------------------------

    async def _await_approval(self) -> IncidentReport | None:
        """Wait for a decision; None when the plan is approved (fully, or partially with the rest left out)."""
        windows = self.incident.runbook.remediate.windows
        if self.escalates_at is None or self.expires_at is None:
            self.escalates_at = workflow.now() + parse_duration(windows.escalate_after)
            self.expires_at = workflow.now() + parse_duration(windows.expire_after)
        await self._enter(Phase.awaiting_approval)
        if self.v2:
            # Readable without a worker: an approver can see the plan right after a worker crash.
            workflow.upsert_memo({MEMO_KEY: bounded_memo(self.status())})
        decided = lambda: self._decided() or self._all_resolved() or self._history_long()  # noqa: E731
        while True:
            deadline = self.expires_at if self.escalated else self.escalates_at
            try:
                await workflow.wait_condition(
                    decided, timeout=max(deadline - workflow.now(), timedelta(0)),
                    timeout_summary="expire if not approved" if self.escalated else "escalate if not approved",
                )
            except asyncio.TimeoutError:
                if not self.escalated:
                    self.escalated = True
                    await self._notify("escalation", "no approval within the first window; approval needed")
                    self._set_details()
                    continue
                if not (self.in_time and await self._decided_at_deadline()):
                    if not self.v2:
                        await self._notify("expired", "no approval in time; nothing was executed")
                    return await self._close(Phase.expired, "no approval in time; nothing executed")
            # Let an approval that is being verified finish before acting on the verdict.
            async with self.approval_lock:
                pass
            if self.verdict and self.verdict.rejected:
                return await self._close(Phase.rejected, f"rejected by {self.verdict.rejected_by}; nothing executed")
            if self._decided():
                return None
            if self._all_resolved():
                return await self._close(Phase.auto_resolved, "the alert cleared before approval; nothing executed")
            if self._history_long():
                await self._continue_as_new()
            # The alert cleared and fired again while an approval was being checked: nothing is
            # decided, so keep waiting. Acting here would "resolve" an incident with nothing executed.

    async def _decided_at_deadline(self) -> bool:
        """At the approval deadline: whether the approvals that arrived before it decide the plan.

        The deadline's timer and an approval sent before it can reach a returning worker in one task:
        wait for every approval already received to be judged (each by when it arrived), then decide
        under the judging's lock, so what arrived first wins.
        """
        await workflow.wait_condition(lambda: self.unjudged == 0)
        async with self.approval_lock:
            return self._decided()

    def _deadline(self) -> datetime | None:
        """The approval deadline that approvals are judged against (None for runs before it was)."""
        return self.expires_at if self.in_time else None

    def _evaluate(self) -> policy.PolicyResult:
        assert self.plan is not None
        return policy.evaluate(
            self.plan, self.incident.runbook, self.received, workflow_id=self.incident.incident_id,
            requested_by=self._requesters(), now=workflow.now(), deadline=self._deadline(),
        )

    def _decided(self) -> bool:
        """Rejected, or every step either has its quorum or was left out by a partial approval."""
        if self.verdict is None or self.plan is None:
            return False
        if self.verdict.rejected:
            return True
        if not self.verdict.approved_steps:
            return False
        return all(s.id in self.verdict.approved_steps or self._left_out(s.id) for s in self.plan.steps)

    def _left_out(self, step_id: str) -> str | None:
        """Who approved a subset of the plan without this step."""
        if self.verdict is None:
            return None
        for (approval, _), judgement in zip(self.received, self.verdict.judgements):
            if judgement.counted and approval.decision == "approve" and approval.steps and step_id not in approval.steps:
                return approval.approver
        return None

    async def _receive_approval(self, payload: Any, via: str, moved: str | None = None) -> ApprovalOutcome:
        self.unjudged += 1  # before any await: the expiry decision waits for this one to be judged
        try:
            return await self._judge_approval(payload, via, moved)
        finally:
            self.unjudged -= 1

    async def _judge_approval(self, payload: Any, via: str, moved: str | None = None) -> ApprovalOutcome:
        now = workflow.now()
        # One at a time, in arrival order (asyncio.Lock is FIFO), so records read in the order sent.
        async with self.approval_lock:
            unauthenticated = unauthenticated_reason(payload)
            if unauthenticated is not None:
                return self._record_refusal(payload, via, unauthenticated)
            if moved is not None:
                return self._record_refusal(payload, via, moved)
            try:
                approval = Approval.model_validate(payload)
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"]) or "(payload)"
                return self._record_refusal(payload, via, f"malformed approval: {field}: {first['msg']}")
            if self.phase != Phase.awaiting_approval or self.plan is None:
                return self._record_refusal(payload, via, f"the incident is {self.phase.value}, not awaiting approval")
            if (approval.decision == "approve" and approval.signature and self.v2 and self.plan.observed
                    and self.precheck is None and workflow.patched("precheck-with-approval")):
                # The re-read that must precede the first write, started now beside the approval's check, so the
                # write waits for the slower of the two, not for both in turn. Used only if this approval decides.
                self.precheck = asyncio.ensure_future(self._observe_all(self.plan))
                self.background.append(self.precheck)  # a close or continue-as-new lets it finish first
            if not approval.signature:
                check = ApprovalCheck(valid=False, reason="unsigned: approvals must be signed with the approver's key")
            else:
                try:
                    check = await workflow.execute_activity_method(
                        ApprovalActivities.verify_approval,
                        # The API's signed arrival receipt, if it sent this as a signal: checked by the activity.
                        # Past the deadline it also asks Temporal's history when the signal was recorded.
                        args=[approval, _arrival(payload), self.expires_at] if self.in_time else [approval],
                        start_to_close_timeout=timedelta(seconds=15),
                        # v2: an approval that arrives while the broker restarts waits for it.
                        schedule_to_close_timeout=APPROVAL_CHECK_BUDGET if self.v2 else None,
                        retry_policy=PATIENT if self.v2 else QUICK,
                        summary=f"verify {approval.decision} signature of {approval.approver}",
                    )
                except ActivityError as exc:
                    # A check that could not run is a refusal with its reason, never a failed incident.
                    check = ApprovalCheck(valid=False, reason=f"the approval could not be checked: {_cause(exc)}")
            if self.in_time:
                # When it arrived: the earliest of what the API signed, the broker first saw, and this task's
                # time (the server's: an update a live worker takes at once). Never later than this task.
                check = check.model_copy(update={"arrived_at": min(now, check.arrived_at or now)})
            self.received.append((approval, check))
            self.verdict = self._evaluate() if self.in_time else policy.evaluate(
                self.plan, self.incident.runbook, self.received, workflow_id=self.incident.incident_id,
                requested_by=self._requesters(), now=workflow.now(),
            )
            judgement = self.verdict.judgements[-1]
            if not self._decided():
                self.precheck = None  # read too early for a decision still to come: the next approval reads again
            self.records.append(ApprovalRecord(
                approver=approval.approver, decision=approval.decision, counted=judgement.counted,
                reason=judgement.reason, steps=approval.steps, plan_hash=approval.plan_hash,
                comment=approval.comment, via=via,  # type: ignore[arg-type]
                received_at=check.arrived_at if self.in_time and check.arrived_at else now,
            ))
            self._set_details()
            if self.console:
                # Who approved, and what each step still needs, readable without a worker (list, inbox).
                workflow.upsert_memo({MEMO_KEY: bounded_memo(self.status())})
            waiting = [f"{n.step}: {n.approvers - len(n.approved_by)} more from {', '.join(n.groups)}"
                       for n in self.verdict.needs if not n.met and not self._left_out(n.step)]
            return ApprovalOutcome(counted=judgement.counted, reason=judgement.reason, phase=self.phase,
                                   decided=self._decided(), waiting_for=waiting, held=check.held)

    def _record_refusal(self, payload: Any, via: str, reason: str) -> ApprovalOutcome:
        approver = payload.get("approver") if isinstance(payload, dict) else None
        decision = payload.get("decision") if isinstance(payload, dict) else None
        self.records.append(ApprovalRecord(
            approver=str(approver or "(unknown)")[:64], decision=str(decision or "(none)")[:16], counted=False,
            reason=reason, received_at=workflow.now(), via=via,  # type: ignore[arg-type]
        ))
        self._set_details()
        return ApprovalOutcome(counted=False, reason=reason, phase=self.phase)

    # -- execution ------------------------------------------------------------

    def _counted_approvals(self) -> list[Approval]:
        assert self.verdict is not None
        return [
            approval for (approval, _), judgement in zip(self.received, self.verdict.judgements)
            if judgement.counted and approval.decision == "approve"
        ]

    async def _execute_and_verify(self) -> IncidentReport:
        assert self.plan is not None and self.verdict is not None
        await self._enter(Phase.executing)
        approvals = self._counted_approvals()
        done: list[tuple[PlanStep, StepResult]] = []
        for step in self.plan.steps:
            if step.id not in self.verdict.approved_steps:
                who = self._left_out(step.id)
                self.steps.append(StepResult(
                    step_id=step.id, action=step.action, status="skipped",
                    detail=f"not approved ({who} approved only other steps)" if who else "not approved",
                ))
                continue
            result = await self._run_step(step, approvals)
            self.steps.append(result)
            if result.status != "succeeded":
                return await self._roll_back(done, approvals, f"step {step.id} ({step.action}) failed: {result.detail}")
            done.append((step, result))
        if not done:
            # Never "resolved" with nothing executed.
            return await self._close(Phase.failed, "no approved step ran; nothing executed")

        await self._enter(Phase.verifying)
        for index, (step, result) in enumerate(done):
            if step.verify is None:
                result.verified, result.verification = None, "no verification declared"
                continue
            try:
                check = await self._verify(step)
            except ActivityError as exc:
                if not self.v2:
                    raise
                why = f"step {step.id} could not be verified: {_cause(exc)}"
                result.verified, result.verification = None, why
                if self.incident.runbook.remediate.on_unverified == "escalate":
                    return await self._close(Phase.failed, f"{why}; left in place and escalated (runbook policy)")
                # Rolled back by policy, but a human should know a check could not run: told now, or (patched)
                # once, by the ending, after the rollback, with whether the alert still fires.
                if not self.unfixed_escalates:
                    await self._notify("escalation", f"{why}; rolling it back (runbook policy)")
                return await self._roll_back(done[: index + 1], approvals, f"{why}; rolled back (runbook policy)",
                                             tell_a_human=True)
            result.verified, result.verification = check.held, check.detail
            if not check.held:
                return await self._roll_back(done[: index + 1], approvals, f"step {step.id} did not help ({check.detail})")
        return await self._close(Phase.resolved, "remediation applied and verified")

    async def _verify(self, step: PlanStep) -> VerifyResult:
        assert step.verify is not None
        check = step.verify
        return await self._holding(lambda: workflow.execute_activity_method(
            VerifyActivities.verify_step,
            VerifyRequest(
                incident_id=self.incident.incident_id, runbook=self.incident.runbook.name,
                params=self.incident.params, step_id=step.id, check=check,
            ),
            start_to_close_timeout=timedelta(seconds=check.within_s + 60),
            # A broker or Prometheus outage delays verification; only a longer one makes it "could not verify".
            schedule_to_close_timeout=timedelta(seconds=check.within_s + 180) if self.v2 else None,
            heartbeat_timeout=timedelta(seconds=max(30, check.interval_s * 3)),
            retry_policy=PATIENT if self.v2 else QUICK,
            summary=f"verify {step.id}: {check.test} {check.threshold} within {check.within_s:.0f}s",
        ))

    async def _roll_back(self, done: list[tuple[PlanStep, StepResult]], approvals: list[Approval],
                         why: str, *, tell_a_human: bool = False) -> IncidentReport:
        """Undo what ran; the ending says truthfully whether every undo succeeded, and whether the alert still fires.

        ``tell_a_human``: a human must hear of this rollback even if the alert cleared (a check could not run).
        """
        if not done:
            return await self._close(Phase.failed, f"{why}; nothing had run, nothing to roll back")
        not_undone = await self._undo_all(done, approvals)
        if not_undone and self.v2:
            return await self._close(Phase.rollback_failed,
                                     f"{why}; rollback failed for {', '.join(not_undone)}: a human must restore it")
        if self.unfixed_escalates:
            if not self._all_resolved():
                # The remediation did not fix the incident: the service is still broken, so a human takes it.
                return await self._close(Phase.rolled_back, f"{why}; rolled back, and the alert still fires: "
                                         "the incident is not fixed, escalated to a human", needs_a_human=True)
            if tell_a_human:
                await self._notify("escalation", f"{why}; rolled back; the alert has cleared")
        return await self._close(Phase.rolled_back, f"{why}; rolled back")

    async def _run_step(self, step: PlanStep, approvals: list[Approval], *, undo: dict | None = None) -> StepResult:
        assert self.plan is not None
        request = ExecuteRequest(
            incident_id=self.incident.incident_id, plan=self.plan, step_id=step.id, approvals=approvals,
            requested_by=self.requested_by, receipts=self.plan_receipts, undo=undo is not None,
            undo_params=undo or {},
        )
        verb = step.undo.verb if undo is not None and step.undo else step.verb
        try:
            return await self._holding(lambda: workflow.execute_activity_method(
                ExecuteActivities.execute_step,
                request,
                # An attempt lost with its worker must leave room to retry: a quarter of the step's timeout
                # per attempt, the whole timeout as the budget (an outage shorter than it delays, never fails).
                start_to_close_timeout=timedelta(seconds=max(5.0, step.timeout_s / 4) if self.v2 else step.timeout_s),
                schedule_to_close_timeout=timedelta(seconds=step.timeout_s) if self.v2 else None,
                retry_policy=WRITE if self.v2 else _LEGACY_WRITE,
                summary=f"{'undo' if undo is not None else 'execute'} {step.id}: {verb} on {step.resource}",
            ))
        except ActivityError as exc:
            return StepResult(step_id=step.id, action=step.action, status="failed", detail=_cause(exc))

    async def _undo_all(self, done: list[tuple[PlanStep, StepResult]], approvals: list[Approval]) -> list[str]:
        """Saga compensation: undo what ran, newest first. Returns the steps left not undone."""
        not_undone: list[str] = []
        for step, result in reversed(done):
            if step.undo is None:
                result.rollback = StepResult(step_id=step.id, action=step.action, status="rollback_failed",
                                             detail="the catalog declares no undo for this action")
                not_undone.append(step.id)
                continue
            try:
                params = undo_params(step, result.response)
            except ValueError as exc:
                result.rollback = StepResult(step_id=step.id, action=step.action, status="rollback_failed",
                                             detail=str(exc))
                not_undone.append(step.id)
                continue
            undone = await self._run_step(step, approvals, undo=params)
            result.rollback = undone
            if undone.status == "succeeded":
                result.status = "rolled_back"
            else:
                not_undone.append(step.id)
        return not_undone

    # -- the world, re-checked -------------------------------------------------

    async def _observe_all(self, plan: Plan) -> dict[str, dict[str, Any]] | str:
        """Each step's target state that its precondition names, or why it could not be read."""
        observed: dict[str, dict[str, Any]] = {}
        for step in plan.steps:
            action = self.incident.runbook.remediate.actions[step.action]
            if action.precondition is None:
                continue
            try:
                observed[step.id] = await self._holding(lambda s=step, f=action.precondition.fields: (
                    workflow.execute_activity_method(
                        ObserveActivities.observe_target,
                        ObserveRequest(incident_id=self.incident.incident_id, runbook=self.incident.runbook.name,
                                       # the plan's params: a step on a dependency reads it by its derived name
                                       params=plan.params if self.correlation and plan.params
                                       else self.incident.params, step=s, fields=f),
                        start_to_close_timeout=timedelta(seconds=15),
                        schedule_to_close_timeout=timedelta(minutes=2),
                        retry_policy=PATIENT,
                        summary=f"observe {s.id}: {', '.join(f)} of {s.resource}",
                    )))
            except ActivityError as exc:
                return f"could not read {step.resource} for step {step.id}'s precondition: {_cause(exc)}"
        return observed

    async def _plan_no_longer_fits(self) -> IncidentReport | str | None:
        """Right before the first write: an ending if the alert cleared, a reason if the plan is stale."""
        assert self.plan is not None
        if self._all_resolved():
            return await self._close(Phase.auto_resolved, "the alert cleared before execution; nothing executed")
        if not self.plan.observed:
            return None
        precheck, self.precheck = self.precheck, None
        now = await precheck if precheck is not None else await self._observe_all(self.plan)
        if isinstance(now, str):
            return await self._close(Phase.failed, f"escalated to a human: {now}; nothing executed")
        for step_id, before in self.plan.observed.items():
            after = now.get(step_id, {})
            changed = [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in before if after.get(k) != before.get(k)]
            if changed:
                return f"step {step_id}'s precondition no longer holds ({', '.join(changed)}); proposed anew"
        return None

    async def _holding(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run an activity; while the broker's kill switch is on, hold (visibly) and ask again."""
        while True:
            try:
                result = await call()
            except ActivityError as exc:
                if not (isinstance(exc.cause, ApplicationError) and exc.cause.type == FROZEN):
                    raise
                self.held = f"held: {exc.cause.message}"
                self._set_details()
                await workflow.sleep(HOLD_POLL, summary=self.held[:200])
                continue
            if self.held is not None:
                self.held = None
                self._set_details()
            return result

    # -- long waits: continue as new ---------------------------------------------

    def _history_long(self) -> bool:
        return self.v2 and workflow.info().is_continue_as_new_suggested()

    async def _continue_as_new(self) -> None:
        """Hand the waiting incident to a fresh run: plan, approvals, evidence and deadlines carried."""
        assert self.plan is not None and self.diagnosis is not None
        assert self.escalates_at is not None and self.expires_at is not None
        await asyncio.gather(*self.background)
        await workflow.wait_condition(workflow.all_handlers_finished)
        carried = CarriedState(
            opened_at=self.opened_at, started_at=self.started_at, severity=self.severity,
            requested_by=self.requested_by, alerts_received=self.alerts_received, firing=self.firing,
            evidence=self.evidence, diagnosis=self.diagnosis, plan=self.plan, plan_receipts=self.plan_receipts,
            received=[ReceivedApproval(approval=a, check=c) for a, c in self.received], records=self.records,
            escalates_at=self.escalates_at, expires_at=self.expires_at, escalated=self.escalated,
            tickets=self.tickets, refused_signals=self.refused_signals, sink_gaps=self.sink_gaps,
            reproposals=self.reproposals, runs=self.runs + 1,
        )
        workflow.continue_as_new(self.incident.model_copy(update={"receipts": self.receipts, "carried": carried}))

    def _restore(self, carried: CarriedState) -> None:
        self.opened_at, self.started_at, self.severity = carried.opened_at, carried.started_at, carried.severity
        self.requested_by = carried.requested_by
        self.alerts_received, self.firing = carried.alerts_received, dict(carried.firing)
        self.evidence, self.diagnosis, self.plan = list(carried.evidence), carried.diagnosis, carried.plan
        self.plan_receipts = list(carried.plan_receipts)
        self.received = [(r.approval, r.check) for r in carried.received]
        self.records = list(carried.records)
        self.escalates_at, self.expires_at, self.escalated = carried.escalates_at, carried.expires_at, carried.escalated
        self.tickets, self.refused_signals = list(carried.tickets), list(carried.refused_signals)
        self.sink_gaps, self.reproposals, self.runs = list(carried.sink_gaps), list(carried.reproposals), carried.runs
        # The verdict is recomputed from the carried approvals, each judged at its recorded arrival.
        self.verdict = policy.evaluate(
            self.plan, self.incident.runbook, self.received, workflow_id=self.incident.incident_id,
            requested_by=self._requesters(), now=workflow.now(),
        )

    # -- bookkeeping ----------------------------------------------------------

    def _requesters(self) -> set[str]:
        """Everyone who raised this incident: none of them may approve it."""
        named = {r.requested_by for r in self.receipts if r.requested_by}
        return named | ({self.requested_by} if self.requested_by else set())

    def _all_resolved(self) -> bool:
        return self.alerts_received > 0 and not self.firing

    async def _enter(self, phase: Phase) -> None:
        self.phase = phase
        workflow.upsert_search_attributes([PHASE.value_set(phase.value)])
        self._set_details()

    def _set_details(self) -> None:
        status = self.status()
        workflow.set_current_details(status_markdown(status))
        if self.console:
            # A few words in the memo, so that `firebreak list` says what each incident waits for.
            waiting = waiting_for(status)
            if waiting != self.waiting_shown:
                self.waiting_shown = waiting
                workflow.upsert_memo({WAITING_KEY: waiting})

    async def _close(self, phase: Phase, outcome: str, *, needs_a_human: bool = False) -> IncidentReport:
        """End the incident; ``needs_a_human`` for an ending whose phase alone does not say a human must take it."""
        self.outcome = outcome
        self.closed_at = workflow.now()
        self.needs_a_human = needs_a_human
        needs_a_human = needs_a_human or phase in NEEDS_A_HUMAN
        await self._enter(phase)
        if self.v2 and needs_a_human:
            await self._notify("expired" if phase == Phase.expired else "escalation", f"{phase.value}: {outcome}")
        await asyncio.gather(*self.background)  # the proposal's ticket lands before the closing one
        if self.v2:
            workflow.upsert_memo({MEMO_KEY: bounded_memo(self.status())})
        await self._ticket("closed")
        if self.plan is not None and workflow.patched("broker-run-closed"):
            await self._report_run_closed(phase)
        await workflow.wait_condition(workflow.all_handlers_finished)
        report = IncidentReport(
            incident_id=self.incident.incident_id, phase=phase, outcome=outcome, status=self.status()
        )
        if self.console and needs_a_human:
            # Failed in Temporal: red in the UI's list, found by ExecutionStatus="Failed"; the report rides along.
            raise _Ending(f"{phase.value}: {outcome}", report, type=NEEDS_A_HUMAN_FAILURE, non_retryable=True)
        return report

    async def _report_run_closed(self, phase: Phase) -> None:
        """Tell the broker this run (and the run its plan names) closed: it mints nothing more for them, so an
        approved plan's write or undo cannot be replayed after the ending. A broker that cannot be told in time
        is a recorded gap; the plan's authorization still ends with its steps' budgets."""
        assert self.plan is not None
        info = workflow.info()
        runs = list(dict.fromkeys([info.run_id, self.plan.run_id]))
        try:
            await workflow.execute_activity_method(
                BrokerActivities.report_run_closed,
                RunClosedReport(workflow_id=info.workflow_id, run_ids=runs, outcome=phase.value),
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=SINK_BUDGET,
                retry_policy=PATIENT,
                summary=f"tell the broker run {info.run_id} closed ({phase.value})",
            )
        except ActivityError as exc:
            self._sink_gap(f"the broker was not told the run closed: {_cause(exc)}")

    async def _ticket(self, event: str) -> None:
        status = self.status()
        ticket = await self._to_sink(
            TicketActivities.file_ticket,
            TicketRequest(
                incident_id=self.incident.incident_id,
                event=event,  # type: ignore[arg-type]
                summary=f"[{status.phase.value}] {self.incident.runbook.name} on {status.service or status.incident_id}",
                run_id=workflow.info().first_execution_run_id if self.console else None,
                body_markdown=plan_markdown(status),
                payload={
                    **status.model_dump(mode="json", exclude={"evidence"}),
                    "evidence_links": [e.link for e in status.evidence if e.link],
                    **({"correlation": correlation_lines(
                        status.hypotheses[0] if status.hypotheses else None, status.service, status.evidence,
                        status.plan)} if self.correlation else {}),
                    "approve_command": f"firebreak approve {self.incident.incident_id} --key PATH",
                },
            ),
            summary=f"ticket: {event}", gap=f"ticket '{event}' not filed",
        )
        if ticket is not None and not any(t.ref == ticket.ref for t in self.tickets):
            self.tickets.append(ticket)

    async def _notify(self, kind: str, summary: str) -> None:
        runbook = self.incident.runbook
        to = runbook.remediate.escalate_to or "on-call"
        if self.correlation and kind != "closed":
            # The evidence points at a dependency: its owning team (from the catalog) takes the escalation.
            top = self.diagnosis.hypotheses[0] if self.diagnosis and self.diagnosis.hypotheses else None
            to = owner_to_escalate(top, self.incident.params.get("service", ""), self.evidence) or to
        await self._to_sink(
            NotifyActivities.notify,
            Notification(
                incident_id=self.incident.incident_id,
                kind=kind,  # type: ignore[arg-type]
                to=to,
                summary=f"{runbook.name} on {self.incident.params.get('service', '')}: {summary}",
                approve_command=f"firebreak approve {self.incident.incident_id} --key PATH",
                evidence=self._evidence_lines() if self.v2 else [],
            ),
            summary=f"notify {to}: {kind}", gap=f"{kind} notification to {to} not sent",
        )

    async def _to_sink(self, method: Callable[..., Awaitable[T]], arg: Any, *, summary: str, gap: str) -> T | None:
        """A ticket or a notification: within its budget, or a recorded gap, never the incident's fate."""
        try:
            return await workflow.execute_activity_method(
                method, arg,
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=SINK_BUDGET if self.v2 else None,
                retry_policy=PATIENT if self.v2 else _LEGACY_PATIENT,
                summary=summary,
            )
        except ActivityError as exc:
            if not self.v2:
                raise
            self._sink_gap(f"{gap}: {_cause(exc)}")
            return None

    def _evidence_lines(self) -> list[str]:
        """The top hypothesis's findings, the investigation's gaps and each step's result, briefly."""
        lines: list[str] = []
        if self.diagnosis and self.diagnosis.hypotheses:
            top = self.diagnosis.hypotheses[0]
            lines.append(f"top hypothesis: {top.title} ({top.score:.0%})")
            lines += [f"{'held' if f.held else 'not held'}: {f.detail}" for f in top.findings]
            lines += [f"gap: {g}" for g in self.diagnosis.gaps]
            if self.correlation:
                lines += correlation_lines(top, self.incident.params.get("service", ""), self.evidence, self.plan)
        lines += [f"step {r.step_id} {r.status}: {r.detail}"
                  + (f"; rollback {r.rollback.status}: {r.rollback.detail}" if r.rollback else "") for r in self.steps]
        return [line[:500] for line in lines[:30]]

    def _sink_gap(self, gap: str) -> None:
        """A sink that failed is a gap on the record, never the incident's fate."""
        self.sink_gaps.append(gap)
        self._set_details()


def _arrival(payload: Any) -> ApprovalArrival | None:
    """The API's arrival receipt beside an approval signal, if it carries a readable one (else none)."""
    try:
        return ApprovalArrival.model_validate(payload["arrival"]) if isinstance(payload, dict) and payload.get(
            "arrival") is not None else None
    except ValidationError:
        return None  # unreadable: judged as arriving when the broker first saw it


def _cause(exc: ActivityError) -> str:
    """Why an activity failed; a budget that ran out also says what its last attempt ran into."""
    reasons: list[str] = []
    cause: BaseException | None = exc.cause or exc
    while cause is not None:
        reasons.append(cause.message if isinstance(cause, ApplicationError) else str(cause))
        cause = cause.__cause__
    return ": ".join(r for r in dict.fromkeys(reasons) if r)
