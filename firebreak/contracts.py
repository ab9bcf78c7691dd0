"""Pydantic models shared by the workflow, the activities and the services.

These are the contracts: every payload that crosses a Temporal boundary or an
HTTP boundary is one of these, validated where it enters.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from firebreak.blast_radius import BlastRadius
from firebreak.catalog import CatalogWalk
from firebreak.past_incidents import PastIncidents
from firebreak.runbook import Investigation, Risk, Runbook, ScalarParam

# Any UTF-8 name, as Alertmanager >= 0.27 sends them (``service.name``, ``région``), up to 128 characters
# and without control characters. Names are only looked up, never substituted, and escaped where shown.
LABEL_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")
LabelName = Annotated[str, Field(pattern=LABEL_NAME.pattern)]
LabelValue = Annotated[str, Field(max_length=1024)]
IncidentId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,200}$")]


def canonical_json(data: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes that hashes and signatures cover."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Model(BaseModel):
    # Every model here crosses a Temporal boundary, where payloads outlive the code that wrote them:
    # a history recorded before a field was removed, or a payload from a newer worker mid-deploy. So
    # unknown fields are ignored (never kept, never re-emitted: signatures cover the declared fields
    # only) and new fields need defaults. HTTP boundaries stay strict by validating with
    # ``extra="forbid"`` where they parse (the broker's requests, the intake API, runbook YAML).
    model_config = ConfigDict(extra="ignore")


class Phase(StrEnum):
    investigating = "investigating"
    diagnosing = "diagnosing"
    proposing = "proposing"
    awaiting_approval = "awaiting_approval"
    executing = "executing"
    verifying = "verifying"
    resolved = "resolved"
    auto_resolved = "auto_resolved"
    rejected = "rejected"
    expired = "expired"
    rolled_back = "rolled_back"
    rollback_failed = "rollback_failed"
    failed = "failed"

    @property
    def closed(self) -> bool:
        return self in CLOSED_PHASES


CLOSED_PHASES = frozenset(
    {Phase.resolved, Phase.auto_resolved, Phase.rejected, Phase.expired, Phase.rolled_back, Phase.rollback_failed,
     Phase.failed}
)
# Endings a human must take over: they escalate with the evidence.
NEEDS_A_HUMAN = frozenset({Phase.failed, Phase.rollback_failed, Phase.expired})
# Temporal failure types, so that the UI and visibility tell these apart without a payload decoded:
# a run that ended needing a human ends as Failed (its IncidentReport in the failure's details), and
# a refused approval fails its ``submit_approval`` update (its ApprovalOutcome in the details).
NEEDS_A_HUMAN_FAILURE = "IncidentNeedsAHuman"
APPROVAL_REFUSED = "ApprovalRefused"


# -- alerts -------------------------------------------------------------------


# What one alert may carry into a workflow's history: its annotations are capped at intake, so a
# repeated 1 MB annotation costs the incident a few KB per delivery, never its history.
MAX_ANNOTATION_CHARS = 2048
MAX_ANNOTATIONS = 32
TRUNCATED = "… (truncated by Firebreak)"


class Alert(Model):
    """One alert, normalised from whichever incident system sent it."""

    source: str = Field(default="generic", max_length=64)
    fingerprint: str = Field(min_length=1, max_length=128)
    status: Literal["firing", "resolved"] = "firing"
    labels: dict[LabelName, LabelValue]
    annotations: dict[str, str] = Field(default_factory=dict)
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    generator_url: str | None = None

    @field_validator("annotations", mode="before")
    @classmethod
    def _capped(cls, annotations: Any) -> Any:
        if not isinstance(annotations, dict):
            return annotations
        kept = dict(list(annotations.items())[:MAX_ANNOTATIONS])
        if len(annotations) > MAX_ANNOTATIONS:
            kept["firebreak_dropped_annotations"] = str(len(annotations) - MAX_ANNOTATIONS)
        return {str(k)[:128]: (v[: MAX_ANNOTATION_CHARS - len(TRUNCATED)] + TRUNCATED
                               if isinstance(v, str) and len(v) > MAX_ANNOTATION_CHARS else v)
                for k, v in kept.items()}

    @field_validator("labels")
    @classmethod
    def _has_alertname(cls, labels: dict[str, str]) -> dict[str, str]:
        if not labels.get("alertname"):
            raise ValueError("labels.alertname is required")
        return labels

    @property
    def name(self) -> str:
        return self.labels["alertname"]


class Receipt(Model):
    """Who raised an incident, signed by a key the worker never holds.

    The intake API signs one for every delivery it accepts (``signer`` "intake",
    ``requested_by`` None: an alert system, no person); ``firebreak alert`` has
    the person who raises it sign their own (``signer`` == ``requested_by``).
    The broker derives the requesters, whom separation of duties excludes from
    approving, from these signatures alone.
    """

    incident_id: IncidentId
    requested_by: str | None = Field(default=None, max_length=64)
    signer: str = Field(min_length=1, max_length=64, description="'intake', or the roster name that signed")
    issued_at: str = Field(description="RFC 3339; kept as sent because the signature covers these bytes")
    signature: str = Field(default="", max_length=256)

    @property
    def issued(self) -> datetime:
        return datetime.fromisoformat(self.issued_at.replace("Z", "+00:00"))

    def signing_payload(self) -> bytes:
        return canonical_json(self.model_dump(mode="json", exclude={"signature"}))


class AlertSignal(Model):
    """Payload of the ``alert`` signal: the alerts of one delivery that share an incident."""

    alerts: list[Alert] = Field(min_length=1)
    received_at: datetime
    delivery_id: str | None = None
    requested_by: str | None = Field(default=None, description="roster name, when a person raised these alerts")
    receipt: Receipt | None = Field(default=None, description="who raised these alerts, signed")


class IncidentInput(Model):
    """Workflow input. Validated before start_workflow, never inside the workflow."""

    incident_id: IncidentId
    runbook: Runbook
    params: dict[str, str]
    requested_by: str | None = Field(default=None, description="roster name of whoever raised it, if a person")
    previous_run_id: str | None = Field(default=None, description="the earlier, closed run of this incident")
    receipts: list[Receipt] = Field(default_factory=list, description="who opened it, signed")
    carried: "CarriedState | None" = Field(default=None, description="an awaiting incident that continued as new")


# -- evidence and diagnosis --------------------------------------------------


class Sample(Model):
    t: datetime
    v: float


class Series(Model):
    labels: dict[str, str] = Field(default_factory=dict)
    samples: list[Sample] = Field(default_factory=list)


class ChangeRecord(Model):
    id: str
    service: str
    kind: str
    at: datetime
    version: str | None = None
    previous_version: str | None = None
    author: str | None = None
    description: str = ""


class Grant(Model):
    """What history may know of a credential: never the token itself."""

    grant_id: str
    audience: str
    scope: str
    expires_at: datetime
    audit_seq: int | None = Field(default=None, description="the broker's audit record of this mint")


class Evidence(Model):
    id: str
    kind: Literal["prometheus_instant", "prometheus_range", "change_log", "catalog", "past_incidents"]
    title: str = ""
    source: str
    query: str = Field(description="the exact query or request sent, after escaping")
    ok: bool
    gap: str | None = Field(default=None, description="why this evidence could not be gathered")
    series: list[Series] = Field(default_factory=list)
    changes: list[ChangeRecord] = Field(default_factory=list)
    link: str | None = None
    grant: Grant | None = None
    gathered_at: datetime
    grants: list[Grant] = Field(default_factory=list, description="a catalog walk: one grant per entity read")
    catalog: CatalogWalk | None = Field(default=None, description="a catalog walk: the entities reached, names refused")
    past: PastIncidents | None = Field(default=None, description="earlier incidents of this service and runbook")

    @property
    def latest(self) -> float | None:
        values = [s.samples[-1].v for s in self.series if s.samples]
        return max(values) if values else None


class InvestigateRequest(Model):
    incident_id: IncidentId
    runbook: str
    spec: Investigation
    params: dict[str, str]
    alert_started_at: datetime
    name_pattern: str = Field(default="", description="a catalog walk: the pattern every name it follows must match")


class DiagnoseRequest(Model):
    runbook: Runbook
    evidence: list[Evidence]
    alert_started_at: datetime


class Finding(Model):
    evidence: str
    test: str
    held: bool
    weight: float
    detail: str


class Hypothesis(Model):
    id: str
    title: str
    score: float = Field(ge=0, le=1)
    findings: list[Finding]
    actions: list[str]
    params: dict[str, str] = Field(default_factory=dict, description=(
        "derived params the plan adds, e.g. the dependency a for_each hypothesis blames"))
    prior: float = Field(default=0.0, description="weight added by earlier incidents where this was confirmed")


class Diagnosis(Model):
    hypotheses: list[Hypothesis] = Field(description="ranked, most likely first")
    gaps: list[str] = Field(default_factory=list)


# -- plans --------------------------------------------------------------------


class VerifyCheck(Model):
    target: str = Field(description="where the query runs, e.g. 'prometheus'")
    resource: str = Field(description="the read resource the runbook declares for that target")
    query: str
    test: Literal["above", "below"]
    threshold: float
    within_s: float
    interval_s: float


class UndoStep(Model):
    verb: str
    params: dict[str, ScalarParam] = Field(default_factory=dict)


class PlanStep(Model):
    id: str
    action: str
    description: str = ""
    executor: Literal["http"] = "http"
    target: str
    verb: str
    resource: str
    params: dict[str, ScalarParam] = Field(default_factory=dict)
    risk: Risk
    blast_radius: str
    timeout_s: float
    verify: VerifyCheck | None = None
    undo: UndoStep | None = None

    @property
    def scope(self) -> str:
        return f"{self.verb}:{self.resource}"


# Fields added to Plan after plans were first hashed: left out of the hash while unset, so
# that a plan built by an older workflow version keeps the hash its approvals signed.
_LATER_PLAN_FIELDS = ("params", "requesters", "evidence", "observed", "impact")


class Plan(Model):
    incident_id: str
    run_id: str = Field(description="binds approvals to this run: a later run of the same id is a new plan")
    runbook: str
    runbook_version: int
    hypothesis: str
    steps: list[PlanStep] = Field(min_length=1)
    params: dict[str, str] | None = Field(default=None, description="the validated params every step is derived from")
    requesters: list[str] | None = Field(default=None, description="who raised the incident (signed receipts)")
    evidence: list[str] | None = Field(default=None, description="the top hypothesis's evidence, as shown")
    observed: dict[str, dict[str, Any]] | None = Field(
        default=None, description="per step, the target state its precondition must still find before the write")
    impact: dict[str, BlastRadius] | None = Field(
        default=None, description="per step, its blast radius from the catalog and the traffic, as shown")

    @model_validator(mode="after")
    def _unique_steps(self) -> "Plan":
        ids = [s.id for s in self.steps]
        if len(set(ids)) != len(ids):
            raise ValueError("step ids must be unique")
        return self

    def canonical(self) -> bytes:
        """Every field that decides what runs, and what the approver was shown: nothing is left out."""
        unset = {name for name in _LATER_PLAN_FIELDS if getattr(self, name) is None}
        return canonical_json(self.model_dump(mode="json", exclude=unset))

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    def step(self, step_id: str) -> PlanStep | None:
        return next((s for s in self.steps if s.id == step_id), None)


# -- approvals ----------------------------------------------------------------


class Approval(Model):
    """The wire format of an approval or rejection, signed by the approver's Ed25519 key."""

    workflow_id: str = Field(min_length=1, max_length=200)
    plan_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    decision: Literal["approve", "reject"]
    steps: list[str] = Field(default_factory=list, description="step ids; empty means the whole plan")
    nonce: str = Field(min_length=8, max_length=128)
    expires_at: str = Field(description="RFC 3339; kept as sent because the signature covers these bytes")
    approver: str = Field(min_length=1, max_length=64)
    comment: str = Field(default="", max_length=2000)
    signature: str = Field(default="", max_length=256)

    @field_validator("expires_at")
    @classmethod
    def _rfc3339(cls, value: str) -> str:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            raise ValueError("expires_at needs a timezone")
        return value

    @property
    def expires(self) -> datetime:
        return datetime.fromisoformat(self.expires_at.replace("Z", "+00:00"))

    def signing_payload(self) -> bytes:
        return canonical_json(self.model_dump(mode="json", exclude={"signature"}))


