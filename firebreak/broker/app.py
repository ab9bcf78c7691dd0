"""The credential broker: the only holder of the key that signs target credentials.

The worker authenticates with its bootstrap bearer credential and asks for one
token per call: one audience, one verb on one resource, a few minutes at most.
Reads are issued on the runbook's declaration; writes only with signed
approvals that the broker verifies itself (see :mod:`firebreak.broker.rules`).
Every mint, denial, revocation, freeze and thaw goes to the hash-chained audit
log. A token is returned once, to the caller, and is never logged or stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from firebreak.broker.agent_credential import AgentCredential
from firebreak.broker.catalog_check import AUDIENCE as CATALOG_AUDIENCE
from firebreak.broker.catalog_check import VERB as CATALOG_VERB
from firebreak.broker.catalog_check import BrokerCatalog, CatalogUnavailable, check_request
from firebreak.broker.metrics import IdentityGauges
from firebreak.broker.models import (
    ApprovalCheckRequest,
    FreezeRequest,
    RunClosedRequest,
    MintRequest,
    MintResponse,
    RevokeRequest,
    RotateRequest,
)
from firebreak.broker.rules import (
    CLOSED_RUN_RECORD_S,
    Decision,
    Denied,
    StepAlreadyWrote,
    authorize_read,
    authorize_write,
    judge_approval,
)
from firebreak.broker.signing_keys import SigningKeys
from firebreak.broker.storage import StorageError
from firebreak.broker.state import (
    DurableState,
    GrantRecord,
    broker_dir,
    plan_key,
    read_or_create_secret,
)
from firebreak.config import AGENT, load_settings
from firebreak.identity import AgentIdentity
from firebreak.contracts import ApprovalCheck
from firebreak.plan import check_plan
from firebreak.receipts import load_intake_public_keys
from firebreak.roster import RosterSource
from firebreak.broker.runbooks import RunbookArchive
from firebreak.runbook import Runbook, default_runbook_dir

log = logging.getLogger(__name__)

ISSUER = "firebreak-broker"
AGENT_TOKEN_ENV = "FIREBREAK_BROKER_TOKEN"
ADMIN_TOKEN_ENV = "FIREBREAK_BROKER_ADMIN_TOKEN"
# How long the old bootstrap credential still works after `firebreak creds rotate`, unless told.
CREDENTIAL_OVERLAP_S = 3600.0


class DependencyUnavailable(Denied):
    """Refused because a dependency of the check (``dependency``: catalog, roster, storage) did not
    answer: deny by default, but retryable (503), and counted as availability, never as a denial."""

    def __init__(self, dependency: str, reason: str) -> None:
        super().__init__(reason, unavailable=True)
        self.dependency = dependency


class BrokerHTTPError(Exception):
    def __init__(self, status: int, error: str, reason: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason = status, error, reason
        self.extra = extra or {}


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
    # Owner, environment (put in every token's audience) and the bootstrap credential's maximum age.
    identity: AgentIdentity = field(default_factory=AgentIdentity)
    # The service catalog (Backstage API) the broker reads itself to check dependencies and blast radius.
    catalog_url: str | None = None


class Broker:
    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.dir = broker_dir(config.state_dir)
        # One lock around every decision that reads or changes grants, nonces or
        # the freeze flag: a mint can never slip in between "frozen?" and "issue".
        # Nothing is written to disk under it: a request waits for its changes after letting go (_durable).
        self.lock = threading.Lock()
        self.state = DurableState(self.dir, self.lock)
        self.keys = SigningKeys(self.dir)
        self.credential = AgentCredential(self.dir, env_var=AGENT_TOKEN_ENV, given=config.agent_token)
        self.admin_token = read_or_create_secret(self.dir / "admin-token", ADMIN_TOKEN_ENV, config.admin_token)
        self.audit = AuditLog(self.dir / "audit.jsonl", signing_key=self.key, kid=self.kid)
        # Every version ever loaded stays available: an open incident finishes on the version it pinned.
        self.archive = RunbookArchive.load(config.runbooks_dir, self.dir / "runbooks")
        self.runbooks: dict[str, Runbook] = self.archive.current
        self.roster = RosterSource(config.roster_path)
        self.metrics = BrokerMetrics(config.privileges_lock)
        self.catalog = BrokerCatalog(config.catalog_url, self._catalog_token, self._audit_catalog_read)
        # A failed write of the broker's files is counted (an availability alert); the request fails closed.
        self.audit.on_storage_error = self.state.on_storage_error = self.metrics.storage_error
        for note in self.state.repaired:  # a torn journal line dropped at start goes on the record
            self.audit.append("repair", decision="truncated", reason=note)
        self._retired_seen: set[str] = set()  # retired credentials whose first use is on the record

    def _catalog_token(self, resource: str, workflow_id: str) -> str:
        """The broker's own catalog credential: one entity, a minute, its own name as subject."""
        token, _ = signing.mint_token(
            self.key, self.kid, issuer=self.config.issuer, subject=self.config.issuer,
            audience=signing.audience_for(CATALOG_AUDIENCE, self.identity.environment),
            verb=CATALOG_VERB, resource=resource, ttl_s=60, workflow_id=workflow_id, run_id="",
            activity_id="broker-catalog-check", step_id="catalog-check", plan_hash="",
        )
        return token

    def _audit_catalog_read(self, resource: str, workflow_id: str, outcome: str) -> None:
        self.audit.append("catalog_read", decision="read", reason=f"the broker's own catalog read: {outcome}",
                          audience=CATALOG_AUDIENCE, scope={"verb": CATALOG_VERB, "resource": resource},
                          subject=self.config.issuer, workflow_id=workflow_id)

    def _catalog_verdict(self, req: MintRequest) -> Denied | CatalogUnavailable | None:
        """The catalog's word on this request, read outside ``self.lock``: a target verifying the broker's
        own token asks the broker (JWKS, revocations), so the lock must not be held while it answers."""
        if self.state.frozen:
            return None  # refused under the lock anyway
        try:
            if req.is_read:
                current = self.runbooks.get(req.runbook)
                if current is None or "dependency" not in current.params:
                    return None  # the rules refuse a param the runbook does not declare
                runbook = None
            else:
                runbook = None if req.plan is None else self._pinned_runbook(req)
                if runbook is not None and req.plan is not None:
                    try:
                        check_plan(req.plan, runbook)
                    except ValueError:
                        return None  # a plan that does not fit is refused by the rules, naming the field
            check_request(self.catalog, req, runbook)
        except (Denied, CatalogUnavailable) as exc:
            return exc
        except StorageError:
            raise  # its own catalog read is not on the record: a storage refusal (503), never the catalog's
        except Exception as exc:  # fail closed: an unexpected error is a refusal, not a pass
            log.exception("catalog check failed")
            return CatalogUnavailable(f"catalog check failed ({type(exc).__name__})")
        return None

    @property
    def key(self) -> signing.Ed25519PrivateKey:
        return self.keys.key

    @property
    def kid(self) -> str:
        return self.keys.kid

    @property
    def agent_token(self) -> str:
        return self.credential.token

    @property
    def identity(self) -> AgentIdentity:
        return self.config.identity

    # -- mint --

    def mint(self, req: MintRequest) -> MintResponse:
        verdict = self._catalog_verdict(req)
        try:
            return self._mint(req, verdict)
        finally:
            self._durable()  # the grant, nonces, plan and audit record, or the denial's record

    def _mint(self, req: MintRequest, verdict: Denied | CatalogUnavailable | None) -> MintResponse:
        with self.lock:
            try:
                try:
                    if isinstance(verdict, CatalogUnavailable):
                        # Deny by default, but retryable: the catalog may answer on the worker's next try.
                        raise DependencyUnavailable("catalog", f"cannot check against the catalog: {verdict.reason}")
                    if verdict is not None:
                        raise verdict
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
                    sync=False,
                )
                # 423 Locked: the kill switch holds this, it does not refuse it; the caller waits.
                # An outage is counted as availability, never as a denial: the misuse rules see only policy.
                dependency = getattr(exc, "dependency", "other") if exc.unavailable else None
                if dependency:
                    self.metrics.dependency_unavailable(dependency)
                else:
                    self.metrics.denied(exc.reason)
                if not req.is_read and not exc.frozen and not exc.unavailable and not self._awaiting_execution(req):
                    self.metrics.unapproved_write()
                if dependency:
                    raise BrokerHTTPError(503, f"{dependency}_unavailable", exc.reason) from None
                if isinstance(exc, StepAlreadyWrote):
                    raise BrokerHTTPError(403, "already_wrote", exc.reason, {"result": exc.result}) from None
                raise BrokerHTTPError(423 if exc.frozen else 403, "frozen" if exc.frozen else "denied",
                                      exc.reason) from None
            token, claims = signing.mint_token(
                self.key,
                self.kid,
                issuer=self.config.issuer,
                subject=AGENT,
                # The environment is part of the audience: a target in another environment refuses it.
                audience=signing.audience_for(req.audience, self.identity.environment),
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
            slot_key = ""
            if decision.authorization is not None:
                slot_key = f"{decision.authorization.key}#{decision.slot}"
                # A slot's grant is bound to the attempt that holds it: a later attempt's mint revokes an
                # earlier attempt's (the same attempt asking again, say after a lost answer, keeps it).
                earlier = self.state.grants.get(decision.authorization.grants.get(decision.slot, ""))
                if (earlier is not None and not earlier.revoked and earlier.exp > time.time()
                        and req.attempt > decision.authorization.attempts.get(decision.slot, 1)):
                    self.state.revoke(earlier.grant_id)
                    self._audit_revoke(earlier, f"superseded by attempt {req.attempt} of activity {req.activity_id}")
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
                    slot=slot_key,
                )
            )
            self.state.remember_nonces(decision.nonces)
            if decision.authorization is not None:
                authorization = decision.authorization
                authorization.minted[decision.slot] = req.activity_id
                authorization.attempts[decision.slot] = req.attempt
                authorization.grants[decision.slot] = grant_id
                authorization.minted_at.setdefault(decision.slot, time.time())
                self.state.save_plan(authorization)
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
                sync=False,
            )
        return MintResponse(
            grant_id=grant_id,
            token=token,
            audience=req.audience,
            scope=claims["scope"],
            expires_at=datetime.fromtimestamp(claims["exp"], UTC),
            audit_seq=record["seq"],
        )

    def _awaiting_execution(self, req: MintRequest) -> bool:
        """Whether an approved plan this step belongs to is awaiting execution here (only the broker's
        own record counts: a plan authorization, made from verified approvals, still in its window)."""
        plan = req.plan
        if plan is None:
            return False
        try:
            authorization = self.state.plan(plan_key(plan.incident_id, plan.run_id, plan.hash))
        except Exception:  # a plan too broken to hash awaits nothing
            return False
        return (authorization is not None and time.time() <= authorization.expires_at
                and req.step_id in authorization.approved_steps)

    def _decide(self, req: MintRequest) -> Decision:
        if self.state.frozen:
            raise Denied(f"broker is frozen (kill switch): {self.state.frozen_by()}", frozen=True)
        if req.is_read:
            decision = self._authorize_read(req)
        else:
            runbook = self._pinned_runbook(req)
            roster = self.roster.get()
            if roster is None and req.plan is not None and req.approvals:
                raise DependencyUnavailable("roster", f"no approval can be verified: {self.roster.error}")
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
        self._durable()  # the arrival is recorded before it is reported
        return check

    def _durable(self) -> None:
        """Outside ``self.lock``: return once this request's changes (and all before them) are on disk,
        in one write shared with whatever other requests changed meanwhile."""
        self.state.sync()
        self.audit.sync(self.audit.head_seq)

    # -- revoke, freeze --

    def revoke(self, grant_id: str, *, reason: str = "revoked by the agent", wrote: bool = False,
               result: dict[str, Any] | None = None) -> bool:
        """``wrote``: the holder reports that the target took the write this grant was for: its step's
        slot is spent for good, whatever activity or attempt asks again."""
        with self.lock:
            if wrote:
                spent = self.state.grant_slot(grant_id)
                if spent is not None and spent[1] not in spent[0].wrote:
                    spent[0].wrote.append(spent[1])
                    spent[0].results[spent[1]] = dict(result or {})
                    self.state.save_plan(spent[0])
                    reason = f"{reason}; step {spent[1]} wrote at the target"
            grant = self.state.revoke(grant_id)
            if grant is None:
                self.audit.append("revoke", decision="unknown_grant", reason=reason, grant_id=grant_id, sync=False)
            else:
                self._audit_revoke(grant, reason)
        self._durable()
        return grant is not None

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
            sync=False,
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
                reason=f"{reason or 'no reason given'}; revoked {len(live)} live grant(s)", sync=False,
            )
        self._durable()
        return len(live)

    def thaw(self, reason: str, by: str = "") -> None:
        with self.lock:
            frozen_at = self.state.frozen_at()
            self.state.set_frozen(False)
            if frozen_at is not None:
                # A plan held by the kill switch did not spend its steps' budgets while held.
                self.state.extend_plans(since=frozen_at, by=max(0.0, time.time() - frozen_at))
            self.audit.append("thaw", decision="thawed", subject=by or "(unnamed)", reason=reason or "no reason given",
                              sync=False)
        self._durable()

    def revoked(self) -> list[str]:
        with self.lock:
            return self.state.revoked_jtis()

    def deny_unauthenticated(self, path: str, reason: str, *, retired: bool = False) -> None:
        """Counted, never appended one per request: audit space is spent only on authenticated callers (an
        unauthenticated flood must not grow the log); misuse alerts watch the counter. The one exception is
        bounded: the first use of a *retired* bootstrap credential (one the broker issued, and an admin rotated
        out) is recorded once, naming the rotation, since that is someone who held the real credential."""
        self.metrics.unauthenticated(path)
        self.metrics.denied(f"unauthenticated: {reason}")
        if retired and reason not in self._retired_seen:
            self._retired_seen.add(reason)
            self.audit.append("deny", decision="unauthenticated", reason=f"{path}: {reason}")

    def close_run(self, workflow_id: str, run_ids: list[str], outcome: str) -> list[str]:
        """The workflow reports its run closed: nothing more is minted for it (nor for the run its plan names),
        and any live write or undo grant of it is revoked. Returns the runs newly recorded closed."""
        now = time.time()
        closed: list[str] = []
        with self.lock:
            for run_id in run_ids:
                if self.state.close_run(workflow_id, run_id, at=now, keep_until=now + CLOSED_RUN_RECORD_S):
                    closed.append(run_id)
            live = [g for g in self.state.live_grants(now)
                    if g.slot and g.workflow_id == workflow_id and g.run_id in run_ids]
            for grant in live:
                self.state.revoke(grant.grant_id)
                self._audit_revoke(grant, "its run closed")
            if closed:
                self.audit.append("run_closed", decision="closed", subject=AGENT, workflow_id=workflow_id,
                                  run_id=",".join(closed), reason=f"the workflow reported its run closed: {outcome}",
                                  sync=False)
        self._durable()
        return closed

    # -- the identity's lifecycle --

    def rotate_credential(self, overlap_s: float, reason: str, by: str) -> dict[str, Any]:
        """A new bootstrap credential in ``agent-token``; the old one works for ``overlap_s`` more."""
        with self.lock:
            try:
                old = self.credential.rotate(overlap_s=overlap_s, by=by, reason=reason)
            except ValueError as exc:
                raise BrokerHTTPError(409, "not_rotatable", str(exc)) from None
            until = datetime.fromtimestamp(old.valid_until, UTC).isoformat()
            self.audit.append("rotate", decision="credential_rotated", subject=by or "(unnamed)",
                              reason=f"bootstrap credential of {AGENT} rotated ({reason or 'no reason given'}); "
                                     f"the old one (sha256 {old.sha256[:12]}) is accepted until {until}", sync=False)
        self._durable()
        return {"rotated": "credential", "old_valid_until": until, "path": str(self.credential.path)}

    def rotate_signing_key(self, overlap_s: float, reason: str, by: str) -> dict[str, Any]:
        """A new token key; the old one's public half stays in the JWKS for ``overlap_s``."""
        with self.lock:
            old = self.keys.rotate(overlap_s)
            until = datetime.fromtimestamp(old.published_until, UTC).isoformat()
            record = f"token signing key rotated ({reason or 'no reason given'}): {old.kid} -> {self.kid}, " \
                     f"the old key stays in the JWKS until {until}"
            self.audit.append("rotate", decision="signing_key_rotated", subject=by or "(unnamed)", reason=record,
                              sync=False)
            self.audit.rekey(self.key, self.kid)  # the head is signed with the old key, the rest with the new
        self._durable()
        return {"rotated": "signing_key", "old_kid": old.kid, "kid": self.kid, "old_published_until": until}

    def identity_gauges(self) -> IdentityGauges:
        with self.lock:
            return IdentityGauges(
                agent=AGENT, owner=self.identity.owner, environment=self.identity.environment,
                credential_age_s=self.credential.age_s(), credential_max_age_s=self.identity.max_age_s,
                credential_overlap_s=self.credential.overlap_remaining_s(),
                signing_key_age_s=self.keys.age_s(), signing_keys_published=1 + len(self.keys.published()),
            )


