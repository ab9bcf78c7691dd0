"""Webhook bodies of each incident system, mapped to :class:`firebreak.contracts.Alert`.

Every parser takes the raw body bytes and returns :class:`Parsed`, or raises
:class:`PayloadError` naming each bad field as a path into the body
(``alerts[0].labels.alertname``). Nothing here trusts a value: labels are only
carried, and reach a query only after a runbook validated them.

Mapping, per source
===================

Alertmanager (webhook ``version: "4"``), one Alert per entry of ``alerts``:
  source ``alertmanager``; fingerprint = ``fingerprint``; status = the alert's
  own ``status`` (not the group's); labels, annotations, ``generatorURL`` as
  sent; ``startsAt``; ``endsAt`` unless it is Go's zero time ``0001-01-01``.
  Required: ``version``, ``groupKey``, ``status``, ``alerts`` and, per alert,
  ``status``, ``labels`` with ``alertname``, ``startsAt``, ``fingerprint``.
  A **resolved** alert counts only if ``fingerprint`` is its labels' fingerprint as
  Alertmanager computes it (:func:`alertmanager_fingerprint`); otherwise it is refused
  alone (``alerts[i].fingerprint``) and recorded: another label set carrying a firing
  alert's fingerprint must not resolve that alert's incident.

Grafana alerting webhook (``version: "1"``): the same shape as Alertmanager's,
  source ``grafana``, fingerprint = Grafana's ``fingerprint`` (opaque: it covers
  hidden labels). Grafana's extras become annotations: ``grafana_rule_uid``,
  ``grafana_dashboard_url``, ``grafana_panel_url``, ``grafana_silence_url``,
  ``grafana_value_string`` and ``grafana_values`` (JSON).

PagerDuty V3 webhook, one Alert for an incident event:
  source ``pagerduty``. ``incident.triggered`` and ``incident.reopened`` are
  firing, ``incident.resolved`` is resolved; every other event type (and
  ``pagey.ping``) is accepted and ignored. fingerprint = ``data.incident_key``
  (``sha256:<hex>`` of it when longer than 128 characters), else ``data.id``.
  Labels are derived, since PagerDuty has none:

  - **mapped service** (``LabelMapping.pagerduty_services``: from the API's settings, or from a
    catalog entity annotated ``pagerduty.com/service-id``, :func:`pagerduty_services_from_catalog`):
    the mapping's labels for ``data.service.id`` win over everything below, except that an
    ``alertname`` in Alertmanager's title form (``[FIRING:n] Name``) stays the incident's own;
  - otherwise ``alertname`` is the first word of ``data.title`` when the title has
    Alertmanager's ``[FIRING:n]`` / ``[RESOLVED]`` prefix or the word is a CamelCase alert name
    (``HighErrorRate``), else ``PagerDutyIncident``; and ``service``, ``namespace``, ``env`` come
    from ``data.service.summary`` written ``NAME (NAMESPACE/ENV)`` (a summary of another form
    becomes ``service`` as it is). An unmapped incident that no runbook matches is recorded as
    unrouted, its reason naming the service id to map;
  - always: ``severity`` (``critical`` for urgency ``high``, ``warning`` for ``low``),
    ``urgency``, ``priority`` (its summary, e.g. ``P1``), ``pagerduty_incident`` (``data.id``),
    ``pagerduty_service`` (``data.service.id``).

  Annotations: ``summary`` (the title), ``pagerduty_url``, ``pagerduty_event``,
  ``pagerduty_incident_number``, ``pagerduty_service_name``; the Events API's ``custom_details``
  where the webhook carries them (``data.custom_details``, or ``data.body.details``) as one JSON
  annotation ``pagerduty_custom_details``: evidence, never a label. starts = ``data.created_at``;
  ends = ``event.occurred_at`` when resolved. Every error names a path in the body: a label from the
  mapping, or one a runbook needs that nothing gave, at ``event.data.service.id``; a label from the
  summary at ``event.data.service.summary``.

Opsgenie outgoing webhook, one Alert for ``action`` ``Create`` (firing), ``Close`` (resolved) or
  ``Acknowledge`` (recorded, no incident changes: :attr:`Parsed.note`); other actions are ignored.
  source ``opsgenie``; fingerprint = ``alert.alias`` (else ``alert.alertId``). Labels by the same
  rules: the alert's own ``details`` (scalar values) and ``name:value`` tags, ``alertname`` from them
  or from ``alert.message`` as from a PagerDuty title (else ``OpsgenieAlert``), ``priority``. A label
  a runbook needs that is not there is reported at ``alert.details``.

Firebreak's own format (``POST /v1/alerts``): a JSON list of
  :class:`firebreak.contracts.Alert` objects, exactly as that model defines
  them (``source`` defaults to ``generic``). A resolved alert's ``fingerprint``
  must be its labels' Alertmanager fingerprint, as above.

Grafana's fingerprint covers labels the webhook does not show, so it cannot be
recomputed; Grafana deliveries are instead signed over a timestamp and never
accepted twice (:mod:`firebreak.api.auth`). PagerDuty's are signed and
deduplicated by the event's own id.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from firebreak.contracts import LABEL_NAME, Alert

# -- results and errors ---------------------------------------------------------


@dataclass(frozen=True)
class SourceAlert:
    """One normalised alert and where it came from in the body."""

    alert: Alert
    path: str
    derived: dict[str, str] = field(default_factory=dict)
    # Sources whose labels are derived (PagerDuty, Opsgenie): the body field a label that is not there
    # would come from (the key of the label mapping), so an error never names a path the body lacks.
    missing_at: str | None = None
    unrouted_hint: str = ""  # added to "no runbook matches": why this alert's labels are what they are

    def field_for(self, alert_field: str) -> str:
        """The body path of an Alert field such as ``labels.service``: always a path in the body."""
        if alert_field in self.derived:
            return self.derived[alert_field]
        if self.missing_at is not None:
            return self.missing_at
        return f"{self.path}.{alert_field}" if self.path else alert_field


@dataclass
class Refused:
    """An alert of a delivery that cannot be accepted (a label over its limit): refused alone."""

    alert: Alert  # what can be kept of it, for the record
    field: str
    reason: str


@dataclass
class Parsed:
    source: str
    alerts: list[SourceAlert]
    delivery_id: str | None = None
    ignored: str | None = None  # why a valid delivery carries nothing to route
    refused: list[Refused] = field(default_factory=list)
    event_id: str | None = None  # PagerDuty: the event's own id, the same on every retry and every copy
    occurred_at: datetime | None = None  # PagerDuty: when the event happened, for the freshness window
    test: str | None = None  # a recognised test notification (which one): answered 2xx, recorded, opens nothing
    note: str | None = None  # an event that changes no incident (Opsgenie's acknowledge): recorded, nothing sent


# -- test notifications ---------------------------------------------------------------

# The alert a "test" button sends: grafana/grafana's newTestAlert (pkg/services/ngalert/notifier) for a
# contact point, and grafana/alerting's for an Alertmanager receiver (instance "Alertmanager"). Only this
# exact label set counts: a test that adds labels is an ordinary alert (unrouted unless a runbook wants it).
TEST_ALERT_LABELS = ({"alertname": "TestAlert", "instance": "Grafana"},
                     {"alertname": "TestAlert", "instance": "Alertmanager"})
TEST_ALERT_SUMMARY = "Notification test"


def _tested(parsed: Parsed) -> Parsed:
    """Mark a delivery made only of test alerts: it is recorded as a test and opens nothing."""
    alerts = [sa.alert for sa in parsed.alerts]
    if alerts and not parsed.refused and all(
            a.labels in TEST_ALERT_LABELS and a.annotations.get("summary") == TEST_ALERT_SUMMARY for a in alerts):
        parsed.test = f"{parsed.source} test notification ({alerts[0].labels['instance']})"
        parsed.ignored = f"a {parsed.test}: recorded, opens nothing"
    return parsed


# -- Alertmanager's fingerprint ------------------------------------------------------

# prometheus/common model.LabelSet.Fingerprint (model/signature.go, labelSetToFingerprint):
# FNV-1a 64 over the label names in byte order, each name and value followed by the byte 0xff,
# written as 16 lowercase hex digits.
_FNV64_OFFSET = 14695981039346656037
_FNV64_PRIME = 1099511628211
_SEPARATOR = b"\xff"


def alertmanager_fingerprint(labels: dict[str, str]) -> str:
    """The fingerprint Alertmanager gives an alert with these labels."""
    digest = _FNV64_OFFSET
    # Go sorts names as byte strings; UTF-8 keeps code-point order, so sorting the str is the same.
    for name in sorted(labels):
        for part in (name.encode("utf-8"), labels[name].encode("utf-8")):
            for byte in part + _SEPARATOR:
                digest = ((digest ^ byte) * _FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{digest:016x}"


def _fingerprint_refusal(alert: Alert, path: str) -> Refused | None:
    """A resolved alert whose labels do not give its fingerprint resolves nothing: refused, recorded."""
    if alert.status != "resolved":
        return None
    expected = alertmanager_fingerprint(alert.labels)
    if alert.fingerprint == expected:
        return None
    where = f"{path}.fingerprint" if path else "fingerprint"
    return Refused(alert, where, f"a resolved alert's fingerprint must be its labels' fingerprint "
                                 f"({expected}); {alert.fingerprint!r} belongs to another label set")


class PayloadError(Exception):
    """A body that cannot be accepted: 400 (not JSON, wrong shape) or 413 (too large)."""

    def __init__(self, message: str, field: str, errors: list[dict[str, str]] | None = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.field = field
        self.errors = errors or [{"field": field, "error": message}]
        self.status = status


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def field_path(loc: Sequence[int | str], prefix: str = "") -> str:
    """``("alerts", 0, "labels")`` -> ``alerts[0].labels``.

    A part may be a label name from the body: control characters are written as ``\\xNN``, so a
    name cannot break a log line or an answer.
    """
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue  # pydantic's marker for a bad dict key; the key itself is the previous part
        else:
            text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(part))
            out += f".{text}" if out else text
    return out


def _errors(exc: ValidationError, prefix: str = "", renames: dict[str, str] | None = None) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for err in exc.errors():
        loc = [renames.get(p, p) if isinstance(p, str) and renames else p for p in err["loc"]]
        message = err["msg"]
        if err["type"] == "alertname_missing" or "labels.alertname is required" in message:
            loc.append("alertname")
            message = "alertname is required"
        elif err["type"] == "missing":
            message = "field required"
        out.append({"field": field_path(loc, prefix) or "body", "error": message})
    return out


def _raise_invalid(errors: list[dict[str, str]], what: str) -> None:
    first = errors[0]
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    raise PayloadError(f"{what}: {first['field']}: {first['error']}{more}", first["field"], errors)


def load_json(body: bytes) -> Any:
    """The decoded body; 400 naming ``body`` when it is not UTF-8 JSON."""
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise PayloadError("body is not UTF-8", "body") from None
    except json.JSONDecodeError as exc:
        raise PayloadError(f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", "body") from None
    except (RecursionError, ValueError):
        raise PayloadError("body is not acceptable JSON (too deep or a number too long)", "body") from None


def _alert(values: dict[str, Any], path: str) -> Alert:
    try:
        return Alert.model_validate(values)
    except ValidationError as exc:
        _raise_invalid(_errors(exc, path, _ALERT_WIRE_NAMES), "invalid alert")
        raise  # unreachable: _raise_invalid always raises


def _alerts(items: list[tuple[dict[str, Any], str]], *, check_fingerprint: bool = False,
            ) -> tuple[list[SourceAlert], list[Refused]]:
    """Each alert on its own: one that fails (a label over its limit) is refused alone, the others go on.

    A sender like Alertmanager does not retry a 4xx, so failing the whole delivery would lose
    the real alerts grouped with a bad one. ``check_fingerprint``: a resolved alert must carry
    its labels' Alertmanager fingerprint.
    """
    accepted: list[SourceAlert] = []
    refused: list[Refused] = []
    for values, path in items:
        try:
            alert = _alert(values, path)
        except PayloadError as exc:
            refused.append(Refused(_kept(values), exc.field, exc.message))
            continue
        spoof = _fingerprint_refusal(alert, path) if check_fingerprint else None
        if spoof is not None:
            refused.append(spoof)
        else:
            accepted.append(SourceAlert(alert, path))
    return accepted, refused


def _clean(value: Any, limit: int) -> str:
    """A string that can be recorded: lone surrogates (not UTF-8) replaced, cut to ``limit``."""
    return str(value).encode("utf-8", "replace").decode("utf-8")[:limit]


def _kept(values: Any, source: str | None = None) -> Alert:
    """What can be recorded of a refused alert: label values cut to their limit, nothing else.

    Never raises: whatever the alert held, its refusal is recorded.
    """
    if not isinstance(values, dict):
        values = {}
    if source is not None:
        values = values | {"source": source}
    raw_labels = values.get("labels")
    labels = {_clean(k, 128): _clean(v, 200) for k, v in (raw_labels if isinstance(raw_labels, dict) else {}).items()
              if isinstance(k, str)}
    labels = {k: v for k, v in labels.items() if LABEL_NAME.fullmatch(k)}
    if not labels.get("alertname"):
        labels["alertname"] = "(unknown)"
    return Alert(source=_clean(values.get("source", "generic"), 64) or "generic",
                 fingerprint=_clean(values.get("fingerprint") or "?", 128) or "?", labels=labels)


# Alert's field names, as the webhook bodies spell them.
_ALERT_WIRE_NAMES = {"starts_at": "startsAt", "ends_at": "endsAt", "generator_url": "generatorURL"}


def _ends(value: datetime | None) -> datetime | None:
    # Alertmanager and Grafana send Go's zero time for "not ended".
    return None if value is None or value.year <= 1 else value


# -- Alertmanager and Grafana ---------------------------------------------------


class _Wire(BaseModel):
    # Senders add fields between versions: ignore unknown ones, require what we use.
    model_config = ConfigDict(extra="ignore")


def _require_alertname(labels: dict[str, str]) -> dict[str, str]:
    if not labels.get("alertname"):
        raise PydanticCustomError("alertname_missing", "alertname is required")
    return labels


class AlertmanagerAlert(_Wire):
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: datetime
    endsAt: datetime | None = None
    generatorURL: str | None = None
    fingerprint: str

    _alertname = field_validator("labels")(_require_alertname)


class AlertmanagerWebhook(_Wire):
    """Alertmanager's webhook body, version 4."""

    version: Literal["4"]
    groupKey: str
    status: Literal["firing", "resolved"]
    receiver: str = ""
    alerts: list[AlertmanagerAlert] = Field(min_length=1)
    groupLabels: dict[str, str] = Field(default_factory=dict)
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    externalURL: str = ""
    truncatedAlerts: int = 0