def approval_sha256(approval: Approval) -> str:
    """The digest of an approval as sent, signature included (the broker keys its verdicts by it too)."""
    return hashlib.sha256(canonical_json(approval.model_dump(mode="json"))).hexdigest()


class ApprovalArrival(Model):
    """When the API received an approval, signed with the intake's key, which the worker never holds.

    Rides beside the approval in the ``approval`` signal, so that an approval that reached the API before
    the approval deadline is judged in time even when no worker could take it until after the deadline.
    """

    workflow_id: str = Field(max_length=200)
    approval_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    received_at: str = Field(description="RFC 3339; kept as sent because the signature covers these bytes")
    signer: str = Field(default="intake", max_length=64)
    signature: str = Field(default="", max_length=256)

    @property
    def received(self) -> datetime:
        return datetime.fromisoformat(self.received_at.replace("Z", "+00:00"))

    def signing_payload(self) -> bytes:
        return canonical_json(self.model_dump(mode="json", exclude={"signature"}))


class ApprovalCheck(Model):
    """Result of verifying an approval's signature against the roster (an activity)."""

    valid: bool
    reason: str = ""
    groups: list[str] = Field(default_factory=list)
    received_at: datetime | None = Field(
        default=None, description="when the broker first saw it: its validity is judged at this instant, once"
    )
    arrived_at: datetime | None = Field(default=None, description=(
        "the earliest instant a component the worker cannot forge saw it (the API's signed receipt, the broker's "
        "first sight, the workflow task that delivered it): whether it came before the approval deadline"))
    held: str | None = Field(default=None, description="the broker's kill switch is on: who, when, why")