def _authentication_refusal(broker: Broker, request: Request, which: str) -> tuple[str, bool] | None:
    """Why the request's bearer credential is not the ``which`` one, and whether it is a retired one of the
    agent's (None: it is the one)."""
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    # Constant-time compare; the presented value is never logged or echoed.
    verdict = (broker.credential.check(presented.strip()) if which == "agent"
               else AgentCredential.compare(presented.strip(), broker.admin_token))
    if scheme.lower() != "bearer" or not presented or not verdict.accepted:
        return verdict.refusal or f"missing or bad {which} bearer credential", verdict.refusal is not None
    if verdict.previous:
        broker.metrics.previous_credential_used()
    return None


# The routes each credential opens (a malformed body is answered only after its caller is known).
_ADMIN_PATHS = ("/v1/freeze", "/v1/thaw", "/v1/creds/rotate", "/v1/keys/rotate")


def _bearer_check(broker: Broker, which: str) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        refusal = _authentication_refusal(broker, request, which)
        if refusal is not None:
            broker.deny_unauthenticated(request.url.path, refusal[0], retired=refusal[1])
            raise BrokerHTTPError(401, "unauthorized", refusal[0])

    return check


def create_app(
    state_dir: str | Path,
    *,
    roster_path: str | Path | None = None,
    runbooks_dir: str | Path | None = None,
    agent_token: str | None = None,
    admin_token: str | None = None,
    identity: AgentIdentity | None = None,
    catalog_url: str | None = None,
) -> FastAPI:
    """``identity``: default, the configuration's (``identity:`` in FIREBREAK_CONFIG, FIREBREAK_ENVIRONMENT...)."""
    state_dir = Path(state_dir)
    broker = Broker(
        BrokerConfig(
            state_dir=state_dir,
            roster_path=Path(roster_path) if roster_path else state_dir / "roster.yaml",
            runbooks_dir=Path(runbooks_dir) if runbooks_dir else default_runbook_dir(),
            agent_token=agent_token,
            admin_token=admin_token,
            identity=identity or load_settings(state_dir).identity,
            catalog_url=catalog_url,
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
        return JSONResponse({"error": exc.error, "reason": exc.reason, **exc.extra}, status_code=exc.status,
                            headers=headers)

    @app.exception_handler(StorageError)
    async def _storage_error(_: Request, exc: StorageError) -> JSONResponse:
        # Fail closed: the record of this request is not durable, so no credential left the broker.
        broker.metrics.dependency_unavailable("storage")  # an outage of the broker's own disk, not misuse
        return JSONResponse({"error": "storage_unavailable", "reason": f"the broker could not record this request"
                             f" durably ({exc.why}); nothing was issued: try again"}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Name the field and the problem, never echo the input (it may hold anything).
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        reason = f"{where}: {first.get('msg', 'invalid')}" + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else "")
        # A body may fail to parse before the route's credential check runs: authenticate first, so that
        # nothing reaches the audit log from a caller nobody has verified.
        which = "admin" if request.url.path in _ADMIN_PATHS else "agent"
        refusal = _authentication_refusal(broker, request, which)
        if refusal is not None:
            broker.deny_unauthenticated(request.url.path, refusal[0], retired=refusal[1])
            return JSONResponse({"error": "unauthorized", "reason": refusal[0]}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
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
            "identity": broker.identity.summary(),
        }

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        # Open like /healthz: counts and ages, nothing secret; Prometheus scrapes it for misuse alerts.
        with broker.lock:
            live = len(broker.state.live_grants())
        text = broker.metrics.render(live_grants=live, frozen=broker.state.frozen, identity=broker.identity_gauges())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/.well-known/jwks.json")
    def jwks() -> dict[str, Any]:
        # The current key, and each rotated-out key until its overlap ends (with "exp": targets drop it then).
        with broker.lock:
            return broker.keys.jwks()

    @app.post("/v1/mint", dependencies=[agent])
    def mint(req: MintRequest) -> MintResponse:
        return broker.mint(req)

    @app.post("/v1/approvals/check", dependencies=[agent])
    def check_approval(req: ApprovalCheckRequest) -> ApprovalCheck:
        return broker.check_approval(req)

    @app.post("/v1/runs/closed", dependencies=[agent])
    def run_closed(req: RunClosedRequest) -> dict[str, Any]:
        closed = broker.close_run(req.workflow_id, req.run_ids, req.outcome)
        return {"workflow_id": req.workflow_id, "closed": req.run_ids, "newly_closed": closed}

    @app.post("/v1/revoke", dependencies=[agent])
    def revoke(req: RevokeRequest) -> dict[str, Any]:
        if not broker.revoke(req.grant_id, wrote=req.wrote, result=req.result):
            raise BrokerHTTPError(404, "not_found", f"no live grant {req.grant_id!r}")
        return {"grant_id": req.grant_id, "revoked": True}

    @app.get("/v1/revoked")
    def revoked() -> dict[str, Any]:
        # Open on purpose: jtis are not secrets, and every target must be able to poll. "kids": the keys the
        # JWKS publishes now, so a target sees a key rotation (or the end of its overlap) within a poll.
        with broker.lock:
            kids = [broker.kid, *(k.kid for k in broker.keys.published())]
        return {"revoked": broker.revoked(), "frozen": broker.state.frozen, "kids": kids}

    @app.post("/v1/freeze", dependencies=[admin])
    def freeze(req: FreezeRequest | None = None) -> dict[str, Any]:
        count = broker.freeze(req.reason if req else "", req.by if req else "")
        return {"frozen": True, "revoked": count}

    @app.post("/v1/creds/rotate", dependencies=[admin])
    def rotate_credential(req: RotateRequest) -> dict[str, Any]:
        # The new credential is written to the broker's agent-token file, never returned.
        overlap = CREDENTIAL_OVERLAP_S if req.overlap_s is None else req.overlap_s
        return broker.rotate_credential(overlap, req.reason, req.by)

    @app.post("/v1/keys/rotate", dependencies=[admin])
    def rotate_key(req: RotateRequest) -> dict[str, Any]:
        overlap = signing.KEY_OVERLAP_S if req.overlap_s is None else req.overlap_s
        return broker.rotate_signing_key(overlap, req.reason, req.by)

    @app.post("/v1/thaw", dependencies=[admin])
    def thaw(req: FreezeRequest | None = None) -> dict[str, Any]:
        broker.thaw(req.reason if req else "", req.by if req else "")
        return {"frozen": False}

    return app