class GrafanaAlert(AlertmanagerAlert):
    silenceURL: str | None = None
    dashboardURL: str | None = None
    panelURL: str | None = None
    ruleUID: str | None = None
    values: dict[str, float | None] | None = None
    valueString: str | None = None


class GrafanaWebhook(_Wire):
    """Grafana alerting's webhook body, version 1."""

    version: Literal["1"]
    groupKey: str
    status: Literal["firing", "resolved"]
    receiver: str = ""
    alerts: list[GrafanaAlert] = Field(min_length=1)
    state: str = ""
    title: str = ""
    externalURL: str = ""
    truncatedAlerts: int = 0


def _validate(model: type[BaseModel], data: Any, what: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        _raise_invalid(_errors(exc), what)


class _AlertmanagerEnvelope(_Wire):
    """The group around the alerts: each alert is then validated on its own (per-alert isolation)."""

    version: Literal["4"]
    groupKey: str
    status: Literal["firing", "resolved"]
    alerts: list[Any] = Field(min_length=1)


class _GrafanaEnvelope(_AlertmanagerEnvelope):
    version: Literal["1"]  # type: ignore[assignment]


def _each_alert(data: Any, envelope: type[_AlertmanagerEnvelope], alert_model: type[AlertmanagerAlert], source: str,
                what: str) -> tuple[list[tuple[Any, str]], list[Refused]]:
    """The envelope must hold (else 400 naming every bad field, the alerts' too); then each alert on its own.

    An alert missing a field (``alertname``, ``fingerprint``, ``status``, ...) is refused alone and
    recorded: Alertmanager and Grafana do not retry a 4xx, so refusing the delivery would lose the
    good alerts grouped with it.
    """
    try:
        hook = envelope.model_validate(data)
    except ValidationError as exc:
        errors = _errors(exc)
        alerts = data.get("alerts") if isinstance(data, dict) else None
        for i, raw in enumerate(alerts if isinstance(alerts, list) else []):
            try:
                alert_model.model_validate(raw)
            except ValidationError as alert_exc:
                errors += _errors(alert_exc, f"alerts[{i}]")
        _raise_invalid(errors, what)
        raise  # unreachable: _raise_invalid always raises
    wires: list[tuple[Any, str]] = []
    refused: list[Refused] = []
    for i, raw in enumerate(hook.alerts):
        path = f"alerts[{i}]"
        try:
            wires.append((alert_model.model_validate(raw), path))
        except ValidationError as exc:
            errors = _errors(exc, path)
            more = f" (+{len(errors) - 1} more: {', '.join(e['field'] for e in errors[1:])})" if len(errors) > 1 else ""
            refused.append(Refused(_kept(raw, source), errors[0]["field"], errors[0]["error"] + more))
    return wires, refused


def parse_alertmanager(body: bytes) -> Parsed:
    wires, bad = _each_alert(load_json(body), _AlertmanagerEnvelope, AlertmanagerAlert, "alertmanager",
                             "invalid Alertmanager webhook")
    alerts, refused = _alerts([
        (
            {
                "source": "alertmanager",
                "fingerprint": wire.fingerprint,
                "status": wire.status,
                "labels": wire.labels,
                "annotations": wire.annotations,
                "starts_at": wire.startsAt,
                "ends_at": _ends(wire.endsAt),
                "generator_url": wire.generatorURL,
            },
            path,
        )
        for wire, path in wires
    ], check_fingerprint=True)
    return _tested(Parsed("alertmanager", alerts, refused=bad + refused))


def parse_grafana(body: bytes) -> Parsed:
    wires, bad = _each_alert(load_json(body), _GrafanaEnvelope, GrafanaAlert, "grafana", "invalid Grafana webhook")
    items: list[tuple[dict[str, Any], str]] = []
    for wire, path in wires:
        extras = {
            "grafana_rule_uid": wire.ruleUID,
            "grafana_dashboard_url": wire.dashboardURL,
            "grafana_panel_url": wire.panelURL,
            "grafana_silence_url": wire.silenceURL,
            "grafana_value_string": wire.valueString,
            "grafana_values": json.dumps(wire.values, sort_keys=True) if wire.values is not None else None,
        }
        annotations = dict(wire.annotations) | {k: v for k, v in extras.items() if v}
        items.append((
            {
                "source": "grafana",
                "fingerprint": wire.fingerprint,
                "status": wire.status,
                "labels": wire.labels,
                "annotations": annotations,
                "starts_at": wire.startsAt,
                "ends_at": _ends(wire.endsAt),
                "generator_url": wire.generatorURL,
            },
            path,
        ))
    alerts, refused = _alerts(items)
    return _tested(Parsed("grafana", alerts, refused=bad + refused))


# -- PagerDuty V3 -----------------------------------------------------------------


class PagerDutyReference(_Wire):
    id: str | None = None
    summary: str | None = None
    html_url: str | None = None


class PagerDutyIncident(_Wire):
    id: str = Field(min_length=1)
    title: str = ""
    status: str | None = None
    incident_key: str | None = None
    created_at: datetime | None = None
    html_url: str | None = None
    number: int | None = None
    urgency: str | None = None
    service: PagerDutyReference | None = None
    priority: PagerDutyReference | None = None
    # The Events API v2 event's custom_details, where a webhook carries them (``custom_details``, or
    # ``body.details`` as the REST API's incident body names them): kept as evidence, never as labels.
    custom_details: dict[str, Any] | None = None
    body: dict[str, Any] | None = None


class PagerDutyEvent(_Wire):
    id: str = Field(min_length=1)
    event_type: str = Field(min_length=1)
    resource_type: str = Field(min_length=1)
    occurred_at: datetime
    data: dict[str, Any] | None = None


class PagerDutyWebhook(_Wire):
    event: PagerDutyEvent


PAGERDUTY_FIRING = frozenset({"incident.triggered", "incident.reopened"})
PAGERDUTY_RESOLVED = frozenset({"incident.resolved"})
PAGERDUTY_PING = "pagey.ping"  # sent by "Send test event" on a webhook subscription

_AM_TITLE = re.compile(r"^\s*\[(?:FIRING(?::\d+)?|RESOLVED)\]\s+(\S+)")
_CAMEL_NAME = re.compile(r"^([A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)+)(?:\s|$)")
_ALERT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_:]*$")
_SERVICE_SUMMARY = re.compile(r"^(?P<service>[^\s()]+)\s+\((?P<namespace>[^\s()/]+)/(?P<env>[^\s()/]+)\)$")
PAGERDUTY_DEFAULT_ALERTNAME = "PagerDutyIncident"
OPSGENIE_DEFAULT_ALERTNAME = "OpsgenieAlert"
DETAILS_ANNOTATION_CHARS = 4000  # custom_details / details kept as one JSON annotation, cut to this


