"""The credential broker: the only holder of the key that signs target credentials.

The worker authenticates with its bootstrap bearer credential and asks for one
token per call: one audience, one verb on one resource, a few minutes at most.
Reads are issued on the runbook's declaration; writes only with signed
approvals that the broker verifies itself (see :mod:`firebreak.broker.rules`).
Every mint, denial, revocation, freeze and thaw goes to the hash-chained audit
log. A token is returned once, to the caller, and is never logged or stored.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from firebreak import signing
from firebreak.broker.metrics import BrokerMetrics
from firebreak.privileges_cli import REPO_LOCK
from firebreak.broker.audit import AuditLog, checkpoint_at_shutdown
from firebreak.broker.models import ApprovalCheckRequest, FreezeRequest, MintRequest, MintResponse, RevokeRequest
from firebreak.broker.rules import Decision, Denied, authorize_read, authorize_write, judge_approval
from firebreak.broker.state import (
    DurableState,
    GrantRecord,
    broker_dir,
    load_or_create_signing_key,
    read_or_create_secret,
)
from firebreak.config import AGENT
from firebreak.contracts import ApprovalCheck
from firebreak.receipts import load_intake_public_keys
from firebreak.roster import RosterSource
from firebreak.broker.runbooks import RunbookArchive
from firebreak.runbook import Runbook, default_runbook_dir

log = logging.getLogger(__name__)

ISSUER = "firebreak-broker"
AGENT_TOKEN_ENV = "FIREBREAK_BROKER_TOKEN"
ADMIN_TOKEN_ENV = "FIREBREAK_BROKER_ADMIN_TOKEN"


class BrokerHTTPError(Exception):
    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason = status, error, reason


@dataclass
class BrokerConfig:
    state_dir: Path
    roster_path: Path
    runbooks_dir: Path
    agent_token: str | None = None
    admin_token: str | None = None
    issuer: str = ISSUER
    intake_state_dir: Path | None = None  # where the intake's receipt key lives (default: state_dir)
    privileges_lock: Path | None = REPO_LOCK  # the reviewed baseline; mints outside it are counted
    credential_max_age_s: float = 90 * 86400  # the agent's bootstrap credential must be rotated by then


class Broker:
    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.dir = broker_dir(config.state_dir)
        self.state = DurableState(self.dir)
        self.key = load_or_create_signing_key(self.dir / "signing-key.pem")
        self.kid = signing.key_id(self.key)
        self.agent_token = read_or_create_secret(self.dir / "agent-token", AGENT_TOKEN_ENV, config.agent_token)
        self.admin_token = read_or_create_secret(self.dir / "admin-token", ADMIN_TOKEN_ENV, config.admin_token)
        self.audit = AuditLog(self.dir / "audit.jsonl", signing_key=self.key, kid=self.kid)
        # Every version ever loaded stays available: an open incident finishes on the version it pinned.
        self.archive = RunbookArchive.load(config.runbooks_dir, self.dir / "runbooks")
        self.runbooks: dict[str, Runbook] = self.archive.current
        self.roster = RosterSource(config.roster_path)
        self.metrics = BrokerMetrics(config.privileges_lock)
        # One lock around every decision that reads or changes grants, nonces or
        # the freeze flag: a mint can never slip in between "frozen?" and "issue".
        self.lock = threading.Lock()

    # -- mint --

    def mint(self, req: MintRequest) -> MintResponse:
        with self.lock:
            try:
                try:
                    decision = self._decide(req)
                except Denied:
                    raise
                except Exception as exc:
                    # Fail closed, and on the record: an unexpected error is a denial too.
                    log.exception("mint decision failed")
                    raise Denied(f"internal error while deciding ({type(exc).__name__})") from None
            except Denied as exc:
                self.audit.append(
                    "deny",
                    decision="denied",
                    reason=exc.reason,
                    audience=req.audience,
                    scope={"verb": req.verb, "resource": req.resource},
                    subject=AGENT,
                    workflow_id=req.workflow_id,
                    run_id=req.run_id,
                    step_id=req.step_id,
                    approvers=exc.approvers,
                )
                # 423 Locked: the kill switch holds this, it does not refuse it; the caller waits.
                self.metrics.denied(exc.reason)
                raise BrokerHTTPError(423 if exc.frozen else 403, "frozen" if exc.frozen else "denied",
                                      exc.reason) from None
            token, claims = signing.mint_token(
                self.key,
                self.kid,
                issuer=self.config.issuer,
                subject=AGENT,
                audience=req.audience,
                verb=req.verb,
                resource=req.resource,
                ttl_s=decision.ttl_s,
                workflow_id=req.workflow_id,
                run_id=req.run_id,
                activity_id=req.activity_id,
                step_id=req.step_id,
                plan_hash=decision.plan_hash,
                extra=decision.claims,
            )
            grant_id = claims["jti"]
            self.state.add_grant(
                GrantRecord(
                    grant_id=grant_id,
                    exp=claims["exp"],
                    audience=req.audience,
                    verb=req.verb,
                    resource=req.resource,
                    workflow_id=req.workflow_id,
                    run_id=req.run_id,
                    step_id=req.step_id,
                    subject=AGENT,
                    approvers=decision.approvers,
                )
            )
            self.state.remember_nonces(decision.nonces)
            if decision.authorization is not None:
                decision.authorization.minted[decision.slot] = req.activity_id
                self.state.save_plan(decision.authorization)
            self.metrics.minted(audience=req.audience, verb=req.verb, resource=req.resource, runbook=req.runbook,
                                kind="read" if req.is_read else "undo" if req.undo else "write")
            record = self.audit.append(
                "mint",
                decision="issued",
                reason="read declared by runbook" if req.is_read else f"approved plan {decision.plan_hash[:12]}",
                grant_id=grant_id,
                audience=req.audience,
                scope=claims["scope"],
                subject=AGENT,
                workflow_id=req.workflow_id,
                run_id=req.run_id,
                step_id=req.step_id,
                approvers=decision.approvers,
            )
        return MintResponse(
            grant_id=grant_id,
            token=token,
            audience=req.audience,
            scope=claims["scope"],
            expires_at=datetime.fromtimestamp(claims["exp"], UTC),
            audit_seq=record["seq"],
        )

    def _decide(self, req: MintRequest) -> Decision:
        if self.state.frozen:
            raise Denied(f"broker is frozen (kill switch): {self.state.frozen_by()}", frozen=True)
        if req.is_read:
            decision = self._authorize_read(req)
        else:
            runbook = self._pinned_runbook(req)
            roster = self.roster.get()
            if roster is None and req.plan is not None and req.approvals:
                raise Denied(f"no approval can be verified: {self.roster.error}")
            decision = authorize_write(
                req, runbook, roster, state=self.state,
                intake_keys=load_intake_public_keys(self.config.intake_state_dir or self.config.state_dir),
                nonce_conflict=self.state.nonce_conflict, now=datetime.now(UTC),
            )
        decision.ttl_s = min(decision.ttl_s, signing.MAX_TTL_S)
        return decision

    def _authorize_read(self, req: MintRequest) -> Decision:
        """A read declared by the runbook: its current version, or any kept version (a read request
        names no version, and an incident opened on an older one still investigates and verifies)."""
        books = self.archive.all_versions(req.runbook)
        if not books:
            raise Denied(f"unknown runbook {req.runbook!r}")
        denials: list[Denied] = []
        for book in books:
            try:
                return authorize_read(req, book)
            except Denied as exc:
                denials.append(exc)
        raise denials[0]

    def _pinned_runbook(self, req: MintRequest) -> Runbook:
        """A write is derived from the runbook version its plan pins, never from a newer one."""
        if req.plan is None:
            runbook = self.runbooks.get(req.runbook)
            if runbook is None:
                raise Denied(f"unknown runbook {req.runbook!r}")
            return runbook  # authorize_write refuses a write without a plan, naming why
        try:
            return self.archive.for_plan(req.plan)
        except LookupError as exc:
            raise Denied(str(exc)) from None

    def check_approval(self, req: ApprovalCheckRequest) -> ApprovalCheck:
        """Verify an approval's signature and record when it arrived: its verdict is made once, now."""
        with self.lock:
            roster = self.roster.get()
            check = judge_approval(req.approval, roster, self.state, datetime.now(UTC).timestamp())
            if roster is None and not check.valid:
                check = check.model_copy(update={"reason": f"{check.reason} ({self.roster.error})"})
            if self.state.frozen:
                check = check.model_copy(update={"held": self.state.frozen_by()})
            return check

    # -- revoke, freeze --

    def revoke(self, grant_id: str, *, reason: str = "revoked by the agent") -> bool:
        with self.lock:
            grant = self.state.revoke(grant_id)
            if grant is None:
                self.audit.append("revoke", decision="unknown_grant", reason=reason, grant_id=grant_id)
                return False
            self._audit_revoke(grant, reason)
            return True

    def _audit_revoke(self, grant: GrantRecord, reason: str) -> None:
        self.audit.append(
            "revoke",
            decision="revoked",
            reason=reason,
            grant_id=grant.grant_id,
            audience=grant.audience,
            scope={"verb": grant.verb, "resource": grant.resource},
            subject=grant.subject,
            workflow_id=grant.workflow_id,
            run_id=grant.run_id,
            step_id=grant.step_id,
            approvers=grant.approvers,
        )

    def freeze(self, reason: str, by: str = "") -> int:
        with self.lock:
            self.state.set_frozen(True, reason, by)
            live = self.state.live_grants()
            for grant in live:
                self.state.revoke(grant.grant_id)
                self._audit_revoke(grant, "kill switch")
            self.audit.append(
                "freeze", decision="frozen", subject=by or "(unnamed)",
                reason=f"{reason or 'no reason given'}; revoked {len(live)} live grant(s)",
            )
            return len(live)

    def thaw(self, reason: str, by: str = "") -> None:
        with self.lock:
            self.state.set_frozen(False)
            self.audit.append("thaw", decision="thawed", subject=by or "(unnamed)", reason=reason or "no reason given")

    def revoked(self) -> list[str]:
        with self.lock:
            return self.state.revoked_jtis()

    def deny_unauthenticated(self, path: str, reason: str) -> None:
        self.audit.append("deny", decision="unauthenticated", reason=f"{path}: {reason}")
        self.metrics.denied(f"unauthenticated: {reason}")