class ApprovalRecord(Model):
    """Every approval or rejection received, counted or not, with why."""

    approver: str
    decision: str
    counted: bool
    reason: str
    steps: list[str] = Field(default_factory=list)
    plan_hash: str = ""
    comment: str = ""
    received_at: datetime
    via: Literal["signal", "update"]


class ApprovalOutcome(Model):
    """What ``submit_approval`` answers at once."""

    counted: bool
    reason: str
    phase: Phase
    decided: bool = Field(default=False, description="the plan now has every approval it will wait for")
    held: str | None = Field(default=None, description="credentials are frozen: the approved plan waits for a thaw")
    waiting_for: list[str] = Field(default_factory=list, description="what each step still needs")


class PolicyNeed(Model):
    step: str
    risk: Risk
    approvers: int
    groups: list[str]
    approved_by: list[str]

    @property
    def met(self) -> bool:
        return len(self.approved_by) >= self.approvers


# -- execution ----------------------------------------------------------------


class ExecuteRequest(Model):
    incident_id: IncidentId
    plan: Plan
    step_id: str
    approvals: list[Approval] = Field(description="the signed approvals the broker checks itself")
    requested_by: str | None = None
    receipts: list[Receipt] = Field(default_factory=list, description="who raised the incident, signed")
    undo: bool = False
    undo_params: dict[str, ScalarParam] = Field(default_factory=dict)


