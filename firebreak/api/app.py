"""The intake and read API (FastAPI).

Intake, each answered 202 with the incidents the alerts joined:

- ``POST /v1/alerts/alertmanager``: Alertmanager webhook v4 (bearer token);
- ``POST /v1/alerts/pagerduty``: PagerDuty V3 webhook (``X-PagerDuty-Signature``;
  each event processed once by its ``event.id``, only inside the freshness window);
- ``POST /v1/alerts/grafana``: Grafana alerting webhook (``X-Grafana-Alerting-Signature``
  over the timestamp header, each signed request taken once; a bearer token, if sent, must match too);
- ``POST /v1/alerts/opsgenie``: Opsgenie outgoing webhook (bearer, sent as the integration's
  custom header ``Authorization: Bearer <token>``): Create opens or joins, Close resolves,
  Acknowledge is recorded and changes nothing;
- ``POST /v1/alerts``: Firebreak's own format, a JSON list of ``Alert`` (bearer).

Read: ``GET /v1/incidents``, ``GET /v1/incidents/{id}``, ``GET /v1/unrouted``
(bearer unless ``read_requires_token`` is off), ``GET /healthz``; OpenAPI at
``/openapi.json`` and ``/docs``.

Approvals: ``POST /v1/incidents/{id}/approvals``, a signed ``Approval``,
authenticated by the approver's signature (no token): 200 counted, 409 refused,
202 queued as a signal (no worker answered: judged later, not counted yet), 503
with ``Retry-After`` when Temporal could not take it, ``X-Firebreak-Delivery``
saying ``none`` (not delivered) or ``unknown`` (it may have reached the
incident: read its approvals before sending it again).

Answers: 202 accepted; 400 not JSON or wrong shape; 401 bad or missing token
or signature; 413 body over ``max_body_bytes``; 422 every alert refused by a
runbook; 503 Temporal unreachable (with ``Retry-After``; nothing acknowledged
that was not delivered). Each error is ``{"error", "field", "errors"}``.
The bodies are read raw, before any parsing, because signatures cover the
exact bytes.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowQueryFailedError, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from firebreak.api import auth
from firebreak.api.approvals import ApprovalGate
from firebreak.api.delivery import PAGERDUTY_FUTURE_S, Accepted, ErrorBody, Intake, error_response
from firebreak.api.gateway import ClientFactory, TemporalGateway, TemporalUnavailable
from firebreak.api.retries import FILE_NAME as RETRIES_FILE
from firebreak.api.retries import DeliveryLog
from firebreak.api.settings import ApiSettings, load_catalog_entities
from firebreak.api.tracing import RequestSpans, native_request_spans
from firebreak.api.sources import (
    AlertmanagerWebhook,
    GrafanaWebhook,
    LabelMapping,
    OpsgenieWebhook,
    PagerDutyWebhook,
    PayloadError,
    pagerduty_services_from_catalog,
    parse_alertmanager,
    parse_generic,
    parse_grafana,
    parse_opsgenie,
    parse_pagerduty,
)
from firebreak.api.unrouted import FILE_NAME as UNROUTED_FILE
from firebreak.api.unrouted import UnroutedLog
from firebreak.contracts import Alert, ApprovalOutcome, IncidentStatus, Phase
from firebreak.incidents import WorkerDown, read_status
from firebreak.incidents import submit_approval as deliver_approval
from firebreak.listing import Filters
from firebreak.receipts import ensure_intake_key, intake_signer
from firebreak.replay_cache import ReplayCache
from firebreak.runbook import Runbook, load_runbooks
from firebreak.telemetry import temporal_interceptors
from firebreak.temporal import PHASE, RUNBOOK, SERVICE, SEVERITY

log = logging.getLogger("firebreak.api")

_PLAIN = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")  # ids and filter values: never quoted into a query otherwise
_RUN_ID = re.compile(r"^[0-9a-fA-F-]{1,64}$")
_WEBHOOK_ID = re.compile(r"^[\x21-\x7e]{1,200}$")
RETRY_AFTER_S = "5"
GRAFANA_SEEN_FILE = "grafana_signatures.jsonl"
GRAFANA_UNBOUNDED_MEMORY_S = 7 * 24 * 3600  # how long a signature is remembered when the skew check is off
# On an approval's answer: "queued" (202, as a signal), "none" (503, not delivered), "unknown" (503, may
# have reached the incident: look it up before sending it again).
DELIVERY_HEADER = "X-Firebreak-Delivery"


class ApiError(Exception):
    def __init__(self, status: int, error: str, field: str | None = None,
                 errors: list[dict[str, str]] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.field, self.errors, self.headers = status, error, field, errors, headers


class IncidentSummary(BaseModel):
    incident_id: str
    run_id: str
    execution_status: str
    phase: str | None = None
    service: str | None = None
    severity: str | None = None
    runbook: str | None = None
    started_at: datetime | None = None
    closed_at: datetime | None = None


class IncidentList(BaseModel):
    incidents: list[IncidentSummary]
    query: str


class UnroutedList(BaseModel):
    items: list[dict[str, Any]]
    count: int


class Health(BaseModel):
    status: str
    temporal: str
    runbooks: int


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "not JSON, or not the source's schema (the field is named)",
        401: "missing or wrong bearer token or signature",
        413: "body larger than the configured limit",
        422: "every alert was refused by a runbook's label validation",
        503: "Temporal unreachable; retry later",
    }.items()
}


# -- request pieces ---------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The raw bytes, at most ``limit``: checked on Content-Length first, then while streaming."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length is not a number", "headers.content-length")
        if int(declared) > limit:
            raise ApiError(413, f"body is {declared} bytes; the limit is {limit}", "body")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body exceeds the limit of {limit} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)


def _auth(check: Callable[[], None]) -> None:
    try:
        check()
    except auth.AuthError as exc:
        raise ApiError(401, str(exc), exc.field, headers={"WWW-Authenticate": "Bearer"}) from None


def create_app(
    settings: ApiSettings,
    client_factory: ClientFactory | None = None,
    *,
    runbooks: list[Runbook] | None = None,
) -> FastAPI:
    """The API. ``client_factory`` makes the Temporal client on first use (default: ``firebreak.temporal.connect``)."""
    if client_factory is None:
        from firebreak.temporal import connect

        temporal_settings = settings.temporal

        async def default_factory() -> Client:
            # Traced: an alert's trace goes on from this request into the workflow and its activities.
            return await connect(temporal_settings, temporal_interceptors())

        client_factory = default_factory
    if runbooks is None:
        if settings.runbooks_dir is None:
            from firebreak.runbook import default_runbook_dir

            runbooks = load_runbooks(default_runbook_dir())
        else:
            runbooks = load_runbooks(settings.runbooks_dir)

    label_mapping = intake_label_mapping(settings, runbooks)
    gateway = TemporalGateway(client_factory, settings.temporal_timeout_s)
    unrouted_log = UnroutedLog(settings.api_dir / UNROUTED_FILE)
    # Event ids are remembered for at least the freshness window: inside it nothing counts twice.
    retries = DeliveryLog(settings.api_dir / RETRIES_FILE,
                          max(settings.pagerduty_dedup_ttl_s, settings.pagerduty_max_age_s + PAGERDUTY_FUTURE_S))
    grafana_seen = ReplayCache(settings.api_dir / GRAFANA_SEEN_FILE)
    intake = Intake(runbooks, gateway, unrouted_log, settings.temporal.task_queue,
                    receipt=intake_signer(ensure_intake_key(settings.state_dir)))
    approvals = ApprovalGate(settings.roster or settings.state_dir / "roster.yaml",
                             arrival_key=ensure_intake_key(settings.state_dir))

    app = FastAPI(
        title="Firebreak API",
        version="1",
        description="Alert intake (Alertmanager, PagerDuty, Grafana, Opsgenie, Firebreak's own format) and incident "
                    "read API.",
    )
    if not native_request_spans():
        app.add_middleware(RequestSpans)  # the intake's server span: the root of the incident's trace
    app.state.settings = settings
    app.state.gateway = gateway
    app.state.runbooks = runbooks
    app.state.label_mapping = label_mapping

    # -- errors: always {"error", "field", "errors"} -----------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.field, exc.errors, exc.headers)

    @app.exception_handler(PayloadError)
    async def _payload_error(_: Request, exc: PayloadError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.field, exc.errors)

    @app.exception_handler(TemporalUnavailable)
    async def _unavailable(_: Request, exc: TemporalUnavailable) -> JSONResponse:
        log.warning("503: %s", exc)
        return error_response(503, f"Temporal is unreachable; nothing was accepted, retry later ({exc})",
                              headers={"Retry-After": RETRY_AFTER_S})

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"]), "error": e["msg"]} for e in exc.errors()]
        first = errors[0] if errors else {"field": "request", "error": "invalid request"}
        return error_response(400, f"{first['field']}: {first['error']}", first["field"], errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # The type only: an exception message may quote request data.
        log.error("unexpected %s while handling a request", type(exc).__name__, exc_info=exc)
        return error_response(500, f"internal error ({type(exc).__name__}); nothing was accepted")

    def require_bearer(request: Request) -> None:
        _auth(lambda: auth.check_bearer(request.headers.get("authorization"), settings.intake_tokens))

    def require_reader(request: Request) -> None:
        if settings.read_requires_token:
            require_bearer(request)

    # -- intake -----------------------------------------------------------------

    @app.post("/v1/alerts/alertmanager", status_code=202, response_model=Accepted, responses=ERRORS,
              dependencies=[Depends(require_bearer)], summary="Alertmanager webhook (version 4)")
    async def alertmanager(request: Request) -> Response:
        body = await read_body(request, settings.max_body_bytes)
        return await intake.accept(parse_alertmanager(body))

    @app.post("/v1/alerts/pagerduty", status_code=202, response_model=Accepted, responses=ERRORS,
              summary="PagerDuty V3 webhook (X-PagerDuty-Signature)")
    async def pagerduty(request: Request) -> Response:
        body = await read_body(request, settings.max_body_bytes)
        _auth(lambda: auth.check_pagerduty_signature(
            request.headers.get("x-pagerduty-signature"), body, settings.pagerduty_secrets))
        webhook_id = request.headers.get("x-webhook-id")
        if webhook_id is not None and not _WEBHOOK_ID.fullmatch(webhook_id):
            raise ApiError(400, "X-Webhook-Id must be 1-200 printable characters", "headers.x-webhook-id")
        return await intake.accept_pagerduty(parse_pagerduty(body, webhook_id, label_mapping), retries,
                                             max_age_s=settings.pagerduty_max_age_s)

    @app.post("/v1/alerts/opsgenie", status_code=202, response_model=Accepted, responses=ERRORS,
              dependencies=[Depends(require_bearer)],
              summary="Opsgenie outgoing webhook (bearer token in the integration's custom headers)")
    async def opsgenie(request: Request) -> Response:
        body = await read_body(request, settings.max_body_bytes)
        return await intake.accept(parse_opsgenie(body))

    @app.post("/v1/alerts/grafana", status_code=202, response_model=Accepted, responses=ERRORS,
              summary="Grafana alerting webhook (bearer and/or X-Grafana-Alerting-Signature)")
    async def grafana(request: Request) -> Response:
        authorization = request.headers.get("authorization")
        signature = request.headers.get("x-grafana-alerting-signature")
        if authorization is None and signature is None:
            raise ApiError(401, "needs X-Grafana-Alerting-Signature over a timestamp", "headers.authorization",
                           headers={"WWW-Authenticate": "Bearer"})
        if authorization is not None:
            require_bearer(request)  # optional, but a token that is sent must be right
        body = await read_body(request, settings.max_body_bytes)
        try:
            # A bearer token alone, or a signature without a timestamp, could be replayed for ever: refused.
            sent_at = auth.check_grafana_signature(
                signature, request.headers.get(settings.grafana_timestamp_header), body, settings.grafana_secrets,
                max_skew_s=settings.grafana_max_skew_s, timestamp_header=settings.grafana_timestamp_header)
        except auth.AuthError as exc:
            # Signed by Grafana's secret, or sent with a good token: keep what it carried, with why it was refused.
            if exc.authentic or authorization is not None:
                try:
                    await intake.record_refused(parse_grafana(body), exc.field, str(exc))
                except PayloadError:
                    pass  # answered 401 all the same; nothing of it could be recorded
            raise ApiError(401, str(exc), exc.field, headers={"WWW-Authenticate": "Bearer"}) from None
        parsed = parse_grafana(body)
        skew = settings.grafana_max_skew_s
        expires = sent_at + skew if skew is not None else time.time() + GRAFANA_UNBOUNDED_MEMORY_S
        # The signature is a MAC of timestamp and body: the same one twice is the same request twice.
        key = f"grafana:{(signature or '').strip().lower()}"
        if not grafana_seen.check_and_add(key, expires, time.time(), 0.0):
            return await intake.duplicate(parsed, "headers.x-grafana-alerting-signature",
                                          "this signed Grafana request (same timestamp, same body) was already "
                                          "received: a replay")
        try:
            response = await intake.accept(parsed)
        except BaseException:
            grafana_seen.discard(key)  # nothing was accepted (503, 500): the sender's retry must be processed
            raise
        if response.status_code >= 500:
            grafana_seen.discard(key)
        return response

    @app.post("/v1/alerts", status_code=202, response_model=Accepted, responses=ERRORS,
              dependencies=[Depends(require_bearer)], summary="Firebreak's own format: a JSON list of Alert")
    async def generic(request: Request) -> Response:
        body = await read_body(request, settings.max_body_bytes)
        return await intake.accept(parse_generic(body))

    # -- read ---------------------------------------------------------------------

    @app.get("/v1/incidents", response_model=IncidentList, dependencies=[Depends(require_reader)],
             responses={k: v for k, v in ERRORS.items() if k in (400, 401, 503)})
    async def list_incidents(
        phase: Phase | None = None,
        service: str | None = Query(default=None, pattern=_PLAIN.pattern),
        runbook: str | None = Query(default=None, pattern=_PLAIN.pattern),
        open: bool | None = Query(default=None, description="true: running only; false: closed only"),  # noqa: A002
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> IncidentList:
        # Values are pattern-checked above (and again by Filters), so quoting them cannot change the query.
        query = Filters(phase=phase, service=service, runbook=runbook, open=open).query()

        async def fetch(client: Client) -> list[IncidentSummary]:
            out = []
            async for wf in client.list_workflows(query, limit=limit):
                attrs = wf.typed_search_attributes
                out.append(IncidentSummary(
                    incident_id=wf.id, run_id=wf.run_id,
                    execution_status=wf.status.name if isinstance(wf.status, WorkflowExecutionStatus) else "UNKNOWN",
                    phase=attrs.get(PHASE), service=attrs.get(SERVICE), severity=attrs.get(SEVERITY),
                    runbook=attrs.get(RUNBOOK), started_at=wf.start_time, closed_at=wf.close_time,
                ))
            return out

        return IncidentList(incidents=await gateway.call(fetch), query=query)

    @app.get("/v1/incidents/{incident_id}", response_model=IncidentStatus, dependencies=[Depends(require_reader)],
             responses={**{k: v for k, v in ERRORS.items() if k in (401, 503)},
                        404: {"model": ErrorBody, "description": "no such incident"},
                        502: {"model": ErrorBody, "description": "the workflow could not answer"}})
    async def incident_status(
        incident_id: str,
        run_id: str | None = Query(default=None, description="an earlier run; default the latest"),
    ) -> Response:
        if not _PLAIN.fullmatch(incident_id):
            raise ApiError(400, "incident id must match [A-Za-z0-9._:-]{1,200}", "path.incident_id")
        if run_id is not None and not _RUN_ID.fullmatch(run_id):
            raise ApiError(400, "run_id is not a run id", "query.run_id")

        async def query(client: Client) -> tuple[IncidentStatus, str]:
            return await read_status(client.get_workflow_handle(incident_id, run_id=run_id))

        try:
            status, source = await gateway.call(query)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise ApiError(404, f"no incident {incident_id!r}", "path.incident_id") from None
            raise
        except (WorkflowQueryFailedError, WorkerDown) as exc:
            raise ApiError(502, f"the incident's workflow could not answer its status query: {exc}") from None
        return JSONResponse(status.model_dump(mode="json"), headers={"X-Firebreak-Source": source})

    @app.post("/v1/incidents/{incident_id}/approvals", response_model=ApprovalOutcome,
              responses={**{k: v for k, v in ERRORS.items() if k in (400, 401, 503)},
                         202: {"description": "no worker answered: recorded as a signal, judged later"},
                         404: {"model": ErrorBody, "description": "no such incident"},
                         409: {"model": ErrorBody, "description": "the incident refused the approval"}},
              summary="An approval or rejection, authenticated by the approver's own signature")
    async def submit_approval(incident_id: str, request: Request) -> Response:
        if not _PLAIN.fullmatch(incident_id):
            raise ApiError(400, "incident id must match [A-Za-z0-9._:-]{1,200}", "path.incident_id")
        approval = approvals.parse(await read_body(request, 64 * 1024), incident_id)
        _auth(lambda: approvals.authenticate(approval))
        arrival = approvals.arrival(approval)  # signed now: the time that decides whether it came in time

        sent: list[bool] = []  # set once the approval itself is on its way to Temporal

        async def update(client: Client) -> ApprovalOutcome | None:
            return await deliver_approval(client.get_workflow_handle(incident_id), approval, arrival=arrival,
                                          sending=lambda: sent.append(True))

        try:
            outcome = await gateway.call(update)
        except TemporalUnavailable as exc:
            # Never "nothing was accepted" once the approval went out: Temporal may have recorded it.
            log.warning("approval 503 (%s): %s", "outcome unknown" if sent else "not delivered", exc)
            if sent:
                raise ApiError(503, "Temporal stopped answering while the approval was being delivered: it may "
                               f"have reached the incident. Read GET /v1/incidents/{incident_id} (approvals) "
                               f"before sending it again ({exc})",
                               headers={"Retry-After": RETRY_AFTER_S, DELIVERY_HEADER: "unknown"}) from None
            raise ApiError(503, f"Temporal is unreachable; the approval was not delivered, retry later ({exc})",
                           headers={"Retry-After": RETRY_AFTER_S, DELIVERY_HEADER: "none"}) from None
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise ApiError(404, f"no open incident {incident_id!r}", "path.incident_id") from None
            raise
        except WorkflowUpdateFailedError as exc:
            raise ApiError(409, f"refused: {exc.cause.message if exc.cause else exc}") from None
        if outcome is None:
            # No worker answered: the approval is in the incident's history as a signal, judged by the
            # same path as soon as a worker runs it again.
            return JSONResponse({"queued": True, "via": "signal",
                                 "detail": "no worker answered within 2s: the approval was recorded in the "
                                 "incident's history as a signal and will be judged when a worker picks the "
                                 "incident up; it has not counted yet"},
                                status_code=202, headers={DELIVERY_HEADER: "queued"})
        return JSONResponse(outcome.model_dump(mode="json"), status_code=200 if outcome.counted else 409)

    @app.get("/v1/unrouted", response_model=UnroutedList, dependencies=[Depends(require_reader)],
             responses={k: v for k, v in ERRORS.items() if k in (400, 401)})
    async def list_unrouted(
        limit: int = Query(default=100, ge=1, le=10_000),
        kind: str | None = Query(default=None, pattern="^(unrouted|refused|test|event)$"),
    ) -> UnroutedList:
        items = await unrouted_log.tail(limit, kind)
        return UnroutedList(items=items, count=len(items))

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        healthy = await gateway.healthy()
        return Health(status="ok", temporal="ok" if healthy else "unreachable", runbooks=len(runbooks or []))

    _document_bodies(app)
    return app


def intake_label_mapping(settings: ApiSettings, runbooks: list[Runbook]) -> LabelMapping:
    """The PagerDuty service mapping: the catalog files' annotated entities, then the configured services over them."""
    alertnames = {book.name: list(book.match.alertnames) for book in runbooks}
    from_catalog = pagerduty_services_from_catalog(load_catalog_entities(settings.catalog_files), alertnames)
    return LabelMapping(pagerduty_services=from_catalog | settings.label_mapping.pagerduty_services)


# -- OpenAPI: the raw-body endpoints still document their schemas ------------------------

_BODIES: dict[str, Any] = {
    "/v1/alerts/alertmanager": AlertmanagerWebhook,
    "/v1/alerts/pagerduty": PagerDutyWebhook,
    "/v1/alerts/grafana": GrafanaWebhook,
    "/v1/alerts/opsgenie": OpsgenieWebhook,
    "/v1/alerts": list[Alert],
}


def _document_bodies(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in _BODIES.items():
            body_schema = TypeAdapter(model).json_schema(ref_template="#/components/schemas/{model}")
            components.update(body_schema.pop("$defs", {}))
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": body_schema}},
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