def title_alertname(title: str, default: str = PAGERDUTY_DEFAULT_ALERTNAME) -> str:
    """The alert name a title carries: Alertmanager's ``[FIRING:n] Name`` prefix, or a leading CamelCase word."""
    match = _AM_TITLE.match(title) or _CAMEL_NAME.match(title)
    if match and _ALERT_NAME.fullmatch(match.group(1)):
        return match.group(1)
    return default


def pagerduty_alertname(title: str) -> str:
    return title_alertname(title, PAGERDUTY_DEFAULT_ALERTNAME)


def pagerduty_fingerprint(incident: PagerDutyIncident) -> str:
    key = incident.incident_key
    if not key:
        return incident.id
    return key if len(key) <= 128 else "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def _details_json(details: dict[str, Any]) -> str:
    """Sender key/values as one inert JSON string (an annotation: shown escaped, never substituted)."""
    text = json.dumps(details, sort_keys=True, ensure_ascii=False, default=str)
    return _clean(text, DETAILS_ANNOTATION_CHARS)


# -- label mapping, shared by PagerDuty and Opsgenie ----------------------------------------------------

# What a label mapping may set: any label name Alert accepts, short values.
MappedLabels = dict[str, str]


class LabelMapping(BaseModel):
    """Service id -> labels: how an incident system's service becomes the labels runbooks match on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pagerduty_services: dict[str, MappedLabels] = Field(
        default_factory=dict,
        description="PagerDuty service id (event.data.service.id) -> labels, e.g. "
                    "{alertname: HighErrorRate, namespace: shop, service: checkout}")

    @field_validator("pagerduty_services")
    @classmethod
    def _valid_labels(cls, services: dict[str, MappedLabels]) -> dict[str, MappedLabels]:
        for service_id, labels in services.items():
            for name, value in labels.items():
                if not LABEL_NAME.fullmatch(name) or not isinstance(value, str) or not value or len(value) > 1024:
                    raise ValueError(f"pagerduty_services.{service_id}.{name}: a label needs a name without control "
                                     "characters (1-128) and a value of 1-1024 characters")
        return services


PAGERDUTY_SERVICE_ANNOTATION = "pagerduty.com/service-id"  # the one Backstage's PagerDuty plugin reads
ALERT_NAMESPACE_ANNOTATION = "firebreak.dev/namespace"
ALERTNAME_ANNOTATION = "firebreak.dev/alertname"
RUNBOOK_ANNOTATION = "firebreak.dev/runbook"


def pagerduty_services_from_catalog(entities: Sequence[Any],
                                    runbook_alertnames: dict[str, list[str]] | None = None) -> dict[str, MappedLabels]:
    """PagerDuty service id -> labels, from catalog entities annotated ``pagerduty.com/service-id``.

    ``service`` is the entity's name; ``namespace`` its ``firebreak.dev/namespace`` annotation (the
    alerts' namespace, not Backstage's); ``alertname`` its ``firebreak.dev/alertname`` annotation, else
    the one alert name of the runbook its ``firebreak.dev/runbook`` annotation names (when that runbook
    matches exactly one). An entity without what a label needs gives that label no value: the title
    may still name the alert. Entities that are not mappings are skipped.
    """
    out: dict[str, MappedLabels] = {}
    for entity in entities:
        if not isinstance(entity, dict):
            continue
        meta = entity.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        annotations = meta.get("annotations")
        annotations = annotations if isinstance(annotations, dict) else {}
        service_id, name = annotations.get(PAGERDUTY_SERVICE_ANNOTATION), meta.get("name")
        if not isinstance(service_id, str) or not service_id.strip() or not isinstance(name, str) or not name:
            continue
        labels: MappedLabels = {"service": name}
        namespace = annotations.get(ALERT_NAMESPACE_ANNOTATION)
        if isinstance(namespace, str) and namespace:
            labels["namespace"] = namespace
        alertname = annotations.get(ALERTNAME_ANNOTATION)
        if not isinstance(alertname, str) or not alertname:
            names = (runbook_alertnames or {}).get(str(annotations.get(RUNBOOK_ANNOTATION, "")), [])
            alertname = names[0] if len(names) == 1 else None
        if alertname:
            labels["alertname"] = alertname
        if any(len(value) > 1024 for value in labels.values()):
            continue  # written by other teams: an entity that cannot be a label set maps nothing
        out[service_id.strip()] = labels
    return out


def parse_pagerduty(body: bytes, webhook_id: str | None = None, mapping: LabelMapping | None = None) -> Parsed:
    """See the module docstring: labels from the mapping of ``data.service.id``, else the summary convention."""
    hook: PagerDutyWebhook = _validate(PagerDutyWebhook, load_json(body), "invalid PagerDuty webhook")
    event = hook.event
    if event.event_type == PAGERDUTY_PING:
        return Parsed("pagerduty", [], webhook_id, ignored="a PagerDuty webhook ping: recorded, opens nothing",
                      event_id=event.id, occurred_at=event.occurred_at, test="pagerduty ping")
    if event.resource_type != "incident" or event.event_type not in PAGERDUTY_FIRING | PAGERDUTY_RESOLVED:
        return Parsed("pagerduty", [], webhook_id, ignored=f"event type {event.event_type!r} opens or closes nothing",
                      event_id=event.id, occurred_at=event.occurred_at)
    if event.data is None:
        raise PayloadError("an incident event needs event.data", "event.data")
    try:
        incident = PagerDutyIncident.model_validate(event.data)
    except ValidationError as exc:
        _raise_invalid(_errors(exc, "event.data"), "invalid PagerDuty incident")
        raise
    resolved = event.event_type in PAGERDUTY_RESOLVED
    labels: dict[str, str] = {"alertname": pagerduty_alertname(incident.title), "pagerduty_incident": incident.id}
    derived = {"labels.alertname": "event.data.title", "labels.pagerduty_incident": "event.data.id"}
    service = incident.service
    service_id = service.id if service and service.id else None
    mapped = (mapping or LabelMapping()).pagerduty_services.get(service_id) if service_id else None
    if mapped is None and service and service.summary:
        # No mapping: the older convention, a summary written "NAME (NAMESPACE/ENV)".
        match = _SERVICE_SUMMARY.match(service.summary.strip())
        parts = match.groupdict() if match else {"service": service.summary.strip()}
        for name, value in parts.items():
            labels[name] = value
            derived[f"labels.{name}"] = "event.data.service.summary"
    if service_id:
        labels["pagerduty_service"] = service_id
        derived["labels.pagerduty_service"] = "event.data.service.id"
    if incident.urgency:
        labels["urgency"] = incident.urgency
        derived["labels.urgency"] = "event.data.urgency"
        severity = {"high": "critical", "low": "warning"}.get(incident.urgency)
        if severity:
            labels["severity"] = severity
            derived["labels.severity"] = "event.data.urgency"
    if incident.priority and incident.priority.summary:
        labels["priority"] = incident.priority.summary
        derived["labels.priority"] = "event.data.priority.summary"
    if mapped is not None:
        # The operator's word about this service wins over what is read from the incident's text, but
        # for one thing: an incident Alertmanager raised names its own alert ("[FIRING:1] Name ...").
        named_by_alertmanager = _AM_TITLE.match(incident.title) is not None and labels["alertname"] != \
            PAGERDUTY_DEFAULT_ALERTNAME
        for name, value in mapped.items():
            if name == "alertname" and named_by_alertmanager:
                continue
            labels[name] = value
            derived[f"labels.{name}"] = "event.data.service.id"
    annotations = {
        "summary": incident.title,
        "pagerduty_url": incident.html_url or "",
        "pagerduty_event": event.id,
        "pagerduty_incident_number": str(incident.number) if incident.number is not None else "",
        "pagerduty_service_name": service.summary if service and service.summary else "",
    }
    details = incident.custom_details
    if details is None and incident.body and isinstance(incident.body.get("details"), dict):
        details = incident.body["details"]
    if details:
        annotations["pagerduty_custom_details"] = _details_json(details)
    values = {
        "source": "pagerduty",
        "fingerprint": pagerduty_fingerprint(incident),
        "status": "resolved" if resolved else "firing",
        "labels": labels,
        "annotations": {k: v for k, v in annotations.items() if v},
        "starts_at": incident.created_at,
        "ends_at": event.occurred_at if resolved else None,
        "generator_url": incident.html_url,
    }
    derived |= {"fingerprint": "event.data.incident_key", "starts_at": "event.data.created_at",
                "ends_at": "event.occurred_at", "generator_url": "event.data.html_url"}
    try:
        alert = Alert.model_validate(values)
    except ValidationError as exc:
        errors = []
        for err in _errors(exc):
            err["field"] = derived.get(err["field"], "event.data." + err["field"])
            errors.append(err)
        _raise_invalid(errors, "invalid PagerDuty incident")
        raise
    hint = ""
    if mapped is None:
        shown = f" ({service.summary!r})" if service and service.summary else ""
        hint = (f"; PagerDuty service {service_id!r}{shown} is not mapped to labels (map it in the API's "
                f"pagerduty_services, or annotate its catalog entity {PAGERDUTY_SERVICE_ANNOTATION})"
                if service_id else "; the incident names no service (event.data.service.id) to map to labels")
    return Parsed("pagerduty", [SourceAlert(alert, "event.data", derived, missing_at="event.data.service.id",
                                            unrouted_hint=hint)],
                  webhook_id, event_id=event.id, occurred_at=event.occurred_at)


# -- Opsgenie outgoing webhook ------------------------------------------------------------------------


class OpsgenieAlert(_Wire):
    alertId: str = Field(min_length=1)
    alias: str | None = None
    message: str = ""
    description: str | None = None
    tags: list[str] = Field(default_factory=list)
    details: dict[str, Any] = Field(default_factory=dict)
    entity: str | None = None
    source: str | None = None
    priority: str | int | None = None
    tinyId: str | None = None
    createdAt: int | None = None  # milliseconds since the epoch
    updatedAt: int | None = None  # nanoseconds since the epoch


class OpsgenieWebhook(_Wire):
    """Opsgenie's outgoing webhook (a Webhook integration's "post to url" actions)."""

    action: str = Field(min_length=1)
    alert: OpsgenieAlert
    integrationId: str | None = None
    integrationName: str | None = None


OPSGENIE_FIRING = "Create"
OPSGENIE_RESOLVED = "Close"
OPSGENIE_ACKNOWLEDGED = "Acknowledge"
_TAG_LABEL = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_./-]{0,127})[:=](?P<value>.{1,1024})$", re.DOTALL)


def _epoch(value: int | None) -> datetime | None:
    """Opsgenie's times: ``createdAt`` in milliseconds, ``updatedAt`` in nanoseconds."""
    if value is None or value <= 0:
        return None
    seconds = value / 1e9 if value > 10**15 else value / 1e3
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