class StepResult(Model):
    step_id: str
    action: str
    status: Literal["succeeded", "failed", "skipped", "rolled_back", "rollback_failed"]
    detail: str = ""
    grant: Grant | None = None
    response: dict[str, Any] = Field(default_factory=dict)
    verified: bool | None = None
    verification: str = ""
    rollback: "StepResult | None" = None


class ObserveRequest(Model):
    """Read the fields of a step's target state that its precondition names."""

    incident_id: IncidentId
    runbook: str
    params: dict[str, str]
    step: PlanStep
    fields: list[str]


class VerifyRequest(Model):
    incident_id: IncidentId
    runbook: str
    params: dict[str, str]
    step_id: str
    check: VerifyCheck


class VerifyResult(Model):
    held: bool
    last_value: float | None
    detail: str
    grant: Grant | None = None


class Ticket(Model):
    sink: str
    ref: str = Field(description="one per run of the incident: a later run never overwrites it")
    url: str | None = None
    run_id: str | None = Field(default=None, description="the incident run it belongs to (its first run id)")


class TicketRequest(Model):
    incident_id: IncidentId
    event: Literal["proposed", "updated", "closed"]
    summary: str = Field(description="the title: it starts with the phase it was filed in")
    run_id: str | None = Field(default=None, pattern=r"^[0-9A-Za-z-]{1,64}$",
                               description="the run's first run id: one ticket per run")
    body_markdown: str
    payload: dict[str, Any] = Field(default_factory=dict)


