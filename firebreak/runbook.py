"""Runbook schema, loader and matching.

A runbook is data: YAML validated by the pydantic models below. Errors at load
time name the file, the line and the field. Alert labels reach a runbook only
as typed, pattern-checked parameters, and reach a query or a URL only through
the escaping functions in :mod:`firebreak.escaping`.
"""

from __future__ import annotations

import difflib
import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from firebreak.escaping import TemplateError, placeholders, render_plain

Identifier = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$")]
Risk = Literal["low", "medium", "high"]
ScalarParam = str | int | float | bool

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """Parse a Prometheus-style duration such as ``90s``, ``15m`` or ``2h``."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30s, 15m or 2h")
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


Duration = Annotated[str, Field(pattern=_DURATION.pattern)]


# Runbook YAML is strict: parse_runbook validates with extra="forbid", which is what turns a typo'd field
# into an error naming it, and the JSON Schema says additionalProperties: false. The models themselves
# ignore unknown fields because a runbook also travels inside Temporal payloads (the workflow input, the
# diagnose and investigate requests), which must still decode after a field is added or removed.
_SCHEMA_CONFIG = ConfigDict(extra="ignore", frozen=True, json_schema_extra={"additionalProperties": False})


class _Strict(BaseModel):
    model_config = _SCHEMA_CONFIG


class Param(_Strict):
    """A value taken from an alert label, checked against a pattern before any use.

    A ``derived`` param comes from no label: ``dependency`` is each dependency the catalog walk found
    (validated against ``pattern`` like a label), used only by ``for_each: dependency`` investigations,
    hypotheses and their actions.
    """

    label: str = ""
    derived: Literal["dependency"] | None = None
    pattern: str = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
    default: str | None = None
    description: str = ""

    @model_validator(mode="after")
    def _source(self) -> "Param":
        if bool(self.label) == bool(self.derived):
            raise ValueError("a param takes either a label or derived, exactly one")
        return self

    @field_validator("pattern")
    @classmethod
    def _anchored(cls, value: str) -> str:
        if not (value.startswith("^") and value.endswith("$")):
            raise ValueError("pattern must be anchored with ^ and $")
        re.compile(value)
        return value


class Match(_Strict):
    alertnames: list[str] = Field(min_length=1)
    labels: dict[str, str] = Field(default_factory=dict, description="label equality selectors")
    incident_key: str = Field(description="template over params, e.g. '{namespace}.{service}.bad-deploy'")


class Investigation(_Strict):
    id: Identifier
    kind: Literal["prometheus_instant", "prometheus_range", "change_log", "catalog", "past_incidents"]
    title: str = ""
    query: str = Field(default="", description="PromQL; {param} placeholders are escaped as PromQL string content")
    lookback: Duration = "15m"
    step: Duration = "15s"
    target: str = Field(description="the source's audience, e.g. 'prometheus' or 'fleet'")
    scope: str = Field(pattern=r"^[a-z]+\.read$", description="read verb the investigation needs, e.g. 'metrics.read'")
    resource: str = Field(description="template of what is read, e.g. 'service/{service}'")
    max_bytes: int = Field(default=64 * 1024, ge=4 * 1024, le=256 * 1024, description=(
        "the most this evidence may weigh as JSON: larger answers are downsampled, and say so"))
    for_each: Literal["dependency"] | None = Field(default=None, description=(
        "run once per dependency the catalog walk found, with the derived param set to it"))
    follow: str = Field(default="", description=(
        "catalog: the resource template of every further entity read, e.g. 'component/{dependency}'"))
    depth: int = Field(default=2, ge=1, le=4, description="catalog: how many dependsOn hops to follow")

    @model_validator(mode="after")
    def _kind_fields(self) -> "Investigation":
        if self.kind.startswith("prometheus") and not self.query:
            raise ValueError("a prometheus investigation needs a query")
        if self.kind == "catalog" and (not self.follow or self.for_each):
            raise ValueError("a catalog investigation needs follow, and is not for_each")
        return self


class Condition(_Strict):
    """One structured test of one piece of evidence; never an expression to eval."""

    evidence: Identifier
    test: Literal["above", "below", "recent_change", "rose_after_change", "absent"]
    threshold: float = 0.0
    factor: float = Field(default=2.0, description="rose_after_change: ratio of the value once the query's rate window "
                          "has passed since the change to the median before it")
    within: Duration = "30m"
    weight: float = Field(default=1.0, gt=0)
    description: str = ""


class HypothesisSpec(_Strict):
    id: Identifier
    title: str
    conditions: list[Condition] = Field(min_length=1)
    actions: list[Identifier] = Field(default_factory=list, description="catalog actions that answer it")
    for_each: Literal["dependency"] | None = Field(default=None, description=(
        "judged once per dependency the catalog walk found; its conditions read that dependency's evidence"))


class Decide(_Strict):
    """When the diagnosis is too close to call, look once more before proposing or escalating.

    An alert can open the incident while its evidence is still arriving (a rate window only half past the
    change): a second look a little later turns a near miss into a clear answer either way.
    """

    margin: float = Field(default=0.1, ge=0, le=1, description=(
        "a top score within this of the threshold (or below it with evidence missing) is undecided"))
    reinvestigate_after: Duration = Field(default="30s", description=(
        "how long to wait before the one re-investigation: at least the longest rate window the evidence reads"))


class Verify(_Strict):
    query: str
    test: Literal["above", "below"]
    threshold: float
    within: Duration = "3m"
    interval: Duration = "10s"


class Undo(_Strict):
    """How to roll a step back: a verb on the same target, params may use {result.FIELD}."""

    verb: str
    params: dict[str, ScalarParam] = Field(default_factory=dict)


class Precondition(_Strict):
    """What must still hold just before the write: the target's state, as it was when the plan was proposed.

    The fields are read from the step's resource with the target's read verb (e.g. ``fleet.read`` on
    ``service/checkout``) at proposal, put in the plan the approvers sign, and read again right before
    the first write. Any change means the plan no longer fits the world: it is proposed anew.
    """

    fields: list[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]] = Field(min_length=1)


class ApprovalPolicy(_Strict):
    approvers: int = Field(default=1, ge=1, le=10)
    groups: list[str] = Field(min_length=1)


class Action(_Strict):
    executor: Literal["http"] = "http"
    target: str = Field(description="the audience of the credential, e.g. 'fleet'")
    verb: str = Field(pattern=r"^[a-z]+\.[a-z_]+$")
    resource: str = Field(description="template, e.g. 'service/{service}'")
    params: dict[str, ScalarParam] = Field(default_factory=dict)
    risk: Risk = "medium"
    blast_radius: str
    description: str = ""
    timeout: Duration = "60s"
    verify: Verify | None = None
    undo: Undo | None = None
    approval: ApprovalPolicy | None = Field(default=None, description="overrides the policy for this risk")
    precondition: Precondition | None = Field(default=None, description="state re-read right before the write")


class Windows(_Strict):
    escalate_after: Duration = "30m"
    expire_after: Duration = Field(default="2h", description="no quorum by then: expired; also the longest an approval may be valid")
    execute_within: Duration = Field(default="1h", description="how long an approved plan may still mint its writes and undos")


DEFAULT_POLICY: dict[str, ApprovalPolicy] = {
    "low": ApprovalPolicy(approvers=1, groups=["oncall"]),
    "medium": ApprovalPolicy(approvers=1, groups=["oncall"]),
    "high": ApprovalPolicy(approvers=2, groups=["oncall", "sre-leads"]),
}


class Caps(_Strict):
    """What a plan may never do, whatever the diagnosis says: an unsafe output is not proposed, it escalates."""

    max_dependents: int | None = Field(default=None, ge=0, description=(
        "the most catalog dependents (transitive) a step's target may have: a wider blast radius escalates"))

    max_steps: int | None = Field(default=None, ge=1, description="the most steps one plan may hold")
    services: list[str] | None = Field(default=None, description="the only services a plan may touch (param 'service')")
    max_params: dict[str, float] = Field(default_factory=dict, description="numeric step params' ceilings, e.g. replicas: 10")


class Remediate(_Strict):
    actions: dict[Identifier, Action] = Field(min_length=1)
    caps: Caps = Caps()
    approval: dict[Risk, ApprovalPolicy] = Field(default_factory=dict)
    windows: Windows = Windows()
    escalate_to: str = Field(default="", description="who is notified at escalation, e.g. 'sre-leads'")
    on_unverified: Literal["rollback", "escalate"] = Field(
        default="rollback", description="a verification that could not run: undo the step, or leave it and escalate"
    )

    def policy_for(self, action: Action) -> ApprovalPolicy:
        return action.approval or self.approval.get(action.risk) or DEFAULT_POLICY[action.risk]


class Runbook(_Strict):
    api_version: Literal["firebreak/v1"] = Field(alias="apiVersion")
    name: Identifier
    version: int = Field(ge=1)
    description: str = ""
    match: Match
    params: dict[Identifier, Param]
    investigate: list[Investigation] = Field(min_length=1)
    diagnose: list[HypothesisSpec] = Field(min_length=1)
    decide: Decide = Decide()
    remediate: Remediate

    model_config = ConfigDict(**_SCHEMA_CONFIG, populate_by_name=True)

    @model_validator(mode="after")
    def _references(self) -> "Runbook":
        """Every reference resolves: deny by default starts at load time."""
        evidence_ids = {inv.id for inv in self.investigate}
        if len(evidence_ids) != len(self.investigate):
            raise ValueError("investigate ids must be unique")
        known = set(self.params)
        templates: list[tuple[str, str]] = [("match.incident_key", self.match.incident_key)]
        templates += [(f"investigate.{i.id}.query", i.query) for i in self.investigate]
        templates += [(f"investigate.{i.id}.resource", i.resource) for i in self.investigate]
        for hyp in self.diagnose:
            for cond in hyp.conditions:
                if cond.evidence not in evidence_ids:
                    raise ValueError(f"hypothesis {hyp.id!r} uses unknown evidence {cond.evidence!r}")
            for action in hyp.actions:
                if action not in self.remediate.actions:
                    raise ValueError(f"hypothesis {hyp.id!r} names action {action!r}, not in remediate.actions")
        for name, action in self.remediate.actions.items():
            templates.append((f"remediate.actions.{name}.resource", action.resource))
            if action.verify:
                templates.append((f"remediate.actions.{name}.verify", action.verify.query))
        templates += [(f"investigate.{i.id}.follow", i.follow) for i in self.investigate if i.follow]
        for where, template in templates:
            unknown = placeholders(template) - known
            if unknown:
                raise ValueError(f"{where} uses undeclared params {sorted(unknown)}")
        self._derived_uses()
        return self

    def _derived_uses(self) -> None:
        """A derived param has a value only per dependency: only for_each entries (and catalog follow) use it."""
        derived = {n for n, p in self.params.items() if p.derived}
        if not derived:
            return
        for spec in self.investigate:
            used = placeholders(spec.query) | placeholders(spec.resource)
            if used & derived and not spec.for_each:
                raise ValueError(f"investigate.{spec.id} uses derived params {sorted(used & derived)} without for_each")
        per_dependency = {i.id for i in self.investigate if i.for_each}
        for hyp in self.diagnose:
            uses = {c.evidence for c in hyp.conditions} & per_dependency
            if uses and not hyp.for_each:
                raise ValueError(f"hypothesis {hyp.id!r} reads per-dependency evidence {sorted(uses)} without for_each")
        answered_per_dependency = {a for h in self.diagnose if h.for_each for a in h.actions}
        for name, action in self.remediate.actions.items():
            used = placeholders(action.resource) | (placeholders(action.verify.query) if action.verify else set())
            if used & derived and name not in answered_per_dependency:
                raise ValueError(f"remediate.actions.{name} uses derived params {sorted(used & derived)} "
                                 "but no for_each hypothesis answers with it")
            for hyp in self.diagnose:
                if name in hyp.actions and used & derived and not hyp.for_each:
                    raise ValueError(f"hypothesis {hyp.id!r} answers with {name!r}, which needs a dependency")

    # -- matching -------------------------------------------------------------

    def matches(self, labels: dict[str, str]) -> bool:
        if labels.get("alertname") not in self.match.alertnames:
            return False
        return all(labels.get(k) == v for k, v in self.match.labels.items())

    def extract_params(self, labels: dict[str, str]) -> dict[str, str]:
        """Validated params from alert labels; raises LabelError naming the label."""
        values: dict[str, str] = {}
        for name, param in self.params.items():
            if param.derived:  # filled by the investigation, never by an alert
                continue
            value = labels.get(param.label, param.default)
            if value is None:
                raise LabelError(param.label, "is missing")
            if not re.fullmatch(param.pattern.removeprefix("^").removesuffix("$"), value):
                raise LabelError(param.label, f"does not match {param.pattern}")
            values[name] = value
        return values

    def incident_key(self, params: dict[str, str]) -> str:
        key = render_plain(self.match.incident_key, params)
        if not re.fullmatch(r"[A-Za-z0-9._:-]{1,200}", key):
            raise TemplateError(f"incident key {key!r} has characters outside [A-Za-z0-9._:-]")
        return key

    def hypothesis(self, hypothesis_id: str) -> HypothesisSpec:
        return next(h for h in self.diagnose if h.id == hypothesis_id)


class LabelError(ValueError):
    """An alert label that a runbook cannot accept as a parameter."""

    def __init__(self, label: str, problem: str) -> None:
        super().__init__(f"label {label!r} {problem}")
        self.label = label
        self.problem = problem


class RunbookError(ValueError):
    """A runbook that failed to load; the message names file, line and field."""

    def __init__(self, path: str, line: int | None, field: str, message: str) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {field}: {message}")
        self.path, self.line, self.field, self.problem = path, line, field, message


# -- loading ------------------------------------------------------------------


def _line_index(node: yaml.Node, path: tuple[Any, ...], index: dict[tuple[Any, ...], int]) -> None:
    """Map every key path in a YAML document to its 1-based line."""
    index.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = path + (key_node.value,)
            index[child] = key_node.start_mark.line + 1
            _line_index(value_node, child, index)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, path + (i,), index)


def _line_for(loc: tuple[Any, ...], index: dict[tuple[Any, ...], int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in index:
            return index[loc[:end]]
    return None


def parse_runbook(text: str, path: str = "<runbook>") -> Runbook:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise RunbookError(path, line, "(yaml)", str(exc.problem)) from None
    if not isinstance(data, dict) or node is None:
        raise RunbookError(path, 1, "(document)", "a runbook is a YAML mapping")
    index: dict[tuple[Any, ...], int] = {}
    _line_index(node, (), index)
    try:
        book = Runbook.model_validate(data, extra="forbid")
    except ValidationError as exc:
        raise _explain(exc, path, index) from None
    problem = unmet_need(book)
    if problem is not None:
        loc, message = problem
        raise RunbookError(path, _line_for(loc, index), ".".join(str(p) for p in loc), message)
    return book


def unmet_need(book: Runbook) -> tuple[tuple[Any, ...], str] | None:
    """Something the runbook needs at run time but does not declare, and where it is; None if all are met.

    Checked when a runbook is loaded, not as a model validator: runbooks also travel inside Temporal
    payloads, which must keep decoding whatever this check learns to refuse later. The workflow asks
    it too (:func:`cannot_run`), for a runbook that reached it without being loaded.
    """
    return unmet_evidence_need(book) or unmet_read_need(book)


def cannot_run(book: Runbook) -> str | None:
    """Why a runbook cannot run, naming the field (no file here: it came in a payload), or None."""
    problem = unmet_need(book)
    if problem is None:
        return None
    loc, message = problem
    return f"runbook {book.name} v{book.version}: {'.'.join(str(p) for p in loc)}: {message}"


def metrics_read(book: Runbook) -> Investigation | None:
    """The declared Prometheus read that verification queries with (its target, scope and resource)."""
    return next((spec for spec in book.investigate if spec.kind.startswith("prometheus")), None)


def unmet_read_need(book: Runbook) -> tuple[tuple[Any, ...], str] | None:
    """A verification or a condition that needs a read the runbook does not declare.

    The broker issues only declared reads, and the plan takes a verification's read from the
    runbook's investigations: without one, no plan can be built and no incident can proceed.
    """
    read = metrics_read(book)
    derived = {name for name, param in book.params.items() if param.derived}
    per_dependency = {action for hyp in book.diagnose if hyp.for_each for action in hyp.actions}
    for name, action in book.remediate.actions.items():
        if action.verify is None:
            continue
        loc: tuple[Any, ...] = ("remediate", "actions", name, "verify", "query")
        if read is None:
            return loc, ("verifies with a Prometheus query, but the runbook declares no Prometheus read to run it "
                         "with: add an investigate entry of kind prometheus_instant or prometheus_range")
        has = set(book.params) - (set() if name in per_dependency else derived)
        missing = placeholders(read.resource) - has
        if missing:
            return loc, (f"verifies with the Prometheus read investigate.{read.id}, whose resource needs "
                         f"{sorted(missing)}, which this action does not have")
    specs = {spec.id: spec for spec in book.investigate}
    for h, hyp in enumerate(book.diagnose):
        for c, cond in enumerate(hyp.conditions):
            spec = specs[cond.evidence]
            if cond.test in ("above", "below") and not spec.kind.startswith("prometheus"):
                return ("diagnose", h, "conditions", c, "evidence"), (
                    f"{cond.test} compares a metric, but {spec.id!r} is {spec.kind}, not a Prometheus read")
    return None


def unmet_evidence_need(book: Runbook) -> tuple[tuple[Any, ...], str] | None:
    """A condition that asks for more than its evidence reads, and where it is; None if all are met."""
    specs = {inv.id: inv for inv in book.investigate}
    change_logs = [inv for inv in book.investigate if inv.kind == "change_log"]
    for h, hyp in enumerate(book.diagnose):
        for c, cond in enumerate(hyp.conditions):
            loc: tuple[Any, ...] = ("diagnose", h, "conditions", c)
            spec = specs[cond.evidence]
            if cond.test in ("recent_change", "absent"):
                if spec.kind != "change_log":
                    return loc + ("evidence",), f"{cond.test} needs change_log evidence, {spec.id!r} is {spec.kind}"
                sources = [spec]
            elif cond.test == "rose_after_change":
                if spec.kind != "prometheus_range":
                    return loc + ("evidence",), f"rose_after_change needs prometheus_range evidence, {spec.id!r} is {spec.kind}"
                if not change_logs:
                    return loc + ("test",), "rose_after_change needs a change_log in investigate to find the change"
                sources = change_logs
            else:
                continue
            widest = max(sources, key=lambda s: parse_duration(s.lookback))
            if parse_duration(cond.within) > parse_duration(widest.lookback):
                return loc + ("within",), (
                    f"looks {cond.within} back for a change, but {widest.id!r} reads changes only {widest.lookback} back")
    return None


def _path_of(err: Any) -> tuple[Any, ...]:
    # Model-level validators report at the model; keep only str/int path parts.
    return tuple(p for p in err["loc"] if isinstance(p, (str, int)))


def _known_fields(parent: tuple[Any, ...]) -> list[str]:
    """The field names the schema allows at a path, for a did-you-mean hint."""
    schema = Runbook.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        for option in node.get("anyOf", []):
            if "$ref" in option or "properties" in option:
                return resolve(option)
        return node

    node = resolve(schema)
    for part in parent:
        if isinstance(part, int):
            node = resolve(node.get("items", {}))
        elif part in node.get("properties", {}):
            node = resolve(node["properties"][part])
        else:
            node = resolve(node.get("additionalProperties") or {})
    return list(node.get("properties", {}))


def _explain(exc: ValidationError, path: str, index: dict[tuple[Any, ...], int]) -> RunbookError:
    errors = exc.errors()
    # A typo shows up twice (unknown field + missing field): the unknown one is what to fix.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = _path_of(err)
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _known_fields(loc[:-1]), n=1)
        message = "unknown field" + (f" (did you mean {close[0]!r}?)" if close else "")
    extra = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    field = ".".join(str(p) for p in loc) or "(runbook)"
    return RunbookError(path, _line_for(loc, index), field, message + extra)


def load_runbook(path: str | Path) -> Runbook:
    path = Path(path)
    return parse_runbook(path.read_text(encoding="utf-8"), str(path))


def load_runbooks(directory: str | Path) -> list[Runbook]:
    books = [load_runbook(p) for p in sorted(Path(directory).glob("*.yaml"))]
    names = [b.name for b in books]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise RunbookError(str(directory), None, "name", f"duplicate runbook names {sorted(duplicates)}")
    return books


def default_runbook_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "runbooks"


def json_schema() -> str:
    return json.dumps(Runbook.model_json_schema(by_alias=True), indent=2)


def route(runbooks: list[Runbook], labels: dict[str, str]) -> Runbook | None:
    """The first runbook whose match accepts these labels."""
    return next((book for book in runbooks if book.matches(labels)), None)