def opsgenie_fingerprint(alert: OpsgenieAlert) -> str:
    key = alert.alias or alert.alertId
    return key if len(key) <= 128 else "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_opsgenie(body: bytes) -> Parsed:
    """Create -> firing, Close -> resolved, Acknowledge -> recorded (``Parsed.note``), anything else ignored.

    Labels, by the rules PagerDuty's follow: the alert's own key/values (``details`` entries whose
    value is a string, number or boolean; tags written ``name:value`` or ``name=value``; details win
    over tags); ``alertname`` from them, else the message's (``[FIRING:n] Name`` or a leading CamelCase
    word), else ``OpsgenieAlert``; ``priority`` (``P1``...). Plain tags, every detail (JSON), the
    description, entity, source and ids become annotations.
    """
    hook: OpsgenieWebhook = _validate(OpsgenieWebhook, load_json(body), "invalid Opsgenie webhook")
    wire = hook.alert
    # The same for every retry of one action on one alert; a hash, as the sender's ids reach logs.
    delivery_key = f"{wire.alertId}\x00{hook.action}\x00{wire.updatedAt or wire.createdAt or 0}"
    delivery_id = "opsgenie-" + hashlib.sha256(delivery_key.encode("utf-8", "replace")).hexdigest()[:32]
    if hook.action not in (OPSGENIE_FIRING, OPSGENIE_RESOLVED, OPSGENIE_ACKNOWLEDGED):
        return Parsed("opsgenie", [], delivery_id, ignored=f"Opsgenie action {hook.action!r} opens or closes nothing")
    labels: dict[str, str] = {}
    derived: dict[str, str] = {}
    plain_tags: list[str] = []
    for i, tag in enumerate(wire.tags):
        match = _TAG_LABEL.match(tag.strip()) if isinstance(tag, str) else None
        if match is None:
            plain_tags.append(str(tag))
            continue
        labels[match["name"]] = match["value"]
        derived[f"labels.{match['name']}"] = f"alert.tags[{i}]"
    for name, value in wire.details.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (int, float)):
            value = str(value)
        if isinstance(value, str) and value and len(value) <= 1024 and LABEL_NAME.fullmatch(name):
            labels[name] = value
            derived[f"labels.{name}"] = f"alert.details.{field_path([name])}"
    if not labels.get("alertname"):
        labels["alertname"] = title_alertname(wire.message, OPSGENIE_DEFAULT_ALERTNAME)
        derived["labels.alertname"] = "alert.message"
    if wire.priority is not None and "priority" not in labels:
        labels["priority"] = wire.priority if isinstance(wire.priority, str) else f"P{wire.priority}"
        derived["labels.priority"] = "alert.priority"
    annotations = {
        "summary": wire.message,
        "description": wire.description or "",
        "opsgenie_alert_id": wire.alertId,
        "opsgenie_tiny_id": wire.tinyId or "",
        "opsgenie_entity": wire.entity or "",
        "opsgenie_source": wire.source or "",
        "opsgenie_integration": hook.integrationName or "",
        "opsgenie_tags": ", ".join(plain_tags),
        "opsgenie_details": _details_json(wire.details) if wire.details else "",
    }
    resolved = hook.action == OPSGENIE_RESOLVED
    values = {
        "source": "opsgenie",
        "fingerprint": opsgenie_fingerprint(wire),
        "status": "resolved" if resolved else "firing",
        "labels": labels,
        "annotations": {k: v for k, v in annotations.items() if v},
        "starts_at": _epoch(wire.createdAt),
        "ends_at": _epoch(wire.updatedAt) if resolved else None,
    }
    derived |= {"fingerprint": "alert.alias" if wire.alias else "alert.alertId", "starts_at": "alert.createdAt",
                "ends_at": "alert.updatedAt"}
    try:
        alert = Alert.model_validate(values)
    except ValidationError as exc:
        errors = []
        for err in _errors(exc):
            err["field"] = derived.get(err["field"], "alert." + err["field"])
            errors.append(err)
        _raise_invalid(errors, "invalid Opsgenie alert")
        raise
    hint = "" if "namespace" in labels and "service" in labels else (
        "; an Opsgenie alert's labels come from its details and name:value tags (add them with the "
        "integration's 'Add Alert Details to Payload')")
    parsed = Parsed("opsgenie", [SourceAlert(alert, "alert", derived, missing_at="alert.details",
                                             unrouted_hint=hint)], delivery_id)
    if hook.action == OPSGENIE_ACKNOWLEDGED:
        parsed.note = "Opsgenie alert acknowledged: recorded; the incident goes on unchanged"
    return parsed