class Notification(Model):
    incident_id: IncidentId
    kind: Literal["escalation", "expired", "closed"]
    to: str
    summary: str
    approve_command: str
    evidence: list[str] = Field(default_factory=list, description="what the human taking over should see first")


# -- status and report --------------------------------------------------------


class IncidentStatus(Model):
    incident_id: str
    phase: Phase
    runbook: str
    runbook_version: int
    service: str = ""
    severity: str = ""
    requested_by: str | None = None
    opened_at: datetime
    alerts_received: int
    firing: list[str] = Field(default_factory=list, description="fingerprints still firing")
    evidence: list[Evidence] = Field(default_factory=list)
    hypotheses: list[Hypothesis] = Field(default_factory=list)
    gaps: list[str] = Field(default_factory=list)
    plan: Plan | None = None
    plan_hash: str | None = None
    approvals: list[ApprovalRecord] = Field(default_factory=list)
    needed: list[PolicyNeed] = Field(default_factory=list)
    escalates_at: datetime | None = None
    expires_at: datetime | None = None
    escalated: bool = False
    steps: list[StepResult] = Field(default_factory=list)
    tickets: list[Ticket] = Field(default_factory=list)
    refused_signals: list[str] = Field(default_factory=list, description="signals that could not be read")
    sink_gaps: list[str] = Field(default_factory=list, description="tickets or notifications that could not be sent")
    held: str | None = Field(default=None, description="waiting for the broker's kill switch to be released")
    reproposals: list[str] = Field(default_factory=list, description="why earlier plans were withdrawn")
    reinvestigated: str | None = Field(default=None, description="why the diagnosis looked once more before deciding")
    closed_at: datetime | None = None
    outcome: str = ""
    needs_a_human: bool = Field(default=False, description=(
        "an ending a human must take over although its phase alone does not say so: rolled back, yet the "
        "alert still fires"))


class IncidentReport(Model):
    incident_id: str
    phase: Phase
    outcome: str
    status: IncidentStatus


class ReceivedApproval(Model):
    approval: Approval
    check: ApprovalCheck


class CarriedState(Model):
    """What an incident awaiting approval carries into its next run when its history grows long.

    The plan keeps the run id it was proposed in (its hash, the approvals and the broker's slots
    all bind to it), so approvals given before the hand-over still count after it.
    """

    opened_at: datetime
    started_at: datetime | None = None
    severity: str = ""
    requested_by: str | None = None
    alerts_received: int
    firing: dict[str, Alert]
    evidence: list[Evidence]
    diagnosis: Diagnosis
    plan: Plan
    plan_receipts: list[Receipt]
    received: list[ReceivedApproval]
    records: list[ApprovalRecord]
    escalates_at: datetime
    expires_at: datetime
    escalated: bool
    tickets: list[Ticket]
    refused_signals: list[str]
    sink_gaps: list[str]
    reproposals: list[str]
    runs: int = Field(default=1, description="how many runs this incident has had")


IncidentInput.model_rebuild()