def _bearer_check(broker: Broker, which: str) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        expected = broker.agent_token if which == "agent" else broker.admin_token
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        # Constant-time compare; the presented value is never logged or echoed.
        if scheme.lower() != "bearer" or not presented or not hmac.compare_digest(
            presented.strip().encode(), expected.encode()
        ):
            reason = f"missing or bad {which} bearer credential"
            broker.deny_unauthenticated(request.url.path, reason)
            raise BrokerHTTPError(401, "unauthorized", reason)

    return check


def create_app(
    state_dir: str | Path,
    *,
    roster_path: str | Path | None = None,
    runbooks_dir: str | Path | None = None,
    agent_token: str | None = None,
    admin_token: str | None = None,
) -> FastAPI:
    state_dir = Path(state_dir)
    broker = Broker(
        BrokerConfig(
            state_dir=state_dir,
            roster_path=Path(roster_path) if roster_path else state_dir / "roster.yaml",
            runbooks_dir=Path(runbooks_dir) if runbooks_dir else default_runbook_dir(),
            agent_token=agent_token,
            admin_token=admin_token,
        )
    )
    app = FastAPI(title="Firebreak credential broker", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=checkpoint_at_shutdown(broker.audit))  # sign the audit head at shutdown
    app.state.broker = broker
    agent = Depends(_bearer_check(broker, "agent"))
    admin = Depends(_bearer_check(broker, "admin"))

    @app.exception_handler(BrokerHTTPError)
    async def _broker_error(_: Request, exc: BrokerHTTPError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.error, "reason": exc.reason}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Name the field and the problem, never echo the input (it may hold anything).
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        reason = f"{where}: {first.get('msg', 'invalid')}" + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else "")
        broker.audit.append("deny", decision="bad_request", reason=f"{request.url.path}: {reason}")
        return JSONResponse({"error": "bad_request", "reason": reason}, status_code=400)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        roster = broker.roster.get()
        return {
            "ok": True,
            "frozen": broker.state.frozen,
            "kid": broker.kid,
            "runbooks": sorted(broker.runbooks),
            "roster": len(roster.people) if roster else 0,
            "roster_error": broker.roster.error,
        }

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        # Open like /healthz: counts and ages, nothing secret; Prometheus scrapes it for misuse alerts.
        with broker.lock:
            live = len(broker.state.live_grants())
        text = broker.metrics.render(live_grants=live, frozen=broker.state.frozen,
                                     credential_path=broker.dir / "agent-token",
                                     max_age_s=broker.config.credential_max_age_s)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/.well-known/jwks.json")
    def jwks() -> dict[str, Any]:
        return {"keys": [signing.public_jwk(broker.key, broker.kid)]}

    @app.post("/v1/mint", dependencies=[agent])
    def mint(req: MintRequest) -> MintResponse:
        return broker.mint(req)

    @app.post("/v1/approvals/check", dependencies=[agent])
    def check_approval(req: ApprovalCheckRequest) -> ApprovalCheck:
        return broker.check_approval(req)

    @app.post("/v1/revoke", dependencies=[agent])
    def revoke(req: RevokeRequest) -> dict[str, Any]:
        if not broker.revoke(req.grant_id):
            raise BrokerHTTPError(404, "not_found", f"no live grant {req.grant_id!r}")
        return {"grant_id": req.grant_id, "revoked": True}

    @app.get("/v1/revoked")
    def revoked() -> dict[str, Any]:
        # Open on purpose: jtis are not secrets, and every target must be able to poll.
        return {"revoked": broker.revoked(), "frozen": broker.state.frozen}

    @app.post("/v1/freeze", dependencies=[admin])
    def freeze(req: FreezeRequest | None = None) -> dict[str, Any]:
        count = broker.freeze(req.reason if req else "", req.by if req else "")
        return {"frozen": True, "revoked": count}

    @app.post("/v1/thaw", dependencies=[admin])
    def thaw(req: FreezeRequest | None = None) -> dict[str, Any]:
        broker.thaw(req.reason if req else "", req.by if req else "")
        return {"frozen": False}

    return app