# -- Firebreak's own format --------------------------------------------------------

_ALERT = TypeAdapter(Alert)


def parse_generic(body: bytes) -> Parsed:
    """Each alert on its own, as for Alertmanager: a bad one is refused alone, the others go on.

    Only when no alert of the list can be read at all is the whole body a 400 naming every bad field.
    """
    data = load_json(body)
    if not isinstance(data, list):
        raise PayloadError("body must be a JSON list of alerts", "body")
    if not data:
        raise PayloadError("body holds no alerts", "body")
    accepted: list[SourceAlert] = []
    refused: list[Refused] = []
    errors: list[dict[str, str]] = []
    unreadable = 0
    for i, item in enumerate(data):
        path = f"[{i}]"
        try:
            # The API is strict (an unknown field is refused, named), unlike the Temporal payloads it becomes.
            alert = _ALERT.validate_python(item, extra="forbid")
        except ValidationError as exc:
            alert_errors = _errors(exc, path)
            errors += alert_errors
            unreadable += 1
            more = f" (+{len(alert_errors) - 1} more)" if len(alert_errors) > 1 else ""
            refused.append(Refused(_kept(item), alert_errors[0]["field"], alert_errors[0]["error"] + more))
            continue
        spoof = _fingerprint_refusal(alert, path)
        if spoof is not None:
            refused.append(spoof)
        else:
            accepted.append(SourceAlert(alert, path))
    if unreadable == len(data):
        _raise_invalid(errors, "invalid alert list")
    return Parsed("generic", accepted, refused=refused)
